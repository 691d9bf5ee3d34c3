//! `omcb`: parses the command line and runs the worker library.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use omcb_worker::{Config, Server};
use std::io::Write as _;

#[derive(Debug, Parser)]
#[command(name = "omcb", version, about = "One shared board of a million checkboxes, live.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the board (embedded store: no other service needed).
    Serve(Box<Config>),
    /// Operator actions on a running board: start, change or stop a sunset,
    /// read the board's settings, revert what one client address did
    /// (through a worker's private listener, or straight to Redis in a
    /// fleet); audit an address in the change archive.
    Admin(Box<omcb_worker::admin::AdminArgs>),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = match cli.command {
        Command::Serve(config) => {
            if let Err(e) = config.check() {
                use clap::CommandFactory as _;
                Cli::command().error(clap::error::ErrorKind::ArgumentConflict, e).exit();
            }
            omcb_worker::logging::init(config.log_format);
            runtime.block_on(serve(*config))
        }
        Command::Admin(args) => {
            // An operator's tool: the reason, not a backtrace.
            if let Err(e) = runtime.block_on(omcb_worker::admin::run(*args)) {
                eprintln!("omcb admin: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
    };
    // Everything worth waiting for (sockets closed, board persisted) is done;
    // don't wait for a blocking read on a store connection to time out.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    result
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM that arrives right after the "listening" line
    // must start a graceful shutdown, not kill the process.
    let shutdown = shutdown_signal()?;
    let prometheus = match config.metrics_listen {
        Some(_) => {
            Some(omcb_worker::metrics::install().context("installing the metrics recorder")?)
        }
        None => None,
    };
    let server = Server::bind(config, prometheus).await?;
    // Tests and scripts read these lines to find the ports (`--listen 127.0.0.1:0`).
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on http://{}", server.local_addr())?;
    if let Some(addr) = server.metrics_addr() {
        writeln!(out, "metrics on http://{addr}/metrics")?;
    }
    out.flush()?;
    drop(out);
    server.run(shutdown).await?;
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
    })
}
