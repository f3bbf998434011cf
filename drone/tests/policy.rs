//! The `[policy]` section against a fake queen that may be hostile: each test names what a
//! task must not be able to do on a drone that restricts it.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use shared::protocol::TaskComplete;
use shared::Fence;
use support::*;

use drone::policy::{Policy, PolicyFile};
use drone::{Cli, Config};

fn stdout(done: &TaskComplete) -> &str {
    done.result["stdout"].as_str().unwrap_or_default()
}

fn policy(file: PolicyFile) -> Result<Policy> {
    Ok(Policy::resolve(file)?)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// An executable shell script at `path` that creates `marker` if it ever runs.
fn tripwire(path: &Path, marker: &Path) -> Result<()> {
    std::fs::write(path, format!("#!/bin/sh\ntouch '{}'\n", marker.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn am_root() -> bool {
    drone::policy::effective_uid() == 0
}

/// `id -u NAME` / `id -g NAME`, asked of the system rather than of the code under test.
fn id_of(flag: &str, user: &str) -> Result<String> {
    let out = std::process::Command::new("id")
        .arg(flag)
        .arg(user)
        .output()?;
    if !out.status.success() {
        bail!("id {flag} {user} failed");
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_outside_the_policy_is_not_announced_and_refused_if_sent_anyway() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let mut config = test_config(queen.addr)?;
    config.policy = policy(PolicyFile {
        kinds: Some(strings(&["echo"])),
        ..PolicyFile::default()
    })?;
    let _drone = InProcessDrone::start(config);
    let mut conn = queen.accept().await?;
    let hello = conn.welcome().await?;
    assert_eq!(hello.kinds, vec!["echo"], "the hello offers only what runs");

    // A hostile (or confused) queen sends an exec anyway.
    let marker = dir.path().join("ran");
    let task = exec(&format!("touch '{}'", marker.display()), dir.path());
    conn.assign(task.clone()).await?;
    let f = failed(conn.outcome(task.task_id).await?)?;
    assert!(f.error.contains("kind exec is not allowed"), "{}", f.error);
    assert!(
        !f.retryable,
        "retrying elsewhere is the queen's job, not ours"
    );
    assert!(!marker.exists(), "nothing ran");

    let echo = assign("echo", json!("still here"));
    conn.assign(echo.clone()).await?;
    completed(conn.outcome(echo.task_id).await?)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowlisted_programs_run_whatever_symlinks_dotdots_or_path_say() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let marker = dir.path().join("ran");
    tripwire(&dir.path().join("evil.sh"), &marker)?;
    std::fs::create_dir(dir.path().join("sub"))?;
    std::fs::create_dir(dir.path().join("bin"))?;
    // Looks like the allowed `echo`, is a shell.
    symlink("/bin/sh", dir.path().join("bin").join("echo"))?;
    symlink("/bin/sh", dir.path().join("innocent"))?;

    let mut config = test_config(queen.addr)?;
    config.policy = policy(PolicyFile {
        // A bare name, resolved in task_path at start.
        allowed_programs: Some(strings(&["echo"])),
        ..PolicyFile::default()
    })?;
    let _drone = InProcessDrone::start(config);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let touch = format!("touch '{}'", marker.display());
    let sneaky_path = format!("{}:/usr/bin:/bin", dir.path().join("bin").display());
    let refused = [
        (json!({"cmd": ["sh", "-c", touch]}), "`sh`"),
        (
            json!({"cmd": ["echo", "-c", touch], "env": {"PATH": sneaky_path}}),
            "`echo`",
        ),
        (
            json!({"cmd": [dir.path().join("innocent"), "-c", touch]}),
            "innocent",
        ),
        (
            json!({"cmd": [format!("/usr/bin/../..{}/evil.sh", dir.path().display())]}),
            "evil.sh",
        ),
        (
            json!({"cmd": ["../evil.sh"], "cwd": dir.path().join("sub")}),
            "../evil.sh",
        ),
        (
            json!({"cmd": ["echo", "hi"], "env": {"LD_PRELOAD": dir.path().join("x.so")}}),
            "LD_PRELOAD",
        ),
    ];
    for (payload, named) in refused {
        let task = assign("exec", payload.clone());
        conn.assign(task.clone()).await?;
        let f = failed(conn.outcome(task.task_id).await?)?;
        assert!(
            f.error.contains(named),
            "{payload}: `{}` lacks {named}",
            f.error
        );
        assert!(!f.retryable, "{payload}: {}", f.error);
        assert!(f.result.is_none(), "{payload}: nothing was started");
    }
    assert!(!marker.exists(), "a refused program ran");

    for cmd in [json!(["echo", "hi"]), json!(["/usr/bin/../bin/echo", "hi"])] {
        let task = assign("exec", json!({"cmd": cmd}));
        conn.assign(task.clone()).await?;
        let done = completed(conn.outcome(task.task_id).await?)?;
        assert_eq!(stdout(&done), "hi\n", "{cmd}");
    }
    Ok(())
}

/// Runs the real binary so the variables are really in the drone's process environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_see_only_the_configured_environment_never_the_drones() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let unique = uuid::Uuid::new_v4().simple().to_string().to_uppercase();
    let hidden = format!("HIVE_POLICY_TEST_HIDDEN_{unique}");
    let passed = format!("HIVE_POLICY_TEST_PASSED_{unique}");
    let config_file = dir.path().join("drone.toml");
    std::fs::write(
        &config_file,
        format!(
            "[policy]\nenv_passthrough = [\"{passed}\", \"HIVE_POLICY_TEST_UNSET_{unique}\"]\n\
             env = {{ FIXED = \"from-config\" }}\n"
        ),
    )?;
    let config_arg = config_file.display().to_string();
    let _drone = DroneProcess::start(
        queen.addr,
        &["--config", &config_arg],
        &[
            (hidden.as_str(), "leaked"),
            (passed.as_str(), "passed"),
            ("HIVE_DRONE_TOKEN", "s3cret"),
        ],
    )?;
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let mut task = assign(
        "exec",
        json!({"cmd": ["env"], "env": {"OWN": "payload", "FIXED": "payload"}}),
    );
    task.fence = Fence(4);
    conn.assign(task.clone()).await?;
    let done = completed(conn.outcome(task.task_id).await?)?;
    let env: BTreeMap<&str, &str> = stdout(&done)
        .lines()
        .filter_map(|l| l.split_once('='))
        .collect();
    let names: Vec<&str> = env.keys().copied().collect();
    let mut expected = vec![
        "FIXED",
        "HIVE_ATTEMPT",
        "HIVE_CHECKPOINT_FILE",
        "HIVE_FENCE",
        "HIVE_RESULT_FILE",
        "HIVE_TASK_ID",
        "LANG",
        "OWN",
        "PATH",
        passed.as_str(),
    ];
    expected.sort_unstable();
    assert_eq!(
        names, expected,
        "exactly the named layers, nothing inherited"
    );
    assert_eq!(env[passed.as_str()], "passed");
    assert_eq!(
        env["FIXED"], "from-config",
        "the payload cannot override config"
    );
    assert_eq!(env["OWN"], "payload");
    assert_eq!(env["LANG"], "C.UTF-8");
    assert_eq!(env["PATH"], drone::policy::DEFAULT_TASK_PATH);
    assert_eq!(env["HIVE_FENCE"], "4");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_in_its_own_directory_which_goes_away_and_cannot_be_escaped() -> Result<()> {
    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let work_root = dir.path().canonicalize()?.join("work");
    let mut config = test_config(queen.addr)?;
    config.policy = policy(PolicyFile {
        work_root: Some(work_root.clone()),
        ..PolicyFile::default()
    })?;
    let _drone = InProcessDrone::start(config);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    for (cwd, below) in [(None, ""), (Some("sub/./dir"), "/sub/dir")] {
        let mut task = assign(
            "exec",
            json!({"cmd": ["sh", "-c", "pwd; echo \"$HOME\"; touch left-behind"]}),
        );
        if let Some(cwd) = cwd {
            task.payload["cwd"] = json!(cwd);
        }
        conn.assign(task.clone()).await?;
        let done = completed(conn.outcome(task.task_id).await?)?;
        let attempt_dir = work_root.join(format!("{}-{}", task.task_id, task.fence));
        assert_eq!(
            stdout(&done),
            format!(
                "{}{below}\n{}\n",
                attempt_dir.display(),
                attempt_dir.display()
            ),
            "cwd {cwd:?}"
        );
        assert!(
            !attempt_dir.exists(),
            "the attempt's directory is removed before its outcome is reported"
        );
    }

    for (cwd, why) in [
        ("../escape", "climbs out"),
        ("a/../../escape", "climbs out"),
        ("/tmp", "is absolute"),
    ] {
        let task = assign("exec", json!({"cmd": ["mkdir", "-p", "x"], "cwd": cwd}));
        conn.assign(task.clone()).await?;
        let f = failed(conn.outcome(task.task_id).await?)?;
        assert!(f.error.contains(why), "{cwd}: {}", f.error);
        assert!(!f.retryable, "{cwd}");
    }
    assert!(!work_root.join("escape").exists());
    let left: Vec<_> = std::fs::read_dir(&work_root)?.collect();
    assert!(left.is_empty(), "work_root keeps nothing: {left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_as_drops_root_for_the_task_and_the_drone_can_still_kill_it() -> Result<()> {
    let file = r#"
        [policy]
        run_as = "nobody"
    "#;
    let parsed = drone::config::FileConfig::parse(file, Path::new("drone.toml"))?;
    if !am_root() {
        // Only root can switch users: refusing at start beats failing every task.
        let nobody_uid: u32 = id_of("-u", "nobody")?.parse()?;
        if drone::policy::effective_uid() != nobody_uid {
            let err = Config::from_layers(parsed, &Cli::default())
                .err()
                .ok_or_else(|| anyhow!("run_as was accepted by a drone that is not root"))?;
            assert!(err.to_string().contains("policy.run_as"), "{err}");
        }
        return Ok(());
    }

    let queen = FakeQueen::start().await?;
    let dir = tempfile::tempdir()?;
    let mut config = Config::from_layers(parsed, &Cli::default())?;
    let defaults = test_config(queen.addr)?;
    config.queen = defaults.queen;
    config.supervisor = defaults.supervisor;
    config.kill_grace = defaults.kill_grace;
    config.policy.work_root = Some(dir.path().join("work"));
    let _drone = InProcessDrone::start(config);
    let mut conn = queen.accept().await?;
    conn.welcome().await?;

    let task = assign(
        "exec",
        json!({"cmd": ["sh", "-c",
            "id -u; id -g; id -G; touch mine && stat -c %u mine; \
             echo '{\"step\": 1}' > \"$HIVE_CHECKPOINT_FILE\" && echo checkpoint-written"]}),
    );
    conn.assign(task.clone()).await?;
    let done = completed(conn.outcome(task.task_id).await?)
        .context("a task as nobody could not use its own directory or checkpoint file")?;
    let uid = id_of("-u", "nobody")?;
    let gid = id_of("-g", "nobody")?;
    assert_eq!(
        stdout(&done),
        format!("{uid}\n{gid}\n{gid}\n{uid}\ncheckpoint-written\n"),
        "uid, gid, no supplementary groups but its own, owns its directory"
    );

    // The task cannot signal the root supervisor, but the root drone can still stop the task.
    let mut slow = assign(
        "exec",
        json!({"cmd": ["sh", "-c", "echo $$; exec sleep 30"]}),
    );
    slow.timeout_ms = Some(300);
    conn.assign(slow.clone()).await?;
    let f = failed(conn.outcome(slow.task_id).await?)?;
    assert_eq!(f.error, "timed out after 300 ms");
    let pid: i32 = f
        .result
        .as_ref()
        .and_then(|r| r["stdout"].as_str())
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| anyhow!("no pid in {:?}", f.result))?;
    wait_all_gone(&[pid]).await;
    Ok(())
}
