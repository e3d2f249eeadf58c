//! The settings of `updater stream`, the long-running reader of the
//! core-data stream (local runs; in AWS the updater Lambda reads it).

use std::time::Duration;

use adtrack_reader::{Settings, StartPosition};
use clap::Args;

use crate::lambda_config::CoreDataArgs;

/// Where the core-data stream is and how it is read.
#[derive(Args, Debug, Clone)]
pub struct StreamArgs {
    /// The stream, and where its bad records go (shared with the Lambda).
    #[command(flatten)]
    pub core_data: CoreDataArgs,

    /// Where leases and checkpoints are kept (shared with the events
    /// consumer).
    #[command(flatten)]
    pub checkpoints: adtrack_reader::lease::CheckpointArgs,

    /// How long a shard lease lasts without renewal, in seconds.
    #[arg(long, env = "UPDATER_LEASE_SECS", value_name = "UPDATER_LEASE_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub lease_secs: u64,

    /// Pause between reads of an idle shard, in milliseconds (Kinesis
    /// allows 5 reads per second per shard).
    #[arg(long, env = "UPDATER_POLL_INTERVAL_MS", value_name = "UPDATER_POLL_INTERVAL_MS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(200..=60_000))]
    pub poll_interval_ms: u64,
}

impl StreamArgs {
    /// The reader's settings. A shard without a checkpoint starts at its
    /// oldest record: core data is never skipped.
    pub fn settings(&self) -> Settings {
        Settings {
            stream: self.core_data.core_data_stream.clone(),
            checkpoint_table: self.checkpoints.checkpoint_table.clone(),
            lease_duration: Duration::from_secs(self.lease_secs),
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            max_records: 1000,
            start_position: StartPosition::TrimHorizon,
            metric_prefix: "adtrack_updater_stream",
        }
    }
}
