//! The write-ahead journal: what makes a group commit durable, and whole, on sled.
//!
//! **Every group commit is one record** appended to `data_dir/journal/` (its sequence
//! number and each key's final value in the group, checksummed) before any of its writes
//! reach sled, which takes them as plain inserts and removes at the next checkpoint (until
//! then they wait, readable, in the store's pending writes: `super::pending`). A commit is
//! acknowledged once its record is on disk: the flusher syncs the journal
//! (`sync_file_range`, what sled's own flush issues for its log; with `[storage] sync` the
//! writer `fdatasync`s each record before the group touches sled, so a group stays whole
//! through power loss too). sled is written and flushed only at a **checkpoint**, every
//! [`CHECKPOINT_EVERY`] (sooner under load) and at shutdown, from a thread of its own:
//! the pending writes of every group up to N, then `m/ckpt` = N, then a sled flush, and
//! only then may journal files holding nothing after N be deleted.
//!
//! **Why.** Schema 4 flushed sled for every group commit. A sled flush seals and writes a
//! log buffer through sled's IO threads: ~250 µs before an acknowledgement at low load
//! and, under load, most of the store's CPU (sled alone, the queen's write pattern in
//! groups of 32 tasks: 14.3 µs a task flushing each group, 8.7 µs flushing every hundredth,
//! `hive-sled-alone --lifecycle --plain --batches-per-flush`). Appending a record and
//! syncing its range is one `pwrite` and one `sync_file_range` (~70 µs), with none of the
//! hand-offs (and, every half MiB, a `pwrite` of zeros ahead: **Files** below).
//!
//! **Recovery.** sled recovers a prefix of its log, so the recovered `m/ckpt` = N says
//! every group up to N is in sled, and a later group may be in it partly, wholly or not
//! at all. Each record holds its group's final values, so applying every record after N
//! again, in order, leaves each key as the last group that wrote it left it: the state
//! after the last whole record. A record is written before its group's first sled write
//! and a killed process loses nothing it wrote to a file, so every group sled holds any
//! part of has a whole record. The journal ends at the last file's first record that is
//! cut short or fails its checksum (a write the crash interrupted, never acknowledged); a
//! record missing after N (the numbers must follow on) or a cut in an earlier file is
//! corruption, and the queen refuses to start rather than guess. So is a recovered
//! `m/seq` (written before each group's writes) past the last whole record: sled holds
//! part of a group whose record was lost, which only an unsynced journal and an OS crash
//! can do. After replaying, the open inserts `m/ckpt`, flushes sled (and with `sync`
//! syncs the file system) and deletes the journal.
//!
//! **Readers** on the same tree may see a group half-written, or written and not yet
//! durable: the core never decides on such a read (a task it reads back is one whose last
//! change is durable, and it keeps recent changes in memory until they are). A commit
//! answered with a store error (the queen then stops) may be found applied after the
//! restart: it was never acknowledged.
//!
//! **Files.** `data_dir/journal/<first sequence>.log`, a new one every [`ROTATE_BYTES`]
//! (the full one synced first, so the flusher need only sync the current file), written
//! out with zeros [`AHEAD`] of its records so that syncs overwrite blocks in place; zeros
//! after the last record are the file's end. A file that cannot be deleted is left: its
//! records are at or before `m/ckpt` and never read.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::KeyWrites;

/// The journal's directory in the data dir.
pub(crate) const DIR: &str = "journal";

/// A new file once the current one holds this much.
pub(crate) const ROTATE_BYTES: u64 = 16 << 20;

/// How often the checkpoint writes the pending writes to sled and flushes it, so journal
/// files can go; under load the pending writes' own limits (`super::pending::APPLY_AT`,
/// `APPLY_AT_BYTES`) start it sooner, so the journal holds a file or two and a restart
/// replays at most a second of work. Not more often: a checkpoint's sled writes share the
/// disk with the journal's syncs, and at 250 ms they showed in the low-load p99
/// (`bench/scripts/latency-vs-beanstalkd 3`: 0.74 ms; 0.46 and 0.53 ms at 1 s).
pub(crate) const CHECKPOINT_EVERY: Duration = Duration::from_millis(1000);

/// Record header: body length (u32), CRC-32 of the body (u32).
const HEADER: usize = 8;

/// How far ahead of its records a journal file is written out with zeros. A sync of a
/// record in blocks the file already holds overwrites them in place; a sync of a record
/// past them makes ext4 allocate a block (unwritten, then converted once written, each
/// under its own journal handle) within the sync, and those are the syncs that stall when
/// the disk is slow: `hive-bench floor`, seven runs, `journal_sync_overwrite` p99
/// 0.09–0.87 ms against the appending `journal_sync`'s 0.21–2.47 (docs/performance.md,
/// "Issue 16, eighth session"). With `[storage] sync` a record's `fdatasync` no longer
/// carries the file's size either; the one after the zeros are written waits for them
/// too, once per half MiB of records.
pub(crate) const AHEAD: u64 = 1 << 20;

/// Where the journal ends: the file being appended to and where its records end (zeros
/// written out ahead follow). The flusher syncs
/// up to here before acknowledging what was written before.
#[derive(Clone)]
pub(crate) struct End {
    pub(crate) file: Arc<File>,
    pub(crate) len: u64,
}

/// The journal the writer appends to.
pub(crate) struct Journal {
    dir: PathBuf,
    sync: bool,
    file: Arc<File>,
    path: PathBuf,
    size: u64,
    /// The last group written.
    last: u64,
    /// Older files and the last group each holds.
    older: Vec<(PathBuf, u64)>,
    buf: Vec<u8>,
    /// How much of the current file is written out (its records, then zeros).
    prepared: u64,
}

impl Journal {
    /// Starts an empty journal in `data_dir/journal`, its first group `after + 1`.
    /// Whatever was there must have been replayed and checkpointed first: it is deleted.
    /// `sync`: `[storage] sync`.
    pub(crate) fn start(data_dir: &Path, sync: bool, after: u64) -> std::io::Result<Journal> {
        let dir = data_dir.join(DIR);
        std::fs::create_dir_all(&dir)?;
        if sync {
            // The directory's own entry, on a new data dir.
            File::open(data_dir)?.sync_all()?;
        }
        for path in files(&dir)? {
            std::fs::remove_file(path)?;
        }
        let (file, path) = create(&dir, after + 1, sync)?;
        Ok(Journal {
            dir,
            sync,
            file: Arc::new(file),
            path,
            size: 0,
            last: after,
            older: Vec::new(),
            buf: Vec::new(),
            prepared: 0,
        })
    }

    /// Appends group `seq`'s writes (and, with `sync`, syncs them). `checkpointed`: every
    /// group up to this one is durable in sled, so files holding only those can go.
    pub(crate) fn append(
        &mut self,
        seq: u64,
        writes: &KeyWrites,
        checkpointed: u64,
    ) -> std::io::Result<()> {
        let mut kept = Vec::with_capacity(self.older.len());
        for (path, last) in std::mem::take(&mut self.older) {
            if last > checkpointed {
                kept.push((path, last));
            } else if let Err(e) = std::fs::remove_file(&path) {
                // Harmless to leave (see the module docs); the next start removes it.
                tracing::warn!(file = %path.display(), error = %e, "cannot delete a journal file whose groups are checkpointed; left in place");
            }
        }
        self.older = kept;
        if self.size >= ROTATE_BYTES {
            // The flusher syncs only the current file: the full one is made durable now
            // (with `sync`, every record already is).
            if !self.sync {
                sync_range(&self.file, 0, self.size)?;
            }
            let (file, path) = create(&self.dir, seq, self.sync)?;
            self.file = Arc::new(file);
            let closed = std::mem::replace(&mut self.path, path);
            self.older.push((closed, self.last));
            self.size = 0;
            self.prepared = 0;
        }
        self.buf.clear();
        encode(seq, writes, &mut self.buf);
        if self.buf.len() - HEADER > u32::MAX as usize {
            // Its length would not fit the header: it could not be read back.
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "group {seq} is {} bytes, over a record's 4 GiB",
                    self.buf.len()
                ),
            ));
        }
        let end = self.size + self.buf.len() as u64;
        if end + AHEAD / 2 > self.prepared {
            self.prepare(end)?;
        }
        self.file.write_all_at(&self.buf, self.size)?;
        if self.sync {
            self.file.sync_data()?;
        }
        self.size = end;
        self.last = seq;
        Ok(())
    }

    /// Writes zeros from where the file is written out (or from `end`, where the record
    /// about to be written ends) to [`AHEAD`] past `end`, and starts writing them to the
    /// disk without waiting: their blocks are allocated then, long before a record's sync
    /// reaches them. Zeros after the last record read as the end of the file ([`read`]),
    /// whether or not they reached the disk.
    fn prepare(&mut self, end: u64) -> std::io::Result<()> {
        let from = self.prepared.max(end);
        let to = end + AHEAD;
        let zeros = vec![0u8; usize::try_from(to - from).unwrap_or(usize::MAX)];
        self.file.write_all_at(&zeros, from)?;
        start_writeback(&self.file, from, to)?;
        self.prepared = to;
        Ok(())
    }

    /// Where the journal ends now.
    pub(crate) fn end(&self) -> End {
        End {
            file: self.file.clone(),
            len: self.size,
        }
    }
}

/// Writes `file`'s bytes `from..to` to the disk and waits for them: sled's own flush
/// (`SYNC_FILE_RANGE_WAIT_BEFORE | WRITE | WAIT_AFTER`), which survives a killed process
/// and the loss of the page cache, not the drive's own cache or the file's size after
/// power loss (`[storage] sync` covers those, with `fdatasync`).
pub(crate) fn sync_range(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    if to <= from {
        return Ok(());
    }
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    file_range(file, from, to, flags).unwrap_or_else(|| file.sync_data())
}

/// Starts writing `file`'s bytes `from..to` to the disk and returns (`sync_file_range`
/// with `SYNC_FILE_RANGE_WRITE` alone); where that is not supported, does nothing (the
/// kernel writes them in its own time).
fn start_writeback(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    file_range(file, from, to, libc::SYNC_FILE_RANGE_WRITE).unwrap_or(Ok(()))
}

/// `sync_file_range` over `file`'s bytes `from..to` with `flags`; `None` where it cannot
/// be used (a range past `i64`, a kernel without it), for the caller's fallback.
fn file_range(file: &File, from: u64, to: u64, flags: libc::c_uint) -> Option<std::io::Result<()>> {
    let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to.saturating_sub(from)))
    else {
        return None;
    };
    // SAFETY: a syscall on a descriptor `file` owns; it takes no pointers.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) } == 0 {
        return Some(Ok(()));
    }
    let err = std::io::Error::last_os_error();
    (err.raw_os_error() != Some(libc::ENOSYS)).then_some(Err(err))
}

/// Deletes every journal file (after a schema-4 database's interrupted group was
/// completed: under schema 4 a record past `m/group` was never applied, and must not be
/// replayed by the schema-5 rule).
pub(crate) fn clear(data_dir: &Path) -> std::io::Result<()> {
    for path in files(&data_dir.join(DIR))? {
        std::fs::remove_file(path)?;
    }
    Ok(())
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

/// The first group a journal file holds, from its name (`None` for a name that is not
/// one: such a file is read all the same).
fn first_group(path: &Path) -> Option<u64> {
    path.file_stem()?.to_str()?.parse().ok()
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

/// The groups after `after` in `data_dir/journal`, in order. The journal ends at the
/// last file's first record that is cut short or fails its checksum (a write the crash
/// interrupted: never acknowledged); records at or before `after` (a file left behind)
/// are skipped; zeros after a file's last record are its written-out tail ([`AHEAD`]).
/// A cut record in an earlier file (each is synced whole before the next starts), a
/// group missing after `after`, or a file whose name (its first group) is past the next
/// group expected (the records before it lost, read back as zeros or not at all) is an
/// `InvalidData` error: replaying past a hole would leave keys as no group left them.
pub(crate) fn read(data_dir: &Path, after: u64) -> std::io::Result<Vec<Group>> {
    let mut groups: Vec<Group> = Vec::new();
    let mut ended: Option<PathBuf> = None;
    for path in files(&data_dir.join(DIR))? {
        let expected = groups.last().map_or(after, |g| g.0) + 1;
        if let Some(first) = first_group(&path).filter(|first| *first > expected) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "journal group {expected} is missing ({} starts at group {first})",
                    path.display()
                ),
            ));
        }
        if let Some(cut) = &ended {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} ends in a cut or damaged record, yet {} follows it",
                    cut.display(),
                    path.display()
                ),
            ));
        }
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        let mut at = 0;
        while let Some((group, next)) = decode(&bytes, at) {
            at = next;
            if group.0 <= after {
                continue;
            }
            let expected = groups.last().map_or(after, |g| g.0) + 1;
            if group.0 != expected {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "journal group {expected} is missing (the next record found is group {}, in {})",
                        group.0,
                        path.display()
                    ),
                ));
            }
            groups.push(group);
        }
        // Zeros after the last record are the file written out ahead of its records
        // (`AHEAD`), not a cut: no record reads as zeros (a zero header says a body of
        // no bytes, which cannot hold the group's number).
        if bytes[at..].iter().any(|b| *b != 0) {
            ended = Some(path);
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

    /// Where a file's records end (what follows is written out ahead: zeros).
    fn records_end(bytes: &[u8]) -> usize {
        let mut at = 0;
        while let Some((_, next)) = decode(bytes, at) {
            at = next;
        }
        at
    }

    #[test]
    fn a_file_is_written_out_ahead_of_its_records_and_its_zeros_end_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::start(dir.path(), false, 0).expect("start");
        // Past the first stretch written ahead, and past the next.
        let group = writes(100, 100);
        let mut seq = 0;
        while j.size < 3 * AHEAD {
            seq += 1;
            j.append(seq, &group, 0).expect("append");
            let len = std::fs::metadata(&j.path).expect("metadata").len();
            assert!(
                len >= j.size + AHEAD / 2,
                "group {seq}: the file ({len} bytes) is not written out ahead of its records ({})",
                j.size
            );
        }
        let bytes = std::fs::read(&j.path).expect("read");
        assert_eq!(records_end(&bytes) as u64, j.size);
        assert!(bytes[records_end(&bytes)..].iter().all(|b| *b == 0));
        let back = read(dir.path(), 0).expect("read");
        assert_eq!(back.len() as u64, seq);
        assert!(back.iter().all(|g| g.1 == as_vec(&group)));
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
        let back = read(dir.path(), 10).expect("read");
        assert_eq!(
            back.iter().map(|g| g.0).collect::<Vec<_>>(),
            (11..=17).collect::<Vec<_>>()
        );
        assert!(back.iter().all(|g| g.1 == as_vec(&big)));
        // Once everything up to 17 is durable, the older file goes; the current one, which
        // holds the last groups, stays.
        j.append(18, &writes(3, 10), 17).expect("append");
        assert_eq!(files(&dir.path().join(DIR)).expect("files").len(), 1);
        let left: Vec<u64> = read(dir.path(), 15)
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
        let end = records_end(&whole);
        assert_eq!(read(dir.path(), 0).expect("read").len(), 2);
        for cut in [first + 1, first + HEADER, end - 1] {
            std::fs::write(&path, &whole[..cut]).expect("write");
            let back = read(dir.path(), 0).expect("read");
            assert_eq!(back.len(), 1, "cut at {cut}");
            assert_eq!(back[0].0, 1);
            // The same write cut short over the zeros written ahead.
            let mut torn = whole.clone();
            torn[cut..end].fill(0);
            std::fs::write(&path, &torn).expect("write");
            assert_eq!(read(dir.path(), 0).expect("read").len(), 1, "torn at {cut}");
        }
        let mut bad = whole.clone();
        let last = end - 1;
        bad[last] ^= 0xff;
        std::fs::write(&path, &bad).expect("write");
        assert_eq!(
            read(dir.path(), 0).expect("read").len(),
            1,
            "a checksum mismatch ends it"
        );
        // A fresh start deletes what was there; its file, named for group 3, holds nothing
        // yet, which is whole after group 2 and a hole after anything earlier.
        drop(Journal::start(dir.path(), false, 2).expect("start"));
        assert!(read(dir.path(), 2).expect("read").is_empty());
        let err = read(dir.path(), 0).expect_err("groups 1 and 2 are not there");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn reading_skips_checkpointed_groups_ends_at_a_cut_last_record_and_refuses_an_earlier_cut() {
        let seqs = |groups: Vec<Group>| groups.iter().map(|g| g.0).collect::<Vec<_>>();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::start(dir.path(), false, 0).expect("start");
        for seq in 1..=3 {
            j.append(seq, &writes(4, 10), 0).expect("append");
        }
        drop(j);
        // A second file, as rotation makes one: groups 4 and 5.
        let other = tempfile::tempdir().expect("tempdir");
        let mut k = Journal::start(other.path(), false, 3).expect("start");
        for seq in 4..=5 {
            k.append(seq, &writes(4, 10), 0).expect("append");
        }
        drop(k);
        let second = files(&other.path().join(DIR)).expect("files").remove(0);
        let name = second.file_name().expect("a name");
        std::fs::copy(&second, dir.path().join(DIR).join(name)).expect("copy");
        assert_eq!(
            seqs(read(dir.path(), 0).expect("read")),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(seqs(read(dir.path(), 2).expect("read")), vec![3, 4, 5]);
        // The last file's last record cut short (a crash in the middle of a write): the
        // journal ends before it.
        let last = files(&dir.path().join(DIR)).expect("files").remove(1);
        let whole = std::fs::read(&last).expect("read");
        std::fs::write(&last, &whole[..records_end(&whole) - 1]).expect("write");
        assert_eq!(seqs(read(dir.path(), 0).expect("read")), vec![1, 2, 3, 4]);
        // The earlier file was read through the zeros written ahead of its records.
        let first = files(&dir.path().join(DIR)).expect("files").remove(0);
        let whole = std::fs::read(&first).expect("read");
        assert!(whole.len() > records_end(&whole), "written out ahead");
        // A cut in an earlier file, which was whole before the next one started, is
        // damage: refused rather than replayed past, with or without zeros after it.
        let end = records_end(&whole);
        assert_ne!(
            whole[end - 1],
            0,
            "the last record ends in a byte zeroing changes"
        );
        for damaged in [whole[..end - 1].to_vec(), {
            let mut torn = whole.clone();
            torn[end - 1] = 0;
            torn
        }] {
            std::fs::write(&first, &damaged).expect("write");
            let err = read(dir.path(), 0).expect_err("refused");
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        }
        // The earlier file's last record read back as zeros (its blocks never reached the
        // disk): the file reads as ending cleanly after group 2, and the next one, named
        // for group 4, shows the hole.
        let last_start = {
            let mut at = 0;
            let mut start = 0;
            while let Some((_, next)) = decode(&whole, at) {
                start = at;
                at = next;
            }
            start
        };
        let mut zeroed = whole.clone();
        zeroed[last_start..end].fill(0);
        std::fs::write(&first, &zeroed).expect("write");
        let err = read(dir.path(), 0).expect_err("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("group 3 is missing"), "{err}");
    }
}
