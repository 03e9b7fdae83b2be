//! The `wsrouter` command: parse the command line, load and validate the
//! configuration, then run the router until SIGINT or SIGTERM. Started by
//! an upgrade (SIGUSR2 to a running router), it takes the old process's
//! listeners instead of binding them, or tells it why it will not.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use wsrouter::{Config, Inherited, Listeners, Relaunch};

/// Exit code for a bad configuration or command line (sysexits EX_USAGE).
const EX_USAGE: u8 = 64;

/// A WebSocket-aware connection router with GeoIP steering.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Run the router with this configuration file.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "check_config",
        required_unless_present = "check_config"
    )]
    config: Option<PathBuf>,
    /// Validate this configuration file, report every problem, and exit.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
    /// Write the pid of the process that holds the listeners here (an
    /// upgrade's new process rewrites it).
    #[arg(long, value_name = "FILE")]
    pid_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    // Before anything else: an upgrade starts whatever is at this path then.
    let relaunch = Relaunch::this_process();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    if let Some(path) = cli.check_config {
        return match Config::from_file(&path) {
            Ok(config) => {
                eprintln!(
                    "{}: ok ({} regions, {} backends)",
                    path.display(),
                    config.regions.len(),
                    config.backends.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EX_USAGE)
            }
        };
    }

    let path = cli
        .config
        .expect("clap requires --config without --check-config");
    // Started by an upgrade: the old process waits to hear from this one.
    let inherited = match Inherited::from_env() {
        Ok(inherited) => inherited,
        Err(e) => {
            eprintln!("wsrouter: cannot reach the process being upgraded: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = match Config::from_file(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            if let Some(inherited) = inherited {
                inherited.refuse(&format!("the configuration is invalid: {e}"));
            }
            return ExitCode::from(EX_USAGE);
        }
    };
    let relaunch = match relaunch {
        Ok(relaunch) => Some(relaunch),
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell this executable's path; upgrades are off");
            None
        }
    };
    // Sessions get threads of their own (`[runtime] session_threads`); this
    // one runs the admin API, health checks, reloads and signals.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("wsrouter-main")
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let (listeners, successor) = match inherited {
            Some(inherited) => {
                let (listeners, successor) = inherited
                    .listeners(&config)
                    .await
                    .map_err(std::io::Error::other)?;
                (listeners, Some(successor))
            }
            None => (Listeners::bind(&config).await?, None),
        };
        let options = wsrouter::Options {
            config_path: Some(path.clone()),
            handle_signals: true,
            relaunch,
            pid_file: cli.pid_file,
            successor,
        };
        wsrouter::run_with(config, listeners, shutdown_signal(), options).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsrouter: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the router");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}
