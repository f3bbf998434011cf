//! `queen dev`: a whole local hive in one command — a queen on an embedded sled database,
//! a few local drones (child processes), and a sample batch whose progress is printed
//! until it completes. The hive then keeps serving (dashboard URL printed) until Ctrl-C.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use queen::config::Config;
use queen::core::{CoreHandle, Request};
use queen::task::Task;
use queen::{Listeners, Queen};
use shared::api::{TaskSpec, TaskState};
use shared::TaskId;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Local drones to start.
    #[arg(long, default_value_t = 3)]
    pub drones: u32,
    /// Slots per drone.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// Sample tasks to submit (a mix of `echo` and `exec`); 0 for none.
    #[arg(long, default_value_t = 60)]
    pub tasks: usize,
    /// The drone binary (default: `drone` next to this `queen` binary).
    #[arg(long)]
    pub drone_bin: Option<PathBuf>,
    /// Where the Python SDK is: with `python3` on the PATH and `<DIR>/examples/tasks.py`
    /// present, one more drone runs a worker pool of those function-style tasks and the
    /// sample batch includes some (`py.greet`). The default finds it in a checkout.
    #[arg(long, value_name = "DIR", default_value = "sdk/python")]
    pub python_sdk: PathBuf,
    /// Do not start the Python worker pool.
    #[arg(long)]
    pub no_python: bool,
    /// Also print every task's lines (assigned, succeeded, ...) from the queen and the
    /// drones. Without it the terminal shows the progress and anything that went wrong
    /// (warnings and errors); `RUST_LOG`, when set, decides instead.
    #[arg(long, short)]
    pub verbose: bool,
}

impl DevArgs {
    /// The log filter for the queen and its drones: `None` leaves `RUST_LOG` or the config
    /// in charge.
    pub fn log_filter(&self) -> Option<&'static str> {
        if self.verbose || std::env::var_os("RUST_LOG").is_some() {
            None
        } else {
            Some("warn")
        }
    }
}

pub async fn run(cfg: Config, args: DevArgs) -> anyhow::Result<()> {
    let log_filter = args.log_filter();
    let drone_bin = match args.drone_bin.clone() {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("drone"),
    };
    anyhow::ensure!(
        drone_bin.exists(),
        "drone binary not found at {} (build it with `cargo build -p drone`, or pass --drone-bin)",
        drone_bin.display()
    );
    // Signals are caught from the start: one arriving while the sample batch runs must
    // stop the hive cleanly (and its drones with it), not kill the process outright.
    let shutdown = CancellationToken::new();
    let signals = Signals::install()?;
    tokio::spawn(signals.cancel_on_first(shutdown.clone()));
    let data_dir = cfg.queen.data_dir.clone();
    let (listen, http) = (cfg.listen_addr()?, cfg.http_addr()?);
    let queen = tokio::task::spawn_blocking(move || Queen::open(cfg)).await??;
    let core = queen.handle();
    let reader = queen.reader();
    let drones_l = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let http_l = TcpListener::bind(http)
        .await
        .with_context(|| format!("cannot listen on {http}"))?;
    let (drones_at, http_at) = (drones_l.local_addr()?, http_l.local_addr()?);
    let serving = tokio::spawn(queen.serve(
        Listeners {
            drones: drones_l,
            http: http_l,
        },
        shutdown.clone(),
    ));
    println!(
        "queen: drones connect to {drones_at}, data in {}",
        data_dir.display()
    );
    println!("dashboard: http://{http_at}/");

    let mut children = Vec::new();
    for i in 1..=args.drones {
        children.push(start_drone(
            &drone_bin,
            log_filter,
            [
                "--queen",
                &drones_at.to_string(),
                "--slots",
                &args.slots.to_string(),
                "--name",
                &format!("dev-drone-{i}"),
            ],
        )?);
    }
    println!(
        "started {} drones with {} slots each",
        args.drones, args.slots
    );
    let python = if args.no_python {
        false
    } else {
        match python_pool_drone(
            &args,
            &drone_bin,
            &drones_at.to_string(),
            &data_dir,
            log_filter,
        ) {
            Ok(Some(child)) => {
                children.push(child);
                println!(
                    "started a drone with a Python worker pool ({}/examples/tasks.py: py.greet, py.wordcount, py.sleep)",
                    args.python_sdk.display()
                );
                true
            }
            Ok(None) => false,
            Err(e) => {
                println!("no Python worker pool: {e:#}");
                false
            }
        }
    };

    if args.tasks > 0 {
        let ids = submit_sample(&core, args.tasks, python).await?;
        println!("submitted a sample batch of {} tasks", ids.len());
        watch(&core, &reader, &ids, &shutdown).await;
    }
    if !shutdown.is_cancelled() {
        println!("the hive keeps running; press Ctrl-C to stop");
    }
    shutdown.cancelled().await;
    for child in &mut children {
        if let Some(pid) = child.id() {
            // SAFETY: signalling a child process we started.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
    }
    for child in &mut children {
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }
    serving.await??;
    Ok(())
}

/// Asks the kernel to send the local drone SIGTERM when `queen dev` goes, however it goes
/// (`kill -9` included), so no drone of a dev hive keeps reconnecting to a queen that is
/// gone. SIGTERM lets it drain, and its task and pool processes die with it. The signal is
/// tied to the thread that forks: a tokio worker thread, which lives as long as the
/// runtime, i.e. the process.
fn dies_with_this_process(command: &mut tokio::process::Command) {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and only calls prctl and
    // getppid, which are async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Gone between the fork and the prctl: no signal will ever come.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Starts a drone with a two-process pool running the Python SDK's example tasks, when
/// `python3` and the SDK are there (`Ok(None)` when they are not: the demo goes on
/// without). Its config goes into the data dir.
fn python_pool_drone(
    args: &DevArgs,
    drone_bin: &std::path::Path,
    queen: &str,
    data_dir: &std::path::Path,
    log_filter: Option<&str>,
) -> anyhow::Result<Option<tokio::process::Child>> {
    let examples = args.python_sdk.join("examples");
    if !examples.join("tasks.py").is_file() {
        println!(
            "no Python worker pool: {} not found (run from the repository, or pass --python-sdk)",
            examples.join("tasks.py").display()
        );
        return Ok(None);
    }
    let python_found = std::process::Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !python_found {
        println!("no Python worker pool: python3 is not on the PATH");
        return Ok(None);
    }
    let sdk = std::fs::canonicalize(&args.python_sdk)?;
    let quoted = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let config = format!(
        "queen = {}\nslots = 8\nname = \"dev-drone-python\"\n\n[[pool]]\nname = \"py\"\n\
         command = [\"python3\", \"-m\", \"hive\", \"worker\", \"tasks\"]\nprocesses = 2\n\
         cwd = {}\nenv = {{ PYTHONPATH = {} }}\n",
        quoted(queen),
        quoted(&sdk.join("examples").display().to_string()),
        quoted(&sdk.display().to_string()),
    );
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join("dev-drone-python.toml");
    std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    let config_flag = std::ffi::OsString::from("--config");
    start_drone(drone_bin, log_filter, [config_flag, path.into_os_string()]).map(Some)
}

/// Starts one local drone with `args`, logging at `log_filter`; it dies with this process.
fn start_drone<S: AsRef<std::ffi::OsStr>>(
    drone_bin: &std::path::Path,
    log_filter: Option<&str>,
    args: impl IntoIterator<Item = S>,
) -> anyhow::Result<tokio::process::Child> {
    let mut command = tokio::process::Command::new(drone_bin);
    if let Some(filter) = log_filter {
        command.env("RUST_LOG", filter);
    }
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    dies_with_this_process(&mut command);
    command
        .spawn()
        .with_context(|| format!("starting {}", drone_bin.display()))
}

async fn submit_sample(core: &CoreHandle, n: usize, python: bool) -> anyhow::Result<Vec<TaskId>> {
    let now = Utc::now();
    let limits = queen::config::TaskSection::default();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let spec = if python && i % 5 == 1 {
            TaskSpec {
                kind: "py.greet".into(),
                payload: serde_json::json!({"name": format!("task {i}")}),
                queue: Some("sample".into()),
                ..Default::default()
            }
        } else if i % 3 == 0 {
            TaskSpec {
                kind: "exec".into(),
                payload: serde_json::json!({"cmd": ["sh", "-c", "sleep 0.$((RANDOM % 5)); echo \"hello from task $HIVE_TASK_ID (attempt $HIVE_ATTEMPT)\""]}),
                queue: Some("sample".into()),
                ..Default::default()
            }
        } else {
            TaskSpec {
                kind: "echo".into(),
                payload: serde_json::json!({"n": i}),
                queue: Some("sample".into()),
                priority: Some((i % 4) as i32),
                ..Default::default()
            }
        };
        tasks.push(Task::from_spec(spec, TaskId::generate(), now, &limits)?);
    }
    let ids = tasks.iter().map(|t| t.id).collect();
    core.ask(|reply| Request::Submit { tasks, reply }).await??;
    Ok(ids)
}

async fn watch(
    core: &CoreHandle,
    reader: &queen::store::StoreReader,
    ids: &[TaskId],
    shutdown: &CancellationToken,
) {
    let mut last = String::new();
    loop {
        let mut counts = std::collections::BTreeMap::<TaskState, usize>::new();
        for id in ids {
            let mut state = core
                .ask(|reply| Request::Get { id: *id, reply })
                .await
                .ok()
                .flatten()
                .map(|t| t.state);
            if state.is_none() {
                // Not in memory: finished and durable.
                state = reader.finished(*id).ok().flatten().map(|t| t.state);
            }
            if let Some(state) = state {
                *counts.entry(state).or_default() += 1;
            }
        }
        let done = counts
            .iter()
            .filter(|(s, _)| s.is_terminal())
            .map(|(_, n)| n)
            .sum::<usize>();
        let line = counts
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        if line != last {
            println!("sample batch: {done}/{} finished ({line})", ids.len());
            last = line;
        }
        if done == ids.len() {
            println!("sample batch complete");
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// SIGTERM and SIGINT, caught from the moment they are installed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn cancel_on_first(mut self, shutdown: CancellationToken) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
            _ = shutdown.cancelled() => {}
        }
        shutdown.cancel();
    }
}
