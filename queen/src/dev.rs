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
    let drone_bin = match args.drone_bin {
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
        let mut command = tokio::process::Command::new(&drone_bin);
        if let Some(filter) = log_filter {
            command.env("RUST_LOG", filter);
        }
        let child = command
            .args([
                "--queen",
                &drones_at.to_string(),
                "--slots",
                &args.slots.to_string(),
                "--name",
                &format!("dev-drone-{i}"),
            ])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", drone_bin.display()))?;
        children.push(child);
    }
    println!(
        "started {} drones with {} slots each",
        args.drones, args.slots
    );

    if args.tasks > 0 {
        let ids = submit_sample(&core, args.tasks).await?;
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

async fn submit_sample(core: &CoreHandle, n: usize) -> anyhow::Result<Vec<TaskId>> {
    let now = Utc::now();
    let limits = queen::config::TaskSection::default();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let spec = if i % 3 == 0 {
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
