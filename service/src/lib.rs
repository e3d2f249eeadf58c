//! Process plumbing shared by the adtrack binaries: parsing the typed config
//! with one clear line on a bad value, logging setup, shutdown on signals.

pub mod metrics_endpoint;
pub mod retry;

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Parses a binary's config from its environment and flags. `--help` and
/// `--version` print and exit 0; a bad value prints one line naming the
/// variable and exits 2.
pub fn parse_config<C: Parser>() -> Result<C, ExitCode> {
    match C::try_parse() {
        Ok(c) => Ok(c),
        Err(e) => match e.kind() {
            clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                let _ = e.print();
                Err(ExitCode::SUCCESS)
            }
            _ => {
                let text = e.to_string();
                let first = text.lines().next().unwrap_or("invalid configuration");
                eprintln!(
                    "{}: {}",
                    C::command().get_name(),
                    first.trim_start_matches("error: ")
                );
                Err(ExitCode::from(2))
            }
        },
    }
}

/// Logs to stderr: `json` (one object per line, for CloudWatch) or `text`.
/// The level comes from `RUST_LOG` (default `info`).
pub fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
    };
}

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        t.cancel();
    });
    token
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// How a binary logs (shared by every adtrack binary's configuration).
#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Log format: `json` or `text`.
    #[arg(long, env = "LOG_FORMAT", value_name = "LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    pub log_format: String,
}

impl LogArgs {
    /// Installs the logger in this format.
    pub fn init(&self) {
        init_logging(&self.log_format);
    }
}
