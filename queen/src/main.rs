//! `queen --config hive.toml` runs the queen: load config, start tracing, open the store,
//! bind, serve. `queen <command>` is the operator CLI, a client of a running queen's HTTP
//! API (`cli/`); `queen dev` runs a whole local hive.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use queen::config::{Backend, Config, LogFormat};
use queen::{Listeners, Queen};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// See the workspace `Cargo.toml` for why the queen does not use the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tracing_subscriber::EnvFilter;

use queen::cli;
mod dev;

/// The Hive's queen: a durable, fault-tolerant job scheduler.
///
/// Without a command it runs the queen (`queen --config hive.toml`). With one it is the
/// client of a running queen's HTTP API (address and token from the flags below, or else
/// from the same config file and environment as the server).
#[derive(Debug, Parser)]
#[command(version, about, long_about, after_help = cli::EXIT_CODES_HELP)]
struct Cli {
    /// TOML config file (see config/hive.toml). Without it, defaults serve a local hive.
    /// Every key can be overridden by HIVE_<SECTION>__<KEY> environment variables.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(flatten)]
    client: cli::ClientOpts,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    #[command(flatten)]
    Client(cli::Command),
    /// A local hive in one command: queen, local drones and a sample batch to watch.
    Dev(dev::DevArgs),
    /// Copies a stopped queen's sled data dir into an empty PostgreSQL database, checks
    /// the counts, and says how to start the hive on it (the way a single-machine hive
    /// grows into an HA one). The data dir is left as it was.
    Migrate(MigrateArgs),
    /// Prints the HTTP API's OpenAPI 3 document: what `GET /v1/openapi.json` serves.
    /// `queen openapi > docs/openapi.json` refreshes the checked-in copy.
    Openapi,
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// The sled data dir [default: queen.data_dir from the config].
    #[arg(long)]
    from: Option<PathBuf>,
    /// The PostgreSQL URL to copy into [default: postgres.url from the config].
    #[arg(long, env = "HIVE_MIGRATE_TO")]
    to: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Openapi) = cli.command {
        return openapi();
    }
    let cfg = match Config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("queen: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Some(Command::Client(command)) => {
            let defaults = cli::Defaults {
                addr: cfg.queen.http,
                token: cfg.auth.client().cloned(),
                tls: cfg.tls.enabled(),
            };
            cli::run(defaults, cli.client, command).into()
        }
        Some(Command::Dev(args)) => {
            let mut cfg = cfg;
            if let Some(filter) = args.log_filter() {
                cfg.log.level = filter.to_owned();
            }
            server(cfg, Some(args))
        }
        Some(Command::Migrate(args)) => migrate(cfg, args),
        // Answered before the config is read.
        Some(Command::Openapi) => openapi(),
        None => server(cfg, None),
    }
}

/// `queen openapi`: the document on stdout. Needs no config and no queen.
fn openapi() -> ExitCode {
    use std::io::Write;
    let written = queen::http::openapi_json_text()
        .map_err(|e| e.to_string())
        .and_then(|text| {
            std::io::stdout()
                .lock()
                .write_all(text.as_bytes())
                .map_err(|e| e.to_string())
        });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("queen openapi: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `queen migrate`: sled data dir → PostgreSQL.
fn migrate(mut cfg: Config, args: MigrateArgs) -> ExitCode {
    init_tracing(&cfg);
    let from = args.from.unwrap_or_else(|| cfg.queen.data_dir.clone());
    if let Some(url) = args.to {
        cfg.postgres.url = Some(shared::ids::Secret(url));
    }
    let unbound = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let result = queen::store::pg::Settings::from_config(&cfg, unbound, unbound)
        .and_then(|settings| queen::store::migrate_to_postgres(&from, &settings));
    match result {
        Ok(migrated) => {
            for (table, rows) in &migrated.tables {
                println!("{table}: {rows} rows copied and counted");
            }
            println!(
                "done: start the queens with [storage] backend = \"postgres\" and this [postgres] url; {} is unchanged and can be kept as a backup",
                from.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("queen migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The queen itself, or with `dev` a local hive around it.
fn server(cfg: Config, dev: Option<dev::DevArgs>) -> ExitCode {
    init_tracing(&cfg);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = cfg.runtime_workers(cpus);
    tracing::info!(workers, cpus, "starting the runtime");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("queen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match dev {
        None => runtime.block_on(serve(cfg)),
        Some(args) => runtime.block_on(dev::run(cfg, args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("queen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let (drone_addr, http_addr) = (cfg.listen_addr()?, cfg.http_addr()?);
    let shutdown = CancellationToken::new();
    match cfg.storage.backend {
        Backend::Sled => {
            // The store is opened (and the data dir locked) before anything listens.
            let data_dir = cfg.queen.data_dir.clone();
            let queen = tokio::task::spawn_blocking(move || Queen::open(cfg)).await??;
            let listeners = listen(drone_addr, http_addr, &shutdown).await?;
            tracing::info!(data_dir = %data_dir.display(), "queen ready");
            queen.serve(listeners, shutdown).await?;
        }
        Backend::Postgres => {
            let checked = cfg.clone();
            tokio::task::spawn_blocking(move || queen::ha::precheck(&checked)).await??;
            let listeners = listen(drone_addr, http_addr, &shutdown).await?;
            tracing::info!("leader or standby as the postgres lease decides");
            queen::ha::serve(cfg, listeners, shutdown).await?;
        }
    }
    Ok(())
}

/// Binds both listeners, prints the `ready` line and starts watching for signals.
async fn listen(
    drone_addr: std::net::SocketAddr,
    http_addr: std::net::SocketAddr,
    shutdown: &CancellationToken,
) -> anyhow::Result<Listeners> {
    let drones = bind(drone_addr, "queen.listen").await?;
    let http = bind(http_addr, "queen.http").await?;
    let (drones_at, http_at) = (drones.local_addr()?, http.local_addr()?);
    tracing::info!(drones = %drones_at, http = %http_at, "queen listening");
    // A machine-readable line on stdout for scripts and tests (ports may be 0 in config).
    println!("ready drones={drones_at} http={http_at}");
    tokio::spawn(signals(shutdown.clone()));
    Ok(Listeners { drones, http })
}

async fn bind(addr: std::net::SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {key} {addr}: {e}"))
}

/// First SIGTERM/SIGINT: graceful stop. A second one: exit at once.
async fn signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    tracing::info!("signal received; shutting down (again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    std::process::exit(130);
}

fn init_tracing(cfg: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}
