//! adtrack's Kinesis reader, shared by every stream adtrack consumes (the
//! events stream and the core-data stream): it finds the shards, leases them
//! in DynamoDB so live readers share a stream and a crashed one's shards are
//! taken over, reads each leased shard in its own task, hands every page of
//! records to a [`Handler`], stores the checkpoint only after the records
//! before it are done, and keeps reshard order (a child starts once its
//! parents, both parents of a merge, are read to their end).
//!
//! The Lambda side of the same contract is [`lambda`]: a Kinesis event from
//! an event source mapping becomes the same [`Record`]s, and the handler's
//! answer becomes a partial batch response.

pub mod dead_letter;
pub mod lambda;
pub mod lease;
mod reader;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

pub use lease::{Leases, SHARD_END};
pub use reader::Reader;

/// One Kinesis record as a reader received it.
#[derive(Debug, Clone)]
pub struct Record {
    pub shard_id: String,
    pub sequence_number: String,
    pub data: Bytes,
    /// When Kinesis received it (epoch milliseconds), when known.
    pub arrival_ms: Option<i64>,
}

/// What a stream's records are for.
pub trait Handler: Send + Sync + 'static {
    /// Handles one page of a shard's records, in order, and answers how many
    /// of them, from the first, are done for good: the checkpoint moves past
    /// those. Fewer than all only when `stop` fired; the rest is read again
    /// (by this reader after a restart, or by the next holder of the lease),
    /// so a handler must be idempotent per record.
    fn handle(
        &self,
        records: &[Record],
        stop: &CancellationToken,
    ) -> impl Future<Output = usize> + Send;
}

/// Where a shard without a checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest record the stream keeps.
    TrimHorizon,
    /// Only records put after the first start. Applies to the shards there
    /// at that start; the children of a later reshard start at their
    /// beginning, or their first records would be skipped.
    Latest,
}

impl StartPosition {
    /// `trim_horizon` or `latest`, as the configuration spells them.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "trim_horizon" => Some(Self::TrimHorizon),
            "latest" => Some(Self::Latest),
            _ => None,
        }
    }
}

/// How one reader reads one stream.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The stream's name.
    pub stream: String,
    /// DynamoDB table of leases and checkpoints (partition key `shardKey`),
    /// shared by every stream: rows are prefixed with the stream's name.
    pub checkpoint_table: String,
    /// How long a lease lasts without renewal.
    pub lease_duration: Duration,
    /// Pause between reads of an idle shard (Kinesis allows five reads per
    /// second per shard).
    pub poll_interval: Duration,
    /// Most records per GetRecords call.
    pub max_records: i32,
    pub start_position: StartPosition,
    /// Prefix of the reader's metric names, such as `adtrack_consumer`
    /// (`{prefix}_checkpoints_total`, `{prefix}_read_errors_total`,
    /// `{prefix}_leases_held`, `{prefix}_lease_changes_total`,
    /// `{prefix}_millis_behind_latest`).
    pub metric_prefix: &'static str,
}

/// A name for one reader process in the lease table.
pub fn owner_name(role: &str) -> String {
    format!(
        "{role}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}
