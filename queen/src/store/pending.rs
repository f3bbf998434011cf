//! Writes durable in the journal and not yet in sled: the store's memtable.
//!
//! **Why.** Since schema 5 the journal makes a group commit durable, so sled is only where
//! the writes end up, read back at a restart. Writing each group to sled as it comes cost
//! the writer thread most of its time, and a task's life is five sled writes (the submit's
//! `a/` put, the grant's `a/` put, the finish's `a/` removal, `f/` and `t/`), the `a/` ones
//! on the busiest leaves (new ids append at one end, finished ones leave the other, so
//! sled splits and merges leaves all the time). Held here for a fraction of a second, a
//! key's writes fold into its last one: a task that starts and finishes within the window
//! never touches `a/` in sled at all (its removal finds nothing and writes nothing), and a
//! grant followed by its finish is one removal.
//!
//! **How.** The writer folds each group's final values into `fresh` (after appending the
//! group's record to the journal). The checkpoint thread, every
//! [`super::journal::CHECKPOINT_EVERY`] or once `fresh` holds [`APPLY_AT`] keys, moves
//! `fresh` to `applying` (under the lock, so it knows exactly which groups that is), writes
//! it to sled with no lock held, flushes sled, and only then empties `applying`. A reader
//! looks in `fresh`, then `applying`, then sled, so it sees every write the writer has
//! made: a key leaves `applying` only once sled holds its value. The writer waits while
//! `fresh` holds [`MAX_KEYS`] keys (sled falling behind), which bounds the memory.

use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use super::KeyWrites;

/// Keys waiting in `fresh` that make the checkpoint thread start at once.
pub(crate) const APPLY_AT: usize = 16_384;

/// Keys waiting in `fresh` past which the writer waits for the checkpoint thread: with a
/// batch being applied as well, at most about twice this (~30 MB) is held.
pub(crate) const MAX_KEYS: usize = 65_536;

#[derive(Default)]
struct Maps {
    /// Written since the last checkpoint began.
    fresh: KeyWrites,
    /// Being written to sled by the checkpoint in progress.
    applying: Arc<KeyWrites>,
    /// The last group folded into `fresh`.
    last_group: u64,
}

/// What the checkpoint thread is told.
#[derive(Default)]
struct Signals {
    /// `fresh` reached [`APPLY_AT`] keys.
    full: bool,
    /// The writer has stopped: a last checkpoint, then the thread ends.
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

    /// The pending writes to keys in `start..end`, in key order (a key's latest).
    pub(crate) fn range(&self, start: &[u8], end: &[u8]) -> KeyWrites {
        if start >= end {
            return KeyWrites::new();
        }
        let maps = self.read();
        let mut out: KeyWrites = maps
            .applying
            .range::<[u8], _>((
                std::ops::Bound::Included(start),
                std::ops::Bound::Excluded(end),
            ))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in maps.fresh.range::<[u8], _>((
            std::ops::Bound::Included(start),
            std::ops::Bound::Excluded(end),
        )) {
            out.insert(k.clone(), v.clone());
        }
        out
    }

    /// Folds group `seq`'s writes in (the writer, after the group's journal record). Waits
    /// while `fresh` is over [`MAX_KEYS`]; wakes the checkpoint thread at [`APPLY_AT`].
    pub(crate) fn add(&self, seq: u64, writes: KeyWrites) {
        let len = {
            let mut maps = self.write();
            maps.fresh.extend(writes);
            maps.last_group = seq;
            maps.fresh.len()
        };
        if len < APPLY_AT {
            return;
        }
        let mut signals = self.signals();
        signals.full = true;
        self.wake.notify_one();
        while !signals.stop && self.read().fresh.len() >= MAX_KEYS {
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

    /// Tells the checkpoint thread the writer has stopped (and frees a waiting writer).
    pub(crate) fn stop(&self) {
        self.signals().stop = true;
        self.wake.notify_one();
        self.room.notify_all();
    }

    /// Moves `fresh` to `applying` for the checkpoint thread to write to sled: returns
    /// the writes and the last group they hold, or `None` when nothing is waiting.
    pub(crate) fn take(&self) -> Option<(Arc<KeyWrites>, u64)> {
        let taken = {
            let mut maps = self.write();
            if maps.fresh.is_empty() {
                return None;
            }
            let fresh = std::mem::take(&mut maps.fresh);
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
        self.write().applying = Arc::new(KeyWrites::new());
    }
}

/// A stored row: key and value.
pub(crate) type Row = (Vec<u8>, Vec<u8>);

/// Merges pending writes (`over`, a key's latest) into rows read from sled, both in
/// ascending key order (or both descending, with `rev`): a pending write replaces sled's
/// row, a pending removal drops it. Stops after `limit` rows.
pub(crate) fn merge<E>(
    sled_rows: impl Iterator<Item = Result<Row, E>>,
    over: KeyWrites,
    rev: bool,
    limit: usize,
) -> Result<Vec<Row>, E> {
    let mut over: Vec<_> = over.into_iter().collect();
    if rev {
        over.reverse();
    }
    let mut over = over.into_iter().peekable();
    let mut sled_rows = sled_rows.peekable();
    let mut out = Vec::new();
    // `a` comes before `b` in the order of the walk.
    let before = |a: &[u8], b: &[u8]| if rev { a > b } else { a < b };
    while out.len() < limit {
        let from_sled = match (sled_rows.peek(), over.peek()) {
            (None, None) => break,
            (Some(Err(_)), _) => match sled_rows.next() {
                Some(Err(e)) => return Err(e),
                _ => unreachable!("peeked an error"),
            },
            (Some(Ok((sk, _))), Some((ok, _))) => {
                if sk == ok {
                    // The pending write wins; sled's row is stale.
                    sled_rows.next();
                    false
                } else {
                    before(sk, ok)
                }
            }
            (Some(Ok(_)), None) => true,
            (None, Some(_)) => false,
        };
        if from_sled {
            if let Some(Ok(row)) = sled_rows.next() {
                out.push(row);
            }
        } else if let Some((k, Some(v))) = over.next() {
            out.push((k, v));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(keys: &[(&str, &str)]) -> Vec<Result<Row, ()>> {
        keys.iter()
            .map(|(k, v)| Ok((k.as_bytes().to_vec(), v.as_bytes().to_vec())))
            .collect()
    }

    fn over(keys: &[(&str, Option<&str>)]) -> KeyWrites {
        keys.iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec())))
            .collect()
    }

    fn text(out: Vec<Row>) -> Vec<(String, String)> {
        out.into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8(k).expect("utf8"),
                    String::from_utf8(v).expect("utf8"),
                )
            })
            .collect()
    }

    #[test]
    fn pending_writes_replace_add_to_and_remove_sled_rows_in_either_order() {
        let sled = [("b", "old"), ("c", "gone"), ("e", "kept")];
        let pending = over(&[
            ("a", Some("new")),
            ("b", Some("newer")),
            ("c", None),
            ("d", Some("d")),
        ]);
        let want = vec![
            ("a".to_string(), "new".to_string()),
            ("b".into(), "newer".into()),
            ("d".into(), "d".into()),
            ("e".into(), "kept".into()),
        ];
        let forward = merge(rows(&sled).into_iter(), pending.clone(), false, 10).expect("merge");
        assert_eq!(text(forward), want);
        let backward =
            merge(rows(&sled).into_iter().rev(), pending.clone(), true, 10).expect("merge");
        let mut reversed = want.clone();
        reversed.reverse();
        assert_eq!(text(backward), reversed);
        // The limit counts rows given, not rows looked at.
        let two = merge(rows(&sled).into_iter(), pending, false, 2).expect("merge");
        assert_eq!(text(two), want[..2].to_vec());
    }

    #[test]
    fn an_error_from_sled_is_returned() {
        let mut sled = rows(&[("a", "1")]);
        sled.push(Err(()));
        assert_eq!(
            merge(sled.into_iter(), KeyWrites::new(), false, 10),
            Err(())
        );
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
        assert_eq!(
            p.range(b"a", b"z"),
            over(&[("gone", None), ("k", Some("2"))])
        );
        p.applied();
        assert_eq!(p.get(b"gone"), None, "in sled now");
        assert_eq!(p.get(b"k"), Some(Some(b"2".to_vec())));
        assert_eq!(p.take().map(|t| t.1), Some(2));
        p.applied();
        assert!(p.take().is_none());
    }
}
