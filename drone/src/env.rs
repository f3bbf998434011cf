//! The names in a task's environment that the drone owns: the lease variables it sets for
//! every attempt, the variables a payload may not set, the drone's own token (never given
//! to a task), and the fixed base every task starts from. Names only; which variables a
//! task gets is the policy's rule ([`crate::policy::Policy::task_env`]).

/// The environment variable the drone's token may come from, so it need not appear in
/// `ps`. Tasks never get it.
pub const TOKEN_ENV: &str = "HIVE_DRONE_TOKEN";

/// The task's id.
pub const TASK_ID_ENV: &str = "HIVE_TASK_ID";
/// The attempt number, 1 for the first.
pub const ATTEMPT_ENV: &str = "HIVE_ATTEMPT";
/// The lease's fence.
pub const FENCE_ENV: &str = "HIVE_FENCE";
/// The file the attempt may write its checkpoint to (see [`crate::checkpoint`]).
pub const CHECKPOINT_FILE_ENV: &str = "HIVE_CHECKPOINT_FILE";

/// The file holding the payload's `input` (JSON), also the task's stdin; set only when
/// the payload has one.
pub const INPUT_FILE_ENV: &str = "HIVE_INPUT_FILE";
/// The file the task may write its result to (JSON): it then becomes the task's result.
pub const RESULT_FILE_ENV: &str = "HIVE_RESULT_FILE";

/// The `LANG` every task gets: UTF-8 without depending on which locales the host has
/// generated (glibc has built `C.UTF-8` in since 2.35; Debian and Ubuntu ship it).
pub const TASK_LANG: &str = "C.UTF-8";

/// The pool process's end of its channel to the drone (docs/POOLS.md).
pub const POOL_FD_ENV: &str = "HIVE_POOL_FD";
/// The local protocol version the drone speaks with pool processes.
pub const POOL_PROTOCOL_ENV: &str = "HIVE_POOL_PROTOCOL";
/// The pool's name.
pub const POOL_NAME_ENV: &str = "HIVE_POOL_NAME";
/// The process's index in its pool, from 0.
pub const POOL_PROCESS_ENV: &str = "HIVE_POOL_PROCESS";
/// The largest frame the drone accepts (its `max_frame_len`), so a worker can fail a
/// result too large to send instead of breaking the protocol with it.
pub const POOL_MAX_FRAME_ENV: &str = "HIVE_POOL_MAX_FRAME";

/// The variables the drone sets to describe the lease. Nothing else may set them: not
/// the payload, not the config (a config that tries is refused at start).
pub const LEASE_ENV: [&str; 11] = [
    TASK_ID_ENV,
    ATTEMPT_ENV,
    FENCE_ENV,
    CHECKPOINT_FILE_ENV,
    INPUT_FILE_ENV,
    RESULT_FILE_ENV,
    POOL_FD_ENV,
    POOL_PROTOCOL_ENV,
    POOL_NAME_ENV,
    POOL_PROCESS_ENV,
    POOL_MAX_FRAME_ENV,
];

/// Variables that make the dynamic loader or libc load code or data from a path of the
/// caller's choosing: glibc's list of variables it drops for set-user-ID programs
/// (`unsecvars.h`), less `TMPDIR` (which picks where files go, not what runs); every `LD_*`
/// name is refused as well. With an allowlist a payload may not set them, or
/// `LD_PRELOAD=/tmp/x.so` would run any code inside an allowed program.
pub const LOADER_ENV: [&str; 12] = [
    "GCONV_PATH",
    "GETCONF_DIR",
    "GLIBC_TUNABLES",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "LOCPATH",
    "MALLOC_TRACE",
    "NIS_PATH",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "RES_OPTIONS",
    "TZDIR",
];
