//! The `drone` binary: parse the command line, start logging, hand over to [`drone::run`].

use std::ffi::OsStr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use drone::{Cli, Config, LogFormat, Shutdown};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // The process supervisor is this same binary; it must not parse flags, log or start
    // a runtime (see drone::supervise).
    let mut args = std::env::args_os();
    if args.nth(1).as_deref() == Some(OsStr::new(drone::supervise::SUBCOMMAND)) {
        let code = drone::supervise::main(args.collect());
        return ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX));
    }

    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drone: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&cli)?;
    init_tracing(config.log_format)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(async {
        let shutdown = Shutdown::default();
        listen_for_signals(shutdown.clone())?;
        drone::run(config, shutdown).await?;
        Ok(())
    })
}

fn init_tracing(format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("could not start logging: {e}"))
}

/// First SIGTERM/SIGINT: drain gracefully. Second: stop now.
fn listen_for_signals(shutdown: Shutdown) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("could not listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("could not listen for SIGINT")?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            seen += 1;
            if seen == 1 {
                tracing::info!("shutdown requested; draining (signal again to stop at once)");
                shutdown.graceful.cancel();
            } else {
                tracing::warn!("second shutdown signal; stopping at once");
                shutdown.immediate.cancel();
                break;
            }
        }
    });
    Ok(())
}
