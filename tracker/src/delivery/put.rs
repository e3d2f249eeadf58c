//! The one AWS call delivery makes per batch, behind a small trait so the
//! engine's logic has unit tests with a scripted stream: PutRecords, and
//! ListShards for the shard map.

use std::future::Future;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bytes::Bytes;

use super::retry::CallFailure;
use crate::shard_map::ShardMap;

/// One entry of a PutRecords call.
#[derive(Debug, Clone)]
pub struct Entry {
    pub data: Bytes,
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
}

/// What Kinesis said of one entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryResult {
    /// `None` when the entry was stored.
    pub error_code: Option<String>,
    /// The shard that stored it.
    pub shard_id: Option<String>,
}

/// A PutRecords call that failed as a whole.
#[derive(Debug, Clone)]
pub struct CallError {
    pub failure: CallFailure,
    pub message: String,
}

/// The stream delivery writes to.
pub trait RecordStream: Send + Sync + 'static {
    /// One PutRecords call; one result per entry, in order.
    fn put_records(
        &self,
        entries: Vec<Entry>,
    ) -> impl Future<Output = Result<Vec<EntryResult>, CallError>> + Send;

    /// The stream's open shards.
    fn shard_map(&self) -> impl Future<Output = anyhow::Result<ShardMap>> + Send;
}

/// A Kinesis stream through the AWS SDK.
#[derive(Clone)]
pub struct KinesisStream {
    pub client: Client,
    pub stream: String,
}

impl RecordStream for KinesisStream {
    async fn put_records(&self, entries: Vec<Entry>) -> Result<Vec<EntryResult>, CallError> {
        let entries = entries
            .into_iter()
            .filter_map(|e| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(e.data.to_vec()))
                    .partition_key(e.partition_key)
                    .set_explicit_hash_key(e.explicit_hash_key)
                    .build()
                    .ok()
            })
            .collect();
        let out = self
            .client
            .put_records()
            .stream_name(&self.stream)
            .set_records(Some(entries))
            .send()
            .await
            .map_err(|e| {
                let changed = e.as_service_error().is_some_and(|s| {
                    s.is_resource_not_found_exception() || s.is_invalid_argument_exception()
                });
                CallError {
                    failure: if changed {
                        CallFailure::StreamChanged
                    } else {
                        CallFailure::Transient
                    },
                    message: aws_sdk_kinesis::error::DisplayErrorContext(&e).to_string(),
                }
            })?;
        Ok(out
            .records
            .into_iter()
            .map(|r| EntryResult {
                error_code: r.error_code,
                shard_id: r.shard_id,
            })
            .collect())
    }

    async fn shard_map(&self) -> anyhow::Result<ShardMap> {
        ShardMap::fetch(&self.client, &self.stream).await
    }
}
