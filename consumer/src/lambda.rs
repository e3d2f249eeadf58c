//! The Lambda front-end: a Kinesis event from the event source mapping in,
//! the shared batch core, and a partial batch response out. When events
//! cannot be written, `batchItemFailures` names the sequence number of the
//! first record not fully written: Lambda retries from there, and nothing
//! before it is processed twice. (Enable `ReportBatchItemFailures` on the
//! mapping; see `cloudformation/`.)

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::{KinesisBatchItemFailure, KinesisEventResponse};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::batch::{InRecord, Tables, process};
use crate::metric;

/// Attempts per BatchWriteItem call inside one invocation.
pub const LAMBDA_WRITE_ATTEMPTS: u32 = 6;

/// Handles one invocation.
pub async fn handle(
    client: &aws_sdk_dynamodb::Client,
    tables: &Tables,
    event: KinesisEvent,
) -> KinesisEventResponse {
    let records: Vec<InRecord> = event
        .records
        .into_iter()
        .map(|r| {
            let shard_id = r
                .event_id
                .as_deref()
                .and_then(|id| id.split(':').next())
                .unwrap_or("")
                .to_owned();
            InRecord {
                shard_id,
                sequence_number: r.kinesis.sequence_number,
                data: Bytes::from(r.kinesis.data.0),
            }
        })
        .collect();
    let outcome = process(client, tables, &records, &CancellationToken::new()).await;
    let mut response = KinesisEventResponse::default();
    match outcome.first_failed {
        None => metrics::counter!(metric::LAMBDA_BATCHES, "result" => "ok").increment(1),
        Some(i) => {
            metrics::counter!(metric::LAMBDA_BATCHES, "result" => "partial").increment(1);
            let mut failure = KinesisBatchItemFailure::default();
            failure.item_identifier = Some(records[i].sequence_number.clone());
            response.batch_item_failures.push(failure);
        }
    }
    tracing::info!(
        records = records.len(),
        events = outcome.events_written,
        dead_letters = outcome.dead_letters,
        failed_from = ?outcome.first_failed.map(|i| &records[i].sequence_number),
        "batch processed"
    );
    response
}
