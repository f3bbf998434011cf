//! The task kinds this drone has code for. `policy.kinds` picks which of them it runs and
//! announces in its hello; the queen routes a task only to a drone that announced its kind.
//! A leaf: the names live here so the policy, the config and the executor all read them
//! from one place.

use std::fmt;

/// A built-in kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Completes at once with its payload as the result; no process.
    Echo,
    /// Runs a program (see `executor::ExecSpec`) through the drone's process supervisor.
    Exec,
}

impl Kind {
    /// Every kind, in the order a hello lists them.
    pub const ALL: [Kind; 2] = [Kind::Echo, Kind::Exec];

    /// The name on the wire and in config files.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Echo => "echo",
            Kind::Exec => "exec",
        }
    }

    /// The kind a name means, if this drone has code for it.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Every kind's name, in [`Kind::ALL`] order.
    pub fn names() -> [&'static str; 2] {
        Kind::ALL.map(Kind::name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_kinds_map_both_ways() {
        for kind in Kind::ALL {
            assert_eq!(Kind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(Kind::names(), ["echo", "exec"]);
        assert_eq!(Kind::from_name("teleport"), None);
        assert_eq!(Kind::from_name("Echo"), None, "names are exact");
    }
}
