//! The consumer's configuration, from environment variables, checked at start.

use std::net::SocketAddr;
use std::time::Duration;

use adtrack_reader::StartPosition;
use clap::Parser;

pub use crate::write_config::WriteConfig;

/// adtrack consumer: reads every shard of the events stream and writes each
/// event to DynamoDB, keyed by its event id so a replay overwrites.
///
/// AWS endpoints, region and credentials come from the standard AWS SDK chain
/// (`AWS_ENDPOINT_URL_KINESIS` and `AWS_ENDPOINT_URL_DYNAMODB` point it at
/// local stand-ins).
#[derive(Parser, Debug, Clone)]
#[command(name = "consumer", version)]
pub struct Config {
    /// Kinesis stream to read.
    #[arg(
        long,
        env = "EVENTS_STREAM",
        value_name = "EVENTS_STREAM",
        default_value = "adtrack-events"
    )]
    pub events_stream: String,

    /// Where and how events are written (shared with the Lambda front-end).
    #[command(flatten)]
    pub write: WriteConfig,

    /// How long a shard lease lasts without renewal, in seconds; a crashed
    /// poller's shards are taken over after this.
    #[arg(long, env = "CONSUMER_LEASE_SECS", value_name = "CONSUMER_LEASE_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lease_secs: u64,

    /// Where per-shard checkpoints and leases are kept.
    #[command(flatten)]
    pub checkpoints: adtrack_reader::lease::CheckpointArgs,

    /// Pause between reads of an idle shard, in milliseconds (Kinesis allows
    /// 5 reads per second per shard).
    #[arg(long, env = "CONSUMER_POLL_INTERVAL_MS", value_name = "CONSUMER_POLL_INTERVAL_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(200..=60_000))]
    pub poll_interval_ms: u64,

    /// Most records per GetRecords call.
    #[arg(long, env = "CONSUMER_MAX_RECORDS", value_name = "CONSUMER_MAX_RECORDS", default_value_t = 1000, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub max_records: i32,

    /// Where a shard without a checkpoint starts: `trim_horizon` (oldest
    /// record kept) or `latest` (only the shards there at the first start;
    /// the children of a reshard always start at their beginning).
    #[arg(long, env = "CONSUMER_START_POSITION", value_name = "CONSUMER_START_POSITION", default_value = "trim_horizon", value_parser = start_position)]
    pub start_position: StartPosition,

    /// Admin HTTP address (Prometheus metrics, liveness).
    #[arg(
        long,
        env = "CONSUMER_ADMIN_ADDR",
        value_name = "CONSUMER_ADMIN_ADDR",
        default_value = "0.0.0.0:9091"
    )]
    pub admin_addr: SocketAddr,

    #[command(flatten)]
    pub log: adtrack_service::LogArgs,
}

fn start_position(s: &str) -> Result<StartPosition, String> {
    StartPosition::parse(s).ok_or_else(|| format!("`{s}` is not `trim_horizon` or `latest`"))
}

impl Config {
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.lease_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Config::command().debug_assert();
    }
}
