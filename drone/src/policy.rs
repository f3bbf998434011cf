//! What this host lets tasks do: the `[policy]` section of the drone config.
//!
//! A drone runs whatever its queen assigns, so whoever can talk to the queen can run code
//! on every host with a drone. The policy is the host's own say in that: which kinds it
//! runs, which programs `exec` may start, as which user, in which directory, and with
//! which environment. A hostile queen can still send anything; the checks here run on the
//! drone, against every assignment.
//!
//! Validation runs once, at start ([`Policy::resolve`]); the per-task checks
//! ([`Policy::check_kind`], [`Policy::allowed_program`], [`Policy::task_env`]) are pure
//! apart from resolving paths in the file system, and the executor applies them before
//! anything is spawned. The rules only: users live in [`crate::identity`], work
//! directories in [`crate::workdir`], the `PATH` search in [`crate::program`], the
//! environment's names in [`crate::env`].

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use shared::ids::Secret;

use crate::env::{LEASE_ENV, LOADER_ENV, TASK_LANG, TOKEN_ENV};
use crate::identity::{identity_to_switch_to, lookup_user, Identity};
use crate::kind::Kind;
use crate::program::{find_in_path, locate_program};

/// Here too because `effective_uid` decides what `run_as` may be (see [`Policy::resolve`]).
pub use crate::identity::effective_uid;

/// The `PATH` tasks get when `task_path` is not set: the standard system directories and
/// nothing from the drone's own environment (which may point into a deploy tool's or a
/// user's directories).
pub const DEFAULT_TASK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Characters that would make an `allowed_programs` entry look like a pattern. Entries are
/// exact, so these are refused rather than silently matched literally.
const GLOB_CHARS: [char; 4] = ['*', '?', '[', ']'];

/// The `[policy]` section as written in the config file. Every key is optional; see
/// `config/drone.toml` for what each means.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_programs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_root: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_passthrough: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, Secret>>,
}

/// The policy the drone enforces, validated and resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// The built-in kinds this drone runs and announces in its hello, in [`Kind::ALL`]
    /// order. An assignment of any other built-in kind fails permanently.
    pub kinds: Vec<String>,
    /// The pool kinds (handled by worker pools, see `crate::pool`) `policy.kinds` allows:
    /// `None` when `policy.kinds` is unset (a pool may handle any kind), otherwise the
    /// listed names that are not built-in kinds, each of which some pool must handle.
    pub pool_kinds: Option<Vec<String>>,
    /// The canonical paths `exec` may run. Empty means any program.
    pub allowed_programs: BTreeSet<PathBuf>,
    /// Whom tasks run as; `None` means the drone's own user.
    pub run_as: Option<Identity>,
    /// Where each attempt gets a fresh directory; `None` runs tasks in the payload's `cwd`
    /// (or the drone's own).
    pub work_root: Option<PathBuf>,
    /// The `PATH` tasks start with, and where bare `allowed_programs` names were looked up.
    pub task_path: String,
    /// Variables copied from the drone's environment into every task's, when set.
    pub env_passthrough: Vec<String>,
    /// Fixed variables for every task; the payload cannot override them.
    pub env: BTreeMap<String, Secret>,
}

impl Default for Policy {
    /// What an empty `[policy]` means: every kind, any program, the drone's user, no
    /// sandbox directory, and a minimal environment.
    fn default() -> Self {
        Policy {
            kinds: Kind::names().map(str::to_owned).to_vec(),
            pool_kinds: None,
            allowed_programs: BTreeSet::new(),
            run_as: None,
            work_root: None,
            task_path: DEFAULT_TASK_PATH.to_owned(),
            env_passthrough: Vec::new(),
            env: BTreeMap::new(),
        }
    }
}

/// A `[policy]` value that cannot be used; `key` names it as it appears in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{key}`: {message}")]
pub struct PolicyError {
    pub key: &'static str,
    pub message: String,
}

fn invalid(key: &'static str, message: impl Into<String>) -> PolicyError {
    PolicyError {
        key,
        message: message.into(),
    }
}

impl Policy {
    /// Validates the section against this host: looks `run_as` up in the passwd database
    /// and checks that this process may switch to it, and resolves `allowed_programs` to
    /// the files they name.
    pub fn resolve(file: PolicyFile) -> Result<Policy, PolicyError> {
        Self::resolve_as(file, effective_uid(), lookup_user)
    }

    /// [`Policy::resolve`] with the process's user and the user database given, so both
    /// sides of the root check are unit-tested.
    pub fn resolve_as(
        file: PolicyFile,
        euid: libc::uid_t,
        lookup: impl Fn(&str) -> Result<Identity, String>,
    ) -> Result<Policy, PolicyError> {
        let (kinds, pool_kinds) =
            resolve_kinds(file.kinds).map_err(|m| invalid("policy.kinds", m))?;

        let task_path = file
            .task_path
            .unwrap_or_else(|| DEFAULT_TASK_PATH.to_owned());
        check_task_path(&task_path).map_err(|m| invalid("policy.task_path", m))?;

        let allowed_programs = resolve_allowlist(
            file.allowed_programs.as_deref().unwrap_or_default(),
            &task_path,
        )
        .map_err(|m| invalid("policy.allowed_programs", m))?;

        let run_as = match file.run_as {
            None => None,
            Some(spec) => {
                let wanted = if spec.trim().is_empty() {
                    Err("must name a user (or a uid), got an empty string".to_owned())
                } else {
                    lookup(&spec)
                };
                wanted
                    .and_then(|id| identity_to_switch_to(euid, id))
                    .map_err(|m| invalid("policy.run_as", m))?
            }
        };

        let work_root = match file.work_root {
            Some(root) if !root.is_absolute() => {
                return Err(invalid(
                    "policy.work_root",
                    format!("must be an absolute path, got `{}`", root.display()),
                ))
            }
            other => other,
        };

        let mut env_passthrough = Vec::new();
        for name in file.env_passthrough.unwrap_or_default() {
            check_config_env_name(&name).map_err(|m| invalid("policy.env_passthrough", m))?;
            if !env_passthrough.contains(&name) {
                env_passthrough.push(name);
            }
        }

        let env = file.env.unwrap_or_default();
        for (name, value) in &env {
            check_config_env_name(name).map_err(|m| invalid("policy.env", m))?;
            if value.0.contains('\0') {
                return Err(invalid(
                    "policy.env",
                    format!("the value of `{name}` contains a NUL byte"),
                ));
            }
        }

        Ok(Policy {
            kinds,
            pool_kinds,
            allowed_programs,
            run_as,
            work_root,
            task_path,
            env_passthrough,
            env,
        })
    }

    /// Whether this drone runs `kind`. The error is what the queen records: a kind outside
    /// `policy.kinds` is refused by name, one the drone has no code for is unsupported.
    pub fn check_kind(&self, kind: &str) -> Result<(), String> {
        if self.kinds.iter().any(|k| k == kind) {
            Ok(())
        } else if Kind::from_name(kind).is_some() {
            Err(format!(
                "kind {kind} is not allowed on this drone (policy.kinds = {:?})",
                self.kinds
            ))
        } else {
            Err(format!("kind {kind} is not supported by this drone"))
        }
    }

    /// The program to start for a task's `cmd[0]`: `Ok(None)` to start it as given (no
    /// allowlist), `Ok(Some(path))` for the canonical path that the allowlist approved,
    /// which is what must then be executed (so a symlink swapped after the check changes
    /// nothing). `cwd` is where a relative `program` is looked up, `path` the task's PATH.
    pub fn allowed_program(
        &self,
        program: &str,
        cwd: &Path,
        path: Option<&OsStr>,
    ) -> Result<Option<PathBuf>, String> {
        if self.allowed_programs.is_empty() {
            return Ok(None);
        }
        let resolved = locate_program(program, cwd, path)?;
        if self.allowed_programs.contains(&resolved) {
            Ok(Some(resolved))
        } else {
            Err(format!(
                "program `{program}` (resolved to `{}`) is not in policy.allowed_programs",
                resolved.display()
            ))
        }
    }

    /// Refuses payload variables that would let a task run code other than an allowed
    /// program. Without an allowlist a task may run anything anyway, so nothing is refused.
    pub fn check_payload_env(&self, env: &BTreeMap<String, String>) -> Result<(), String> {
        if self.allowed_programs.is_empty() {
            return Ok(());
        }
        match env
            .keys()
            .find(|k| k.starts_with("LD_") || LOADER_ENV.contains(&k.as_str()))
        {
            Some(name) => Err(format!(
                "invalid exec payload: env variable `{name}` is refused on this drone \
                 (policy.allowed_programs is set, and `{name}` can make an allowed program \
                 load other code)"
            )),
            None => Ok(()),
        }
    }

    /// The complete environment of a task, lowest precedence first: the minimal base
    /// (`PATH`, `LANG`, `HOME` when the task has a work directory), the passthrough
    /// variables the drone has (`drone_env` looks them up), the payload's `env`, the
    /// config's fixed `env`, and the lease variables, which nothing overrides. Nothing else
    /// of the drone's environment is included; in particular never its token.
    pub fn task_env(
        &self,
        home: Option<&Path>,
        payload: &BTreeMap<String, String>,
        lease: &[(&str, OsString)],
        drone_env: impl Fn(&str) -> Option<OsString>,
    ) -> BTreeMap<String, OsString> {
        let mut env = BTreeMap::new();
        env.insert("PATH".to_owned(), OsString::from(&self.task_path));
        env.insert("LANG".to_owned(), OsString::from(TASK_LANG));
        if let Some(home) = home {
            env.insert("HOME".to_owned(), home.as_os_str().to_owned());
        }
        for name in &self.env_passthrough {
            // Validation refuses the token; checked again because leaking it would hand
            // every task the key to the queen.
            if name == TOKEN_ENV {
                continue;
            }
            if let Some(value) = drone_env(name) {
                env.insert(name.clone(), value);
            }
        }
        for (name, value) in payload {
            env.insert(name.clone(), OsString::from(value));
        }
        for (name, value) in &self.env {
            env.insert(name.clone(), OsString::from(&value.0));
        }
        for (name, value) in lease {
            env.insert((*name).to_owned(), value.clone());
        }
        env
    }

    /// What an operator should hear at start about how open this drone is.
    pub fn startup_warnings(&self, euid: libc::uid_t) -> Vec<String> {
        let mut warnings = Vec::new();
        if !self.kinds.iter().any(|k| k == Kind::Exec.name()) {
            return warnings;
        }
        if self.allowed_programs.is_empty() {
            warnings.push(
                "exec tasks may run any program (policy.allowed_programs is empty): whoever \
                 can submit tasks to the queen can run code on this host"
                    .to_owned(),
            );
        }
        let task_uid = self.run_as.as_ref().map_or(euid, |u| u.uid);
        if task_uid == 0 {
            warnings.push(
                "exec tasks run as root (set policy.run_as to an unprivileged user)".to_owned(),
            );
        }
        warnings
    }
}

/// The kinds to run: every built-in one (and any pool kind) when unset; otherwise the
/// listed built-in ones, and the listed other names as the only kinds pools may handle
/// (checked against what the pools announce when they start).
type ResolvedKinds = (Vec<String>, Option<Vec<String>>);

fn resolve_kinds(listed: Option<Vec<String>>) -> Result<ResolvedKinds, String> {
    let all = Kind::names();
    let Some(listed) = listed else {
        return Ok((all.map(str::to_owned).to_vec(), None));
    };
    if listed.is_empty() {
        return Err(format!(
            "must list at least one kind (leave it out to run every kind: {all:?} and \
             whatever the worker pools handle)"
        ));
    }
    if let Some(bad) = listed.iter().find(|k| k.trim().is_empty() || k.len() > 200) {
        return Err(format!("`{bad}` is not a kind name (1 to 200 bytes)"));
    }
    let built_in = all
        .iter()
        .filter(|k| listed.iter().any(|l| l == *k))
        .map(|k| (*k).to_owned())
        .collect();
    let mut pool_kinds: Vec<String> = Vec::new();
    for name in listed.into_iter().filter(|k| Kind::from_name(k).is_none()) {
        if !pool_kinds.contains(&name) {
            pool_kinds.push(name);
        }
    }
    Ok((built_in, Some(pool_kinds)))
}

fn check_task_path(task_path: &str) -> Result<(), String> {
    if task_path.is_empty() {
        return Err("must list at least one directory".to_owned());
    }
    if task_path.contains('\0') {
        return Err("contains a NUL byte".to_owned());
    }
    // An empty or relative entry would search the task's working directory, where
    // whatever the task (or an earlier one) wrote could shadow a system program.
    if let Some(bad) = task_path.split(':').find(|d| !d.starts_with('/')) {
        return Err(format!(
            "every entry must be an absolute directory, got `{bad}` in `{task_path}`"
        ));
    }
    Ok(())
}

/// The canonical path of each allowlist entry: absolute paths as they are, bare names
/// looked up in `task_path`, both with symlinks resolved.
fn resolve_allowlist(entries: &[String], task_path: &str) -> Result<BTreeSet<PathBuf>, String> {
    let mut allowed = BTreeSet::new();
    for entry in entries {
        if entry.is_empty() || entry.contains('\0') {
            return Err(format!("entry {entry:?} is not a program"));
        }
        if entry.contains(GLOB_CHARS) {
            return Err(format!(
                "entry `{entry}` looks like a pattern; entries are exact paths or names"
            ));
        }
        let found = if entry.starts_with('/') {
            PathBuf::from(entry)
        } else if entry.contains('/') {
            return Err(format!(
                "entry `{entry}` is a relative path; give an absolute path or a bare name \
                 (looked up in policy.task_path)"
            ));
        } else {
            find_in_path(entry, OsStr::new(task_path)).ok_or_else(|| {
                format!("`{entry}` is not an executable file in any of `{task_path}`")
            })?
        };
        let canonical = found
            .canonicalize()
            .map_err(|e| format!("entry `{entry}` cannot be resolved: {e}"))?;
        if !canonical.is_file() {
            return Err(format!(
                "entry `{entry}` resolves to `{}`, which is not a file",
                canonical.display()
            ));
        }
        allowed.insert(canonical);
    }
    Ok(allowed)
}

/// A config variable name must be one a process can carry, and not one the drone owns.
fn check_config_env_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains('=') || name.contains('\0') {
        return Err(format!(
            "{name:?} is not a variable name (non-empty, without `=` or NUL)"
        ));
    }
    if name == TOKEN_ENV {
        return Err(format!(
            "`{TOKEN_ENV}` is the drone's own secret and is never given to tasks"
        ));
    }
    if LEASE_ENV.contains(&name) {
        return Err(format!(
            "`{name}` is set by the drone for each attempt and cannot be configured"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// The shipped example, to check that it documents every policy key.
    const EXAMPLE: &str = include_str!("../../config/drone.toml");

    fn resolve(file: PolicyFile) -> Result<Policy, PolicyError> {
        Policy::resolve_as(file, 0, |name| {
            Ok(Identity {
                name: name.to_owned(),
                uid: 1234,
                gid: 99,
            })
        })
    }

    fn ok(file: PolicyFile) -> Policy {
        match resolve(file) {
            Ok(p) => p,
            Err(e) => panic!("policy refused: {e}"),
        }
    }

    fn refused_key(file: PolicyFile) -> String {
        match resolve(file) {
            Ok(p) => panic!("accepted: {p:?}"),
            Err(e) => format!("{}: {}", e.key, e.message),
        }
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn an_empty_section_is_the_default_policy() {
        assert_eq!(ok(PolicyFile::default()), Policy::default());
        let p = Policy::default();
        assert_eq!(p.kinds, strings(&["echo", "exec"]));
        assert!(p.allowed_programs.is_empty());
        assert_eq!(p.task_path, DEFAULT_TASK_PATH);
    }

    #[test]
    fn kinds_shrink_what_runs_and_refuse_the_rest_by_name() {
        let p = ok(PolicyFile {
            kinds: Some(strings(&["echo"])),
            ..PolicyFile::default()
        });
        assert_eq!(p.kinds, strings(&["echo"]));
        assert_eq!(p.check_kind("echo"), Ok(()));
        let refused = p.check_kind("exec").err().unwrap_or_default();
        assert!(refused.contains("exec is not allowed"), "{refused}");
        assert_eq!(
            p.check_kind("teleport"),
            Err("kind teleport is not supported by this drone".to_owned())
        );
        // Order and repeats in the file do not matter.
        let p = ok(PolicyFile {
            kinds: Some(strings(&["exec", "echo", "exec"])),
            ..PolicyFile::default()
        });
        assert_eq!(p.kinds, strings(&["echo", "exec"]));

        // A name that is not built in is a pool kind: allowed here, and checked against
        // what the pools announce at start (crate::pool).
        let p = ok(PolicyFile {
            kinds: Some(strings(&["echo", "resize", "resize"])),
            ..PolicyFile::default()
        });
        assert_eq!(p.kinds, strings(&["echo"]));
        assert_eq!(p.pool_kinds, Some(strings(&["resize"])));
        assert_eq!(ok(PolicyFile::default()).pool_kinds, None);

        for bad in [vec![], strings(&[" "])] {
            let e = refused_key(PolicyFile {
                kinds: Some(bad),
                ..PolicyFile::default()
            });
            assert!(e.starts_with("policy.kinds"), "{e}");
        }
    }

    #[test]
    fn allowlist_entries_resolve_to_canonical_files_or_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("tool");
        std::fs::write(&real, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let link = dir.path().join("tool-link");
        symlink(&real, &link).expect("symlink");
        let canonical = real.canonicalize().expect("canonical");

        let p = ok(PolicyFile {
            allowed_programs: Some(vec![
                link.display().to_string(),
                // A bare name is looked up in task_path.
                "tool".to_owned(),
            ]),
            task_path: Some(dir.path().display().to_string()),
            ..PolicyFile::default()
        });
        assert_eq!(p.allowed_programs, BTreeSet::from([canonical]));

        let cases = [
            "relative/tool".to_owned(),
            "./tool".to_owned(),
            "/usr/bin/*".to_owned(),
            String::new(),
            "no-such-program-hive".to_owned(),
            dir.path().join("missing").display().to_string(),
            dir.path().display().to_string(),
        ];
        for entry in cases {
            let e = refused_key(PolicyFile {
                allowed_programs: Some(vec![entry.clone()]),
                task_path: Some(dir.path().display().to_string()),
                ..PolicyFile::default()
            });
            assert!(e.starts_with("policy.allowed_programs"), "{entry}: {e}");
        }
    }

    #[test]
    fn programs_are_compared_after_resolving_paths_symlinks_and_dotdots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let make = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, "#!/bin/sh\n").expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            p
        };
        let allowed = make("allowed");
        let other = make("other");
        std::fs::create_dir(dir.path().join("bin")).expect("mkdir");
        // A symlink named like the allowed program, pointing elsewhere.
        symlink(&other, dir.path().join("bin").join("allowed")).expect("symlink");
        // A symlink to the allowed program under another name is the same file.
        symlink(&allowed, dir.path().join("alias")).expect("symlink");

        let p = ok(PolicyFile {
            allowed_programs: Some(vec![allowed.display().to_string()]),
            ..PolicyFile::default()
        });
        let canonical = allowed.canonicalize().expect("canonical");
        let path = dir.path().as_os_str();
        let bin_first =
            std::env::join_paths([dir.path().join("bin"), dir.path().to_owned()]).expect("join");

        assert_eq!(
            p.allowed_program("allowed", Path::new("/"), Some(path)),
            Ok(Some(canonical.clone()))
        );
        assert_eq!(
            p.allowed_program("./alias", dir.path(), None),
            Ok(Some(canonical.clone()))
        );
        let via_dotdot = format!("{}/bin/../allowed", dir.path().display());
        assert_eq!(
            p.allowed_program(&via_dotdot, Path::new("/"), None),
            Ok(Some(canonical))
        );

        let refused = [
            p.allowed_program("allowed", Path::new("/"), Some(bin_first.as_os_str())),
            p.allowed_program("bin/allowed", dir.path(), None),
            p.allowed_program("../other", &dir.path().join("bin"), None),
            p.allowed_program(
                &format!("{}/bin/../other", dir.path().display()),
                Path::new("/"),
                None,
            ),
            p.allowed_program("other", Path::new("/"), Some(path)),
        ];
        for r in refused {
            let e = r.err().unwrap_or_default();
            assert!(e.contains("not in policy.allowed_programs"), "{e}");
            assert!(e.contains("other"), "the error names the program: {e}");
        }
        let missing = p.allowed_program("nope", Path::new("/"), Some(path));
        assert!(
            missing.err().unwrap_or_default().contains("nope"),
            "a missing program is named"
        );
        // Without an allowlist nothing is resolved: the program runs as given.
        assert_eq!(
            Policy::default().allowed_program("anything", Path::new("/"), None),
            Ok(None)
        );
    }

    #[test]
    fn loader_variables_are_refused_only_with_an_allowlist() {
        let env: BTreeMap<String, String> =
            [("LD_PRELOAD".to_owned(), "/tmp/x.so".to_owned())].into();
        assert_eq!(Policy::default().check_payload_env(&env), Ok(()));
        let strict = Policy {
            allowed_programs: BTreeSet::from([PathBuf::from("/usr/bin/true")]),
            ..Policy::default()
        };
        for name in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "GCONV_PATH",
            "GLIBC_TUNABLES",
        ] {
            let env: BTreeMap<String, String> = [(name.to_owned(), "x".to_owned())].into();
            let e = strict.check_payload_env(&env).err().unwrap_or_default();
            assert!(e.contains(name), "{e}");
        }
        let fine: BTreeMap<String, String> = [("GREETING".to_owned(), "hi".to_owned())].into();
        assert_eq!(strict.check_payload_env(&fine), Ok(()));
    }

    #[test]
    fn the_task_environment_is_built_from_named_layers_only() {
        let p = ok(PolicyFile {
            env_passthrough: Some(strings(&["KEEP", "ABSENT", "FORCED"])),
            env: Some(
                [
                    ("FIXED".to_owned(), Secret("config".into())),
                    ("FORCED".to_owned(), Secret("config".into())),
                ]
                .into(),
            ),
            task_path: Some("/opt/bin:/usr/bin".to_owned()),
            ..PolicyFile::default()
        });
        let drone_env = |name: &str| match name {
            "KEEP" => Some(OsString::from("kept")),
            "FORCED" => Some(OsString::from("drone")),
            "SECRET" | TOKEN_ENV => Some(OsString::from("leak")),
            _ => None,
        };
        let payload: BTreeMap<String, String> = [
            ("GREETING".to_owned(), "hi".to_owned()),
            ("FORCED".to_owned(), "payload".to_owned()),
            ("HIVE_FENCE".to_owned(), "forged".to_owned()),
            ("LANG".to_owned(), "de_DE.UTF-8".to_owned()),
        ]
        .into();
        let lease = [("HIVE_FENCE", OsString::from("7"))];
        let env = p.task_env(Some(Path::new("/work/t-7")), &payload, &lease, drone_env);
        let expected: BTreeMap<String, OsString> = [
            ("PATH", "/opt/bin:/usr/bin"),
            ("LANG", "de_DE.UTF-8"),
            ("HOME", "/work/t-7"),
            ("KEEP", "kept"),
            ("GREETING", "hi"),
            ("FIXED", "config"),
            ("FORCED", "config"),
            ("HIVE_FENCE", "7"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), OsString::from(v)))
        .collect();
        assert_eq!(env, expected);

        // No work directory: no HOME.
        let bare = Policy::default().task_env(None, &BTreeMap::new(), &[], drone_env);
        assert_eq!(bare.keys().collect::<Vec<_>>(), vec!["LANG", "PATH"]);
    }

    #[test]
    fn the_token_and_lease_variables_cannot_be_configured_for_tasks() {
        let cases = [
            PolicyFile {
                env_passthrough: Some(strings(&[TOKEN_ENV])),
                ..PolicyFile::default()
            },
            PolicyFile {
                env_passthrough: Some(strings(&["HIVE_FENCE"])),
                ..PolicyFile::default()
            },
            PolicyFile {
                env_passthrough: Some(strings(&["A=B"])),
                ..PolicyFile::default()
            },
            PolicyFile {
                env: Some([("HIVE_TASK_ID".to_owned(), Secret("x".into()))].into()),
                ..PolicyFile::default()
            },
            PolicyFile {
                env: Some([(String::new(), Secret("x".into()))].into()),
                ..PolicyFile::default()
            },
            PolicyFile {
                env: Some([("A".to_owned(), Secret("x\0".into()))].into()),
                ..PolicyFile::default()
            },
        ];
        for file in cases {
            let e = refused_key(file);
            assert!(e.starts_with("policy.env"), "{e}");
        }
        let e = refused_key(PolicyFile {
            env_passthrough: Some(strings(&[TOKEN_ENV])),
            ..PolicyFile::default()
        });
        assert!(e.contains("never given to tasks"), "{e}");
    }

    #[test]
    fn the_task_path_and_work_root_must_be_absolute() {
        for bad in ["", "bin:/usr/bin", "/usr/bin::/bin", "/usr/bin:."] {
            let e = refused_key(PolicyFile {
                task_path: Some(bad.to_owned()),
                ..PolicyFile::default()
            });
            assert!(e.starts_with("policy.task_path"), "{bad}: {e}");
        }
        let e = refused_key(PolicyFile {
            work_root: Some(PathBuf::from("work")),
            ..PolicyFile::default()
        });
        assert!(e.starts_with("policy.work_root"), "{e}");
    }

    #[test]
    fn only_root_can_run_tasks_as_another_user() {
        let nobody = Identity {
            name: "nobody".into(),
            uid: 65534,
            gid: 65534,
        };
        assert_eq!(
            identity_to_switch_to(0, nobody.clone()),
            Ok(Some(nobody.clone()))
        );
        assert_eq!(identity_to_switch_to(65534, nobody.clone()), Ok(None));
        let e = identity_to_switch_to(1000, nobody.clone())
            .err()
            .unwrap_or_default();
        assert!(e.contains("not as root") && e.contains("nobody"), "{e}");

        let as_user = Policy::resolve_as(
            PolicyFile {
                run_as: Some("nobody".into()),
                ..PolicyFile::default()
            },
            1000,
            |_| Ok(nobody.clone()),
        );
        assert_eq!(as_user.err().map(|e| e.key), Some("policy.run_as"));
        let e = refused_key(PolicyFile {
            run_as: Some(" ".into()),
            ..PolicyFile::default()
        });
        assert!(e.starts_with("policy.run_as"), "{e}");
    }

    #[test]
    fn an_open_drone_says_so_at_start() {
        let open = Policy::default();
        assert_eq!(open.startup_warnings(1000).len(), 1);
        assert_eq!(
            open.startup_warnings(0).len(),
            2,
            "and that tasks run as root"
        );
        let echo_only = Policy {
            kinds: strings(&["echo"]),
            ..Policy::default()
        };
        assert!(echo_only.startup_warnings(0).is_empty());
        let as_root = Policy {
            run_as: Some(Identity {
                name: "root".into(),
                uid: 0,
                gid: 0,
            }),
            ..Policy::default()
        };
        assert_eq!(
            as_root.startup_warnings(0).len(),
            2,
            "run_as root is still root"
        );
    }

    #[test]
    fn the_example_config_documents_every_policy_key() {
        // A struct literal without `..`: a new key breaks this until it is listed here,
        // and then the example must document it under [policy].
        let every_key = PolicyFile {
            kinds: Some(Vec::new()),
            allowed_programs: Some(Vec::new()),
            run_as: Some(String::new()),
            work_root: Some(PathBuf::new()),
            task_path: Some(String::new()),
            env_passthrough: Some(Vec::new()),
            env: Some(BTreeMap::new()),
        };
        let table = match toml::Value::try_from(every_key) {
            Ok(toml::Value::Table(t)) => t,
            other => panic!("PolicyFile did not serialize to a table: {other:?}"),
        };
        let section = EXAMPLE
            .split_once("\n[policy]\n")
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("config/drone.toml has no [policy] section"));
        for key in table.keys() {
            let documented = section
                .lines()
                .map(|l| l.trim_start_matches('#').trim_start())
                .any(|l| l.starts_with(&format!("{key} =")));
            assert!(
                documented,
                "config/drone.toml does not document `{key}` under [policy]"
            );
        }
    }
}
