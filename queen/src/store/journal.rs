//! The group journal: how a group commit of several keys stays atomic in sled without
//! `apply_batch`.
//!
//! **Why not `apply_batch`.** sled's `apply_batch` takes a process-wide write lock
//! (`concurrency_control::write`) that excludes every other sled operation, and sled's
//! `flush` holds the read side of that lock for as long as it waits for the disk. So a
//! batch could not be applied while the last one was being flushed: the writer and the
//! flusher took turns instead of overlapping, and the writer, the queen's bottleneck under
//! load, sat idle through every sync (found with `perf record -e sched:sched_switch` on
//! the writer thread: most of its sleeps were in that lock). A batch also seals and
//! syncs a log buffer holding only its manifest first. Plain inserts and removes need
//! neither.
//!
//! **How.** A group of several keys is written as: one record appended to the journal
//! file (the group's sequence number and its final writes, checksummed); `m/group` =
//! (number, begun); each write as a plain sled insert or remove; `m/group` = (number,
//! done). One thread issues these in this order, and sled recovers a prefix of its log (it
//! stops at the first missing or torn message), so after a crash the recovered `m/group`
//! tells which case holds:
//!
//! * (N, done), or no marker: every group up to N is whole and nothing of a later one is
//!   in sled; a journal record of a later group (the file write survives a killed process
//!   even when sled's buffer holding the group's first writes did not) is ignored: that
//!   group never reached sled and was never acknowledged;
//! * (N, begun): group N's writes may be partly there and nothing after them is. The
//!   record of N (written before the marker, so present) is applied again, each write
//!   setting its key to its final value in the group, and N marked done.
//!
//! A group of one key needs no journal: a single insert is atomic.
//!
//! **Durability is unchanged:** nothing is acknowledged before the flusher's sled flush,
//! as before; the journal only makes a group all-or-nothing. With `[storage] sync =
//! false` a record is written but not synced (a killed process cannot lose what it
//! wrote); with `sync = true` it is synced before the group touches sled, so a group
//! stays whole through power loss as well. A commit answered with a store error (the
//! queen then stops) may be found applied after the restart: it was never acknowledged.
//!
//! **Readers** on the same tree may see a group half-written, as they could see one
//! applied but not yet durable before: the core never decides on such a read (a task it
//! reads back is one whose last change is durable, and it keeps recent changes in memory
//! until they are).
//!
//! **Files.** `data_dir/journal/<first sequence>.log`, a new one every [`ROTATE_BYTES`];
//! a file is deleted once a flush has made every group in it durable in sled (a file that
//! cannot be deleted is left: only the record of a begun group is ever read). After
//! replaying, the start removes them all.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::KeyWrites;

/// The journal's directory in the data dir.
pub(crate) const DIR: &str = "journal";

/// A new file once the current one holds this much.
pub(crate) const ROTATE_BYTES: u64 = 16 << 20;

/// Record header: body length (u32), CRC-32 of the body (u32).
const HEADER: usize = 8;

/// The journal the writer appends to.
pub(crate) struct Journal {
    dir: PathBuf,
    sync: bool,
    file: File,
    path: PathBuf,
    size: u64,
    /// The last group written.
    last: u64,
    /// Older files and the last group each holds.
    older: Vec<(PathBuf, u64)>,
    buf: Vec<u8>,
}

impl Journal {
    /// Starts an empty journal in `data_dir/journal`, its first group `after + 1`.
    /// Whatever was there must have been replayed and made durable first: it is deleted.
    /// `sync`: `[storage] sync`.
    pub(crate) fn start(data_dir: &Path, sync: bool, after: u64) -> std::io::Result<Journal> {
        let dir = data_dir.join(DIR);
        std::fs::create_dir_all(&dir)?;
        for path in files(&dir)? {
            std::fs::remove_file(path)?;
        }
        let (file, path) = create(&dir, after + 1, sync)?;
        Ok(Journal {
            dir,
            sync,
            file,
            path,
            size: 0,
            last: after,
            older: Vec::new(),
            buf: Vec::new(),
        })
    }

    /// Appends group `seq`'s writes (and, with `sync`, syncs them). `durable`: every group
    /// up to this one is durable in sled, so files holding only those can go.
    pub(crate) fn append(
        &mut self,
        seq: u64,
        writes: &KeyWrites,
        durable: u64,
    ) -> std::io::Result<()> {
        let mut kept = Vec::with_capacity(self.older.len());
        for (path, last) in std::mem::take(&mut self.older) {
            if last > durable {
                kept.push((path, last));
            } else if let Err(e) = std::fs::remove_file(&path) {
                // Harmless to leave (see the module docs); the next start removes it.
                tracing::warn!(file = %path.display(), error = %e, "cannot delete a group journal file whose groups are durable; left in place");
            }
        }
        self.older = kept;
        if self.size >= ROTATE_BYTES {
            let (file, path) = create(&self.dir, seq, self.sync)?;
            self.file = file;
            let closed = std::mem::replace(&mut self.path, path);
            self.older.push((closed, self.last));
            self.size = 0;
        }
        self.buf.clear();
        encode(seq, writes, &mut self.buf);
        self.file.write_all(&self.buf)?;
        if self.sync {
            self.file.sync_data()?;
        }
        self.size += self.buf.len() as u64;
        self.last = seq;
        Ok(())
    }
}

/// Creates `dir/<first>.log` (20 digits, so names sort as numbers); with `sync`, makes its
/// directory entry durable too.
fn create(dir: &Path, first: u64, sync: bool) -> std::io::Result<(File, PathBuf)> {
    let path = dir.join(format!("{first:020}.log"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    if sync {
        File::open(dir)?.sync_all()?;
    }
    Ok((file, path))
}

/// The journal files in `dir`, oldest first.
fn files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "log") {
                    paths.push(path);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    paths.sort();
    Ok(paths)
}

/// One record: `[u32 body length][u32 CRC-32 of the body][body]`; the body is the group's
/// sequence number (u64) and its writes, each `[1][u32 key length][key][u32 value
/// length][value]` for a put or `[0][u32 key length][key]` for a removal. Integers are
/// big-endian.
fn encode(seq: u64, writes: &KeyWrites, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0; HEADER]);
    out.extend_from_slice(&seq.to_be_bytes());
    for (k, v) in writes {
        out.push(u8::from(v.is_some()));
        out.extend_from_slice(&len32(k.len()).to_be_bytes());
        out.extend_from_slice(k);
        if let Some(v) = v {
            out.extend_from_slice(&len32(v.len()).to_be_bytes());
            out.extend_from_slice(v);
        }
    }
    let body = &out[HEADER..];
    let crc = crc32fast::hash(body);
    let len = len32(body.len());
    out[..4].copy_from_slice(&len.to_be_bytes());
    out[4..HEADER].copy_from_slice(&crc.to_be_bytes());
}

/// Keys and values are bounded far below 4 GiB (the HTTP body limit); saturating keeps a
/// mistake from wrapping: the record's checksum would then fail and replay stop there.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// One group read back.
pub(crate) type Group = (u64, Vec<(Vec<u8>, Option<Vec<u8>>)>);

/// Every whole record in `data_dir/journal`, oldest first. A file ends at its first
/// record that is cut short or fails its checksum (a write the crash interrupted: its
/// group never reached sled).
pub(crate) fn read(data_dir: &Path) -> std::io::Result<Vec<Group>> {
    let mut groups = Vec::new();
    for path in files(&data_dir.join(DIR))? {
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        let mut at = 0;
        while let Some((group, next)) = decode(&bytes, at) {
            groups.push(group);
            at = next;
        }
    }
    Ok(groups)
}

/// The record at `at`, and where the next one starts; `None` at the end or at a record
/// that is cut short, fails its checksum or does not parse.
fn decode(bytes: &[u8], at: usize) -> Option<(Group, usize)> {
    let header = bytes.get(at..at.checked_add(HEADER)?)?;
    let len = u32::from_be_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(header[4..].try_into().ok()?);
    let start = at + HEADER;
    let end = start.checked_add(len)?;
    let body = bytes.get(start..end)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let mut r = Reader { bytes: body, at: 0 };
    let seq = u64::from_be_bytes(r.array()?);
    let mut writes = Vec::new();
    while r.at < body.len() {
        let kind = r.take(1)?[0];
        let klen = u32::from_be_bytes(r.array()?) as usize;
        let key = r.take(klen)?.to_vec();
        let value = match kind {
            1 => {
                let vlen = u32::from_be_bytes(r.array()?) as usize;
                Some(r.take(vlen)?.to_vec())
            }
            0 => None,
            _ => return None,
        };
        writes.push((key, value));
    }
    Some(((seq, writes), end))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Some(out)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writes(n: usize, value: usize) -> KeyWrites {
        (0..n)
            .map(|i| {
                let k = format!("a/{i:08}").into_bytes();
                let v = (i % 3 != 0).then(|| vec![b'x'; value]);
                (k, v)
            })
            .collect()
    }

    fn as_vec(w: &KeyWrites) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        w.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    #[test]
    fn records_read_back_in_order_across_rotated_files_and_durable_files_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::start(dir.path(), false, 10).expect("start");
        // Groups of ~4 MB: a new file after every fifth.
        let big = writes(2_000, 3_000);
        for seq in 11..=17 {
            j.append(seq, &big, 0).expect("append");
        }
        let files_before = files(&dir.path().join(DIR)).expect("files").len();
        assert_eq!(files_before, 2);
        let back = read(dir.path()).expect("read");
        assert_eq!(
            back.iter().map(|g| g.0).collect::<Vec<_>>(),
            (11..=17).collect::<Vec<_>>()
        );
        assert!(back.iter().all(|g| g.1 == as_vec(&big)));
        // Once everything up to 17 is durable, the older file goes; the current one, which
        // holds the last groups, stays.
        j.append(18, &writes(3, 10), 17).expect("append");
        assert_eq!(files(&dir.path().join(DIR)).expect("files").len(), 1);
        let left: Vec<u64> = read(dir.path())
            .expect("read")
            .iter()
            .map(|g| g.0)
            .collect();
        assert_eq!(left, vec![16, 17, 18]);
    }

    #[test]
    fn a_cut_or_garbled_record_ends_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::start(dir.path(), true, 0).expect("start");
        j.append(1, &writes(10, 20), 0).expect("append");
        j.append(2, &writes(10, 20), 0).expect("append");
        drop(j);
        let path = files(&dir.path().join(DIR)).expect("files").remove(0);
        let whole = std::fs::read(&path).expect("read");
        let first = decode(&whole, 0).expect("first").1;
        for cut in [first + 1, first + HEADER, whole.len() - 1] {
            std::fs::write(&path, &whole[..cut]).expect("write");
            let back = read(dir.path()).expect("read");
            assert_eq!(back.len(), 1, "cut at {cut}");
            assert_eq!(back[0].0, 1);
        }
        let mut bad = whole.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        std::fs::write(&path, &bad).expect("write");
        assert_eq!(
            read(dir.path()).expect("read").len(),
            1,
            "a checksum mismatch ends it"
        );
        // A fresh start deletes what was there.
        drop(Journal::start(dir.path(), false, 2).expect("start"));
        assert!(read(dir.path()).expect("read").is_empty());
    }
}
