//! Which queen to dial next, and whether a queen that welcomed the drone is one to stay
//! with. Queens that share a database run as one leader and standbys; the drone is given
//! their addresses and finds the leader among them.
//!
//! A **round** tries each address once, in order: the queen that last welcomed this drone
//! first (it most likely still leads), then the given addresses. Within a round the drone
//! moves on at once, so a failover costs one failed connect, not a backoff period; the
//! connection loop backs off only between rounds. A standby that rejects the drone may
//! name the leader: that address is dialled next, even if it was not given, unless it
//! was already tried in this round (two standbys naming each other must not bounce the
//! drone between them without a pause).
//!
//! The **epoch** is the leader's term: it grows with every failover. The drone keeps the
//! highest epoch it was welcomed in; a queen that welcomes it in an older one is a deposed
//! leader that has not noticed yet, and the drone leaves it.
//!
//! Between rounds the drone backs off, growing, while queens are unreachable; but a round
//! in which a queen answered that it is a standby, or welcomed the drone as a deposed
//! leader, means the queens are up and an election is in progress or just over: the next
//! round comes after a short fixed pause (see [`Queens::round_met_a_standby`]), since the
//! new leader keeps the drone's running tasks only for its heartbeat timeout.
//!
//! A queen the drone left because it went **silent** (welcomed with pongs, then nothing
//! for the heartbeat timeout: frozen, its kernel still accepting bytes) is dialled last in
//! the following rounds, until it welcomes the drone again: a frozen queen still completes
//! a connect and would hold the drone for its whole welcome timeout.
//!
//! Pure (no I/O, no clock), so the order is unit-tested; [`crate::client`] asks for the
//! next address and says what happened.

use std::collections::VecDeque;

use crate::config::{QueenAddr, QueenAddrs};

/// What the drone makes of a welcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Stay: the queen leads in the newest term this drone knows of, or gave no term (a
    /// single queen).
    Leader,
    /// Leave: the queen welcomed the drone in term `theirs`, older than the term `seen`
    /// it was already welcomed in. A deposed leader; its leases are not the real ones.
    Deposed { theirs: u64, seen: u64 },
}

/// The queens' addresses and where the drone is in trying them.
#[derive(Debug, Clone)]
pub struct Queens {
    given: QueenAddrs,
    /// The address that last welcomed this drone (given, or named by a standby).
    last_welcomed: Option<QueenAddr>,
    /// This round's addresses not yet dialled, in order.
    round: VecDeque<QueenAddr>,
    /// This round's addresses already dialled.
    tried: Vec<QueenAddr>,
    /// The highest epoch this drone was welcomed in.
    epoch: Option<u64>,
    /// A queen in this round said it is a standby, or was a deposed leader.
    met_standby: bool,
    /// The queen last left for going silent: dialled last.
    silent: Option<QueenAddr>,
}

impl Queens {
    pub fn new(given: QueenAddrs) -> Self {
        let mut queens = Queens {
            given,
            last_welcomed: None,
            round: VecDeque::new(),
            tried: Vec::new(),
            epoch: None,
            met_standby: false,
            silent: None,
        };
        queens.start_round();
        queens
    }

    /// Begins a round: the queen that last welcomed this drone, then every given address
    /// in order, each once; a queen that went silent last.
    pub fn start_round(&mut self) {
        self.tried.clear();
        self.round.clear();
        self.met_standby = false;
        for addr in self.last_welcomed.iter().chain(self.given.as_slice()) {
            if !self.round.contains(addr) && self.silent.as_ref() != Some(addr) {
                self.round.push_back(addr.clone());
            }
        }
        if let Some(silent) = &self.silent {
            self.round.push_back(silent.clone());
        }
    }

    /// A queen of this round refused the drone as a standby (`not_leader`), or welcomed it
    /// as a deposed leader.
    pub fn standby_answered(&mut self) {
        self.met_standby = true;
    }

    /// Whether a queen of this round was a standby or a deposed leader: the queens are up
    /// and choosing a leader, so the next round should come soon, not after a backoff.
    pub fn round_met_a_standby(&self) -> bool {
        self.met_standby
    }

    /// The queen at `addr` welcomed the drone with pongs and then went silent: no longer
    /// the first to dial; the last, until it welcomes the drone again.
    pub fn went_silent(&mut self, addr: &QueenAddr) {
        if self.last_welcomed.as_ref() == Some(addr) {
            self.last_welcomed = None;
        }
        self.silent = Some(addr.clone());
    }

    /// The next address to dial in this round; `None` once every one was tried (back off,
    /// then [`Self::start_round`]).
    pub fn dial_next(&mut self) -> Option<QueenAddr> {
        let addr = self.round.pop_front()?;
        self.tried.push(addr.clone());
        Some(addr)
    }

    /// A standby named `leader`: dial it next. False (and nothing changes) when it was
    /// already dialled in this round, or is the queen this drone left for going silent: a
    /// standby learns of a new leader only once the old one's lease lapses, so for a
    /// while it names the frozen queen the drone just left, which would hold the drone
    /// for a whole welcome timeout.
    pub fn leader_named(&mut self, leader: QueenAddr) -> bool {
        if self.tried.contains(&leader) || self.silent.as_ref() == Some(&leader) {
            return false;
        }
        self.round.retain(|a| *a != leader);
        self.round.push_front(leader);
        true
    }

    /// The queen at `addr` welcomed this drone in `epoch`: stay, or leave a deposed leader.
    /// Only a welcome the drone stays with raises the epoch it remembers.
    pub fn welcomed(&mut self, addr: &QueenAddr, epoch: Option<u64>) -> Verdict {
        if let (Some(theirs), Some(seen)) = (epoch, self.epoch) {
            if theirs < seen {
                return Verdict::Deposed { theirs, seen };
            }
        }
        self.epoch = self.epoch.max(epoch);
        if self.silent.as_ref() == Some(addr) {
            self.silent = None;
        }
        self.last_welcomed = Some(addr.clone());
        Verdict::Leader
    }

    /// The highest epoch this drone was welcomed in.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> QueenAddr {
        match QueenAddr::parse(text) {
            Ok(a) => a,
            Err(e) => panic!("bad test address: {e}"),
        }
    }

    fn queens(text: &str) -> Queens {
        match QueenAddrs::parse(text) {
            Ok(a) => Queens::new(a),
            Err(e) => panic!("bad test addresses: {e}"),
        }
    }

    /// The rest of the round, dialled one after another.
    fn drain(q: &mut Queens) -> Vec<String> {
        std::iter::from_fn(|| q.dial_next().map(|a| a.to_string())).collect()
    }

    #[test]
    fn a_round_tries_each_given_address_once_in_order() {
        let mut q = queens("a:1,b:2,c:3");
        assert_eq!(drain(&mut q), ["a:1", "b:2", "c:3"]);
        assert_eq!(q.dial_next(), None, "a round ends; the caller backs off");
        q.start_round();
        assert_eq!(drain(&mut q), ["a:1", "b:2", "c:3"]);
    }

    #[test]
    fn a_single_address_is_a_round_of_one() {
        let mut q = queens("queen:8080");
        assert_eq!(drain(&mut q), ["queen:8080"]);
        q.start_round();
        assert_eq!(drain(&mut q), ["queen:8080"]);
    }

    #[test]
    fn the_queen_that_last_welcomed_the_drone_comes_first() {
        let mut q = queens("a:1,b:2,c:3");
        assert_eq!(q.welcomed(&addr("b:2"), Some(1)), Verdict::Leader);
        q.start_round();
        assert_eq!(drain(&mut q), ["b:2", "a:1", "c:3"]);
        // Also one it was never given but a standby named.
        assert_eq!(q.welcomed(&addr("d:4"), Some(2)), Verdict::Leader);
        q.start_round();
        assert_eq!(drain(&mut q), ["d:4", "a:1", "b:2", "c:3"]);
    }

    #[test]
    fn a_named_leader_is_dialled_next_even_if_not_given() {
        let mut q = queens("a:1,b:2,c:3");
        assert_eq!(q.dial_next(), Some(addr("a:1")));
        assert!(q.leader_named(addr("c:3")));
        assert_eq!(drain(&mut q), ["c:3", "b:2"], "c once, before b");

        q.start_round();
        assert_eq!(q.dial_next(), Some(addr("a:1")));
        assert!(q.leader_named(addr("z:9")));
        assert_eq!(drain(&mut q), ["z:9", "b:2", "c:3"]);
        // A leader named once is not kept: the next round is the given list again.
        q.start_round();
        assert_eq!(drain(&mut q), ["a:1", "b:2", "c:3"]);
    }

    #[test]
    fn a_standby_naming_the_queen_that_went_silent_is_not_followed() {
        let mut q = queens("a:1,b:2");
        q.start_round();
        assert_eq!(q.dial_next(), Some(addr("a:1")));
        q.went_silent(&addr("a:1"));
        q.start_round();
        assert_eq!(q.dial_next(), Some(addr("b:2")));
        // b is a standby whose view of the lease still names a.
        assert!(!q.leader_named(addr("a:1")));
        assert_eq!(drain(&mut q), vec!["a:1"], "a stays last");
    }

    #[test]
    fn standbys_naming_each_other_do_not_loop_within_a_round() {
        let mut q = queens("a:1,b:2");
        assert_eq!(q.dial_next(), Some(addr("a:1")));
        assert!(q.leader_named(addr("b:2")));
        assert_eq!(q.dial_next(), Some(addr("b:2")));
        assert!(!q.leader_named(addr("a:1")), "a was dialled in this round");
        assert_eq!(q.dial_next(), None);
        // Itself named as the leader by a confused standby: no second try either.
        q.start_round();
        assert_eq!(q.dial_next(), Some(addr("a:1")));
        assert!(!q.leader_named(addr("a:1")));
        assert_eq!(drain(&mut q), ["b:2"]);
    }

    #[test]
    fn an_older_epoch_is_a_deposed_leader_and_changes_nothing() {
        let mut q = queens("a:1,b:2");
        assert_eq!(q.welcomed(&addr("a:1"), Some(5)), Verdict::Leader);
        assert_eq!(
            q.welcomed(&addr("b:2"), Some(3)),
            Verdict::Deposed { theirs: 3, seen: 5 }
        );
        assert_eq!(q.epoch(), Some(5));
        q.start_round();
        assert_eq!(
            q.dial_next(),
            Some(addr("a:1")),
            "b did not become the first"
        );

        // The same term again (a reconnect to the same leader) and newer ones are fine.
        assert_eq!(q.welcomed(&addr("a:1"), Some(5)), Verdict::Leader);
        assert_eq!(q.welcomed(&addr("b:2"), Some(6)), Verdict::Leader);
        assert_eq!(q.epoch(), Some(6));
        assert_eq!(
            q.welcomed(&addr("a:1"), Some(5)),
            Verdict::Deposed { theirs: 5, seen: 6 }
        );
    }

    #[test]
    fn a_queen_without_an_epoch_is_taken_and_forgets_nothing() {
        let mut q = queens("a:1");
        assert_eq!(q.welcomed(&addr("a:1"), None), Verdict::Leader);
        assert_eq!(q.epoch(), None);
        assert_eq!(q.welcomed(&addr("a:1"), Some(2)), Verdict::Leader);
        assert_eq!(q.welcomed(&addr("a:1"), None), Verdict::Leader);
        assert_eq!(
            q.epoch(),
            Some(2),
            "a single queen's welcome keeps the term"
        );
        assert_eq!(
            q.welcomed(&addr("a:1"), Some(1)),
            Verdict::Deposed { theirs: 1, seen: 2 }
        );
    }

    #[test]
    fn a_round_remembers_whether_a_standby_answered_until_the_next() {
        let mut q = queens("a:1,b:2");
        assert!(!q.round_met_a_standby());
        q.dial_next();
        q.standby_answered();
        q.dial_next();
        assert!(
            q.round_met_a_standby(),
            "a standby and then an unreachable queen"
        );
        q.start_round();
        assert!(!q.round_met_a_standby(), "a new round starts clean");
    }

    #[test]
    fn a_queen_that_went_silent_is_dialled_last_until_it_welcomes_again() {
        let mut q = queens("a:1,b:2,c:3");
        assert_eq!(q.welcomed(&addr("a:1"), Some(1)), Verdict::Leader);
        q.went_silent(&addr("a:1"));
        q.start_round();
        assert_eq!(drain(&mut q), ["b:2", "c:3", "a:1"]);
        q.start_round();
        assert_eq!(drain(&mut q), ["b:2", "c:3", "a:1"], "still last");
        assert_eq!(q.welcomed(&addr("a:1"), Some(1)), Verdict::Leader);
        q.start_round();
        assert_eq!(drain(&mut q), ["a:1", "b:2", "c:3"]);
    }
}
