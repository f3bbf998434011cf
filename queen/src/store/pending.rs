//! Writes durable in the journal and not yet in sled: the store's memtable.
//!
//! **Why.** Since schema 5 the journal makes a group commit durable, so sled is only where
//! the writes end up, read back at a restart. Writing each group to sled as it comes cost
//! the writer thread most of its time, and a task's life is five sled writes (the submit's
//! `a/` put, the grant's `a/` put, the finish's `a/` removal, `f/` and `t/`), the `a/` ones
//! on the busiest leaves (new ids append at one end, finished ones leave the other, so
//! sled splits and merges leaves all the time). Held here for up to a second, a
//! key's writes fold into its last one: a task that starts and finishes within the window
//! never touches `a/` in sled at all (its removal finds nothing and writes nothing), and a
//! grant followed by its finish is one removal.
//!
//! **How.** The writer folds each group's final values into `fresh` (after appending the
//! group's record to the journal). The checkpoint thread, every
//! [`super::journal::CHECKPOINT_EVERY`] or once `fresh` holds [`APPLY_AT`] keys or
//! [`APPLY_AT_BYTES`], moves `fresh` to `applying` (under the lock, so it knows exactly
//! which groups that is), has its sled thread write it to sled and flush with no lock held,
//! and only then empties `applying`. A reader
//! looks in `fresh`, then `applying`, then sled, so it sees every write the writer has
//! made: a key leaves `applying` only once sled holds its value. The writer waits while
//! `fresh` holds [`MAX_KEYS`] keys or [`MAX_BYTES`] (sled falling behind), which bounds
//! the memory. Ranges ([`scan`]) walk the pending writes a chunk at a time beside sled's
//! rows, never copying more than they give.

use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use super::KeyWrites;

/// Keys waiting in `fresh` that make the checkpoint thread start at once. High enough
/// that a burst of short-lived tasks is submitted, run and finished within one
/// checkpoint: its `a/` puts and their removals then fold away and never reach sled.
/// At 16,384 (schema 5's first cut) a 50,000-task burst split every task's put from its
/// removal, four sled writes a task (`a/` put, `a/` removal, `f/`, `t/`); at 131,072, 61 %
/// of that burst's tasks write two (`f/`, `t/`), ~2.8 a task.
/// The byte limits bound the memory; keys add the maps' own overhead (~100 bytes a key,
/// at most ~25 MiB a map at [`MAX_KEYS`]).
pub(crate) const APPLY_AT: usize = 131_072;

/// Bytes (keys and values) waiting in `fresh` that make the checkpoint thread start.
pub(crate) const APPLY_AT_BYTES: usize = 16 << 20;

/// Keys waiting in `fresh` past which the writer waits for the checkpoint thread.
pub(crate) const MAX_KEYS: usize = 262_144;

/// Bytes waiting in `fresh` past which the writer waits: with a batch being applied as
/// well, at most about twice this is held (plus the maps' own overhead, ~100 bytes a key).
pub(crate) const MAX_BYTES: usize = 64 << 20;

/// Pending entries a range reads under the lock at a time.
const CHUNK: usize = 256;

#[derive(Default)]
struct Maps {
    /// Written since the last checkpoint began.
    fresh: KeyWrites,
    /// Keys and values in `fresh`, in bytes.
    fresh_bytes: usize,
    /// Being written to sled by the checkpoint in progress.
    applying: Arc<KeyWrites>,
    /// The last group folded into `fresh`.
    last_group: u64,
    /// Counts the batches sled has taken (`applying` emptied): a range walking sled
    /// beside the pending writes starts sled's walk again when it moves.
    epoch: u64,
}

impl Maps {
    fn full(&self, keys: usize, bytes: usize) -> bool {
        self.fresh.len() >= keys || self.fresh_bytes >= bytes
    }
}

/// What the checkpoint thread is told.
#[derive(Default)]
struct Signals {
    /// `fresh` reached [`APPLY_AT`] keys or [`APPLY_AT_BYTES`].
    full: bool,
    /// The writer has stopped (or the checkpoint thread failed): a last checkpoint, then
    /// the thread ends; a writer waiting for room stops waiting.
    stop: bool,
}

/// The writes on their way to sled, shared by the writer, the checkpoint thread and the
/// readers.
#[derive(Default)]
pub(crate) struct Pending {
    maps: RwLock<Maps>,
    signals: Mutex<Signals>,
    /// Wakes the checkpoint thread.
    wake: Condvar,
    /// Wakes a writer waiting for room.
    room: Condvar,
}

/// Where a key stands before sled is asked: written (`Some(Some(v))`), removed
/// (`Some(None)`), or not pending (`None`).
pub(crate) type Lookup = Option<Option<Vec<u8>>>;

/// A pending write: key and value (`None`: removed).
type Write = (Vec<u8>, Option<Vec<u8>>);

impl Pending {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Maps> {
        // Nothing panics while holding the lock; a poisoned one holds whole maps.
        self.maps
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Maps> {
        self.maps
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn signals(&self) -> std::sync::MutexGuard<'_, Signals> {
        self.signals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The pending value of `k`, if any.
    pub(crate) fn get(&self, k: &[u8]) -> Lookup {
        let maps = self.read();
        maps.fresh.get(k).or_else(|| maps.applying.get(k)).cloned()
    }

    /// Up to `n` pending writes with keys in `start..end` past `after` (exclusive), in
    /// key order (descending with `rev`), a key's latest; and the epoch they were read in.
    fn chunk(
        &self,
        start: &[u8],
        end: &[u8],
        after: Option<&[u8]>,
        rev: bool,
        n: usize,
    ) -> (Vec<Write>, u64) {
        let bounds = bounds(start, end, after, rev);
        if start >= end || after.is_some_and(|a| (rev && a <= start) || (!rev && a >= end)) {
            return (Vec::new(), self.read().epoch);
        }
        let maps = self.read();
        let first = |map: &KeyWrites| -> Vec<Write> {
            let range = map.range::<[u8], _>(bounds);
            let pick = |(k, v): (&Vec<u8>, &Option<Vec<u8>>)| (k.clone(), v.clone());
            if rev {
                range.rev().take(n).map(pick).collect()
            } else {
                range.take(n).map(pick).collect()
            }
        };
        // The first `n` of the union are among the first `n` of each map.
        let (fresh, applying) = (first(&maps.fresh), first(&maps.applying));
        let epoch = maps.epoch;
        drop(maps);
        let mut out = Vec::with_capacity(n);
        let (mut f, mut a) = (
            fresh.into_iter().peekable(),
            applying.into_iter().peekable(),
        );
        while out.len() < n {
            let take_fresh = match (f.peek(), a.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((fk, _)), Some((ak, _))) => {
                    if fk == ak {
                        // The newer write wins.
                        a.next();
                        true
                    } else {
                        (fk < ak) != rev
                    }
                }
            };
            let next = if take_fresh { f.next() } else { a.next() };
            out.extend(next);
        }
        (out, epoch)
    }

    /// Folds group `seq`'s writes in (the writer, after the group's journal record). Waits
    /// while `fresh` is over [`MAX_KEYS`] or [`MAX_BYTES`]; wakes the checkpoint thread at
    /// [`APPLY_AT`] or [`APPLY_AT_BYTES`].
    pub(crate) fn add(&self, seq: u64, writes: KeyWrites) {
        let full = {
            let mut maps = self.write();
            let maps = &mut *maps;
            for (k, v) in writes {
                let (klen, vlen) = (k.len(), v.as_ref().map_or(0, Vec::len));
                maps.fresh_bytes = match maps.fresh.insert(k, v) {
                    // The key was counted already; its old value goes.
                    Some(old) => {
                        (maps.fresh_bytes + vlen).saturating_sub(old.as_ref().map_or(0, Vec::len))
                    }
                    None => maps.fresh_bytes + klen + vlen,
                };
            }
            maps.last_group = seq;
            maps.full(APPLY_AT, APPLY_AT_BYTES)
        };
        if !full {
            return;
        }
        let mut signals = self.signals();
        signals.full = true;
        self.wake.notify_one();
        while !signals.stop && self.read().full(MAX_KEYS, MAX_BYTES) {
            signals = self
                .room
                .wait(signals)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// The checkpoint thread: waits until `every` has passed, `fresh` is full or the
    /// writer stopped; returns whether it stopped.
    pub(crate) fn wait(&self, every: Duration) -> bool {
        let signals = self.signals();
        let (mut signals, _) = self
            .wake
            .wait_timeout_while(signals, every, |s| !s.full && !s.stop)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        signals.full = false;
        signals.stop
    }

    /// Tells the checkpoint thread the writer has stopped, and frees a writer waiting for
    /// room (after a failed checkpoint it writes nothing more).
    pub(crate) fn stop(&self) {
        self.signals().stop = true;
        self.wake.notify_one();
        self.room.notify_all();
    }

    /// Moves `fresh` to `applying` for the checkpoint to write to sled: returns
    /// the writes and the last group they hold, or `None` when nothing is waiting.
    pub(crate) fn take(&self) -> Option<(Arc<KeyWrites>, u64)> {
        let taken = {
            let mut maps = self.write();
            if maps.fresh.is_empty() {
                return None;
            }
            let fresh = std::mem::take(&mut maps.fresh);
            maps.fresh_bytes = 0;
            maps.applying = Arc::new(fresh);
            (maps.applying.clone(), maps.last_group)
        };
        // Room again: `fresh` is empty.
        let _signals = self.signals();
        self.room.notify_all();
        Some(taken)
    }

    /// Sled holds everything in `applying` now (flushed).
    pub(crate) fn applied(&self) {
        let done = {
            let mut maps = self.write();
            maps.epoch += 1;
            std::mem::replace(&mut maps.applying, Arc::new(KeyWrites::new()))
        };
        // Freed outside the lock: a checkpoint's map holds every key it wrote, and
        // freeing them one by one would hold up every read and the writer meanwhile.
        drop(done);
    }
}

/// The keys in `start..end` still to walk past `after` (the last key looked at), going up
/// or, with `rev`, down.
fn bounds<'k>(
    start: &'k [u8],
    end: &'k [u8],
    after: Option<&'k [u8]>,
    rev: bool,
) -> (std::ops::Bound<&'k [u8]>, std::ops::Bound<&'k [u8]>) {
    use std::ops::Bound::{Excluded, Included};
    match (after, rev) {
        (None, _) => (Included(start), Excluded(end)),
        (Some(a), false) => (Excluded(a), Excluded(end)),
        (Some(a), true) => (Included(start), Excluded(a)),
    }
}

/// Walks the rows with keys in `start..end` (descending with `rev`) as readers see them:
/// a pending write over sled's row, a pending removal hiding it. Calls `f` with each row
/// until it returns `false`, and gives at most `limit` rows. The pending writes are read
/// [`CHUNK`] at a time beside sled's lazy walk; when sled has taken a batch meanwhile (the
/// epoch moved), sled's walk starts again past the last row given, so a write that left
/// the pending ones for sled is not skipped.
pub(crate) fn scan<E: From<sled::Error>>(
    tree: &sled::Tree,
    pending: &Pending,
    start: &[u8],
    end: &[u8],
    rev: bool,
    limit: usize,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, E>,
) -> Result<(), E> {
    if start >= end {
        return Ok(());
    }
    type Walk<'t> =
        std::iter::Peekable<Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + 't>>;
    let walk_from = |after: Option<&[u8]>| -> Walk<'_> {
        let range = tree.range::<&[u8], _>(bounds(start, end, after, rev));
        let walk: Box<dyn Iterator<Item = _>> = if rev {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        walk.peekable()
    };
    let (first, mut epoch) = pending.chunk(start, end, None, rev, CHUNK);
    let mut more = first.len() == CHUNK;
    let mut buf: std::collections::VecDeque<Write> = first.into();
    let mut walk = walk_from(None);
    // The last key looked at, from either side.
    let mut last: Option<Vec<u8>> = None;
    let mut given = 0;
    while given < limit {
        if buf.is_empty() && more {
            let (next, now) = pending.chunk(start, end, last.as_deref(), rev, CHUNK);
            more = next.len() == CHUNK;
            buf = next.into();
            if now != epoch {
                epoch = now;
                walk = walk_from(last.as_deref());
            }
        }
        if let Some(Err(_)) = walk.peek() {
            if let Some(Err(e)) = walk.next() {
                return Err(e.into());
            }
        }
        let from_sled = match (walk.peek(), buf.front()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(Ok((sk, _))), Some((pk, _))) => {
                if sk.as_ref() == pk.as_slice() {
                    // The pending write is newer than sled's row.
                    walk.next();
                    false
                } else {
                    (sk.as_ref() < pk.as_slice()) != rev
                }
            }
            (Some(Err(_)), Some(_)) => true,
        };
        if from_sled {
            match walk.next() {
                Some(Ok((k, v))) => {
                    last = Some(k.to_vec());
                    given += 1;
                    if !f(&k, &v)? {
                        break;
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                None => {}
            }
        } else if let Some((k, v)) = buf.pop_front() {
            let keep_going = match &v {
                Some(v) => {
                    given += 1;
                    f(&k, v)?
                }
                None => true,
            };
            last = Some(k);
            if !keep_going {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn over(keys: &[(&str, Option<&str>)]) -> KeyWrites {
        keys.iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec())))
            .collect()
    }

    fn tree(rows: &[(&str, &str)]) -> sled::Tree {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let tree = db.open_tree("t").expect("tree");
        for (k, v) in rows {
            tree.insert(k.as_bytes(), v.as_bytes()).expect("insert");
        }
        tree
    }

    fn all(tree: &sled::Tree, p: &Pending, rev: bool, limit: usize) -> Vec<(String, String)> {
        let mut out = Vec::new();
        scan::<sled::Error>(tree, p, b"", b"\xff", rev, limit, |k, v| {
            out.push((
                String::from_utf8(k.to_vec()).expect("utf8"),
                String::from_utf8(v.to_vec()).expect("utf8"),
            ));
            Ok(true)
        })
        .expect("scan");
        out
    }

    /// `k00000`-style keys, in order.
    fn key(i: usize) -> String {
        format!("k{i:05}")
    }

    /// The number in a [`key`].
    fn index(k: &[u8]) -> usize {
        std::str::from_utf8(&k[1..])
            .expect("utf8")
            .parse()
            .expect("a number")
    }

    /// A tree holding the even keys below 1,000, each "sled".
    fn even_rows() -> sled::Tree {
        let rows: Vec<(String, String)> = (0..1_000)
            .step_by(2)
            .map(|i| (key(i), "sled".to_string()))
            .collect();
        let rows: Vec<(&str, &str)> = rows.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        tree(&rows)
    }

    /// What a checkpoint does: sled takes every pending write (all puts here), which
    /// leave the pending ones.
    fn checkpoint(p: &Pending, t: &sled::Tree) {
        let (taken, _) = p.take().expect("pending");
        for (k, v) in taken.iter() {
            t.insert(k.as_slice(), v.clone().expect("puts"))
                .expect("insert");
        }
        p.applied();
    }

    #[test]
    fn pending_writes_replace_add_to_and_remove_sled_rows_in_either_order() {
        let t = tree(&[("b", "old"), ("c", "gone"), ("e", "kept")]);
        let p = Pending::default();
        p.add(
            1,
            over(&[
                ("a", Some("new")),
                ("b", Some("newer")),
                ("c", None),
                ("d", Some("d")),
            ]),
        );
        let want = vec![
            ("a".to_string(), "new".to_string()),
            ("b".into(), "newer".into()),
            ("d".into(), "d".into()),
            ("e".into(), "kept".into()),
        ];
        assert_eq!(all(&t, &p, false, 10), want);
        let mut reversed = want.clone();
        reversed.reverse();
        assert_eq!(all(&t, &p, true, 10), reversed);
        // The limit counts rows given, not rows looked at.
        assert_eq!(all(&t, &p, false, 2), want[..2].to_vec());
        // A callback that says stop is obeyed.
        let mut seen = 0;
        scan::<sled::Error>(&t, &p, b"", b"\xff", false, 10, |_, _| {
            seen += 1;
            Ok(seen < 3)
        })
        .expect("scan");
        assert_eq!(seen, 3);
    }

    /// More pending writes than one chunk, interleaved with sled's rows, and a batch
    /// taken by sled in the middle of the walk: every row once, in order.
    #[test]
    fn a_walk_across_chunks_and_a_checkpoint_misses_and_repeats_nothing() {
        let t = even_rows();
        for rev in [false, true] {
            let p = Pending::default();
            // Odd keys pending, and every tenth even key overwritten.
            let mut w = KeyWrites::new();
            for i in 0..1_000 {
                if matches!(i % 10, 0 | 1 | 3 | 5 | 7 | 9) {
                    w.insert(key(i).into_bytes(), Some(b"pending".to_vec()));
                }
            }
            p.add(1, w.clone());
            let mut want: Vec<String> = (0..1_000).map(key).collect();
            if rev {
                want.reverse();
            }
            let mut got = Vec::new();
            scan::<sled::Error>(&t, &p, b"", b"\xff", rev, usize::MAX, |k, v| {
                got.push(String::from_utf8(k.to_vec()).expect("utf8"));
                let i = index(k);
                let pending = matches!(i % 10, 0 | 1 | 3 | 5 | 7 | 9);
                assert_eq!(v == b"pending", pending, "{i}");
                if got.len() == 300 {
                    checkpoint(&p, &t);
                }
                Ok(true)
            })
            .expect("scan");
            assert_eq!(got, want, "rev {rev}");
            // Put the tree back for the other direction.
            for (k, _) in w {
                if index(&k) % 2 == 1 {
                    t.remove(&k).expect("remove");
                } else {
                    t.insert(&k, b"sled").expect("insert");
                }
            }
        }
    }

    /// sled's walk holds the leaf it is reading: a pending write that reaches sled while
    /// the walk is past it in that leaf, and is no longer pending when the next chunk is
    /// read, is seen only because the walk starts again.
    #[test]
    fn a_write_that_moves_to_sled_just_past_a_chunk_is_seen() {
        let t = even_rows();
        let p = Pending::default();
        // 256 odd keys, one chunk, then the 257th.
        let w: KeyWrites = (1..=2 * CHUNK + 1)
            .step_by(2)
            .map(|i| (key(i).into_bytes(), Some(b"pending".to_vec())))
            .collect();
        assert_eq!(w.len(), CHUNK + 1);
        p.add(1, w);
        let mut got = Vec::new();
        scan::<sled::Error>(&t, &p, b"", b"\xff", false, usize::MAX, |k, _| {
            got.push(String::from_utf8(k.to_vec()).expect("utf8"));
            if k == key(2 * CHUNK - 2).as_bytes() {
                checkpoint(&p, &t);
            }
            Ok(true)
        })
        .expect("scan");
        let want: Vec<String> = (0..1_000)
            .filter(|i| i % 2 == 0 || *i <= 2 * CHUNK + 1)
            .map(key)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn readers_see_fresh_then_applying_and_nothing_once_applied() {
        let p = Pending::default();
        p.add(1, over(&[("k", Some("1")), ("gone", None)]));
        assert_eq!(p.get(b"k"), Some(Some(b"1".to_vec())));
        assert_eq!(p.get(b"gone"), Some(None));
        assert_eq!(p.get(b"other"), None);
        let (taken, last) = p.take().expect("something to apply");
        assert_eq!(last, 1);
        assert_eq!(taken.len(), 2);
        // While it is applied, a newer write shadows it.
        p.add(2, over(&[("k", Some("2"))]));
        assert_eq!(p.get(b"k"), Some(Some(b"2".to_vec())));
        assert_eq!(p.get(b"gone"), Some(None), "still applying");
        p.applied();
        assert_eq!(p.get(b"gone"), None, "in sled now");
        assert_eq!(p.get(b"k"), Some(Some(b"2".to_vec())));
        assert_eq!(p.take().map(|t| t.1), Some(2));
        p.applied();
        assert!(p.take().is_none());
    }

    #[test]
    fn fresh_is_counted_in_bytes_and_a_big_one_wakes_the_checkpoint() {
        let p = Pending::default();
        p.add(1, over(&[("k", Some("12345"))]));
        assert_eq!(p.read().fresh_bytes, 6);
        p.add(2, over(&[("k", Some("1")), ("j", None)]));
        assert_eq!(p.read().fresh_bytes, 3, "an overwrite counts the key once");
        assert!(!p.signals().full);
        let big = vec![b'x'; APPLY_AT_BYTES];
        p.add(3, [(b"big".to_vec(), Some(big))].into_iter().collect());
        assert!(p.signals().full, "bytes alone fill it");
        let asked = std::time::Instant::now();
        assert!(!p.wait(Duration::from_secs(60)), "not stopped");
        assert!(
            asked.elapsed() < Duration::from_secs(30),
            "a full `fresh` wakes the checkpoint thread at once"
        );
        assert!(!p.signals().full, "the wake is taken");
    }
}
