//! `consumer`: parse config, set up logging, poll until SIGTERM.

use std::process::ExitCode;

use adtrack_consumer::{Config, run};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    let config: Config = match adtrack_service::parse_config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    config.log.init();
    let admin = match TcpListener::bind(config.admin_addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(
                "cannot listen on CONSUMER_ADMIN_ADDR {}: {e}",
                config.admin_addr
            );
            return ExitCode::from(1);
        }
    };
    tracing::info!(stream = %config.events_stream, table = %config.write.events_table, "consumer starting");
    let shutdown = adtrack_service::shutdown_on_signals();
    match run(config, admin, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("consumer failed: {e:#}");
            ExitCode::from(1)
        }
    }
}
