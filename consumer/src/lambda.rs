//! The Lambda front-end: a Kinesis event from the event source mapping in,
//! the shared batch core, and a partial batch response out. When events
//! cannot be written, `batchItemFailures` names the sequence number of the
//! first record not fully written: Lambda retries from there, and nothing
//! before it is processed twice. (Enable `ReportBatchItemFailures` on the
//! mapping; see `cloudformation/`.)

use adtrack_reader::lambda::KinesisBatch;
use aws_lambda_events::event::streams::KinesisEventResponse;
use tokio_util::sync::CancellationToken;

use crate::batch::{Tables, process};
use crate::metric;

/// Attempts per BatchWriteItem call inside one invocation.
pub const LAMBDA_WRITE_ATTEMPTS: u32 = 6;

/// Handles one invocation.
pub async fn handle(
    client: &aws_sdk_dynamodb::Client,
    tables: &Tables,
    event: KinesisBatch,
) -> KinesisEventResponse {
    let records = adtrack_reader::lambda::records(event);
    let outcome = process(client, tables, &records, &CancellationToken::new()).await;
    let result = if outcome.first_failed.is_none() {
        "ok"
    } else {
        "partial"
    };
    metrics::counter!(metric::LAMBDA_BATCHES, "result" => result).increment(1);
    let response =
        adtrack_reader::lambda::response(&records, outcome.first_failed.unwrap_or(records.len()));
    tracing::info!(
        records = records.len(),
        events = outcome.events_written,
        dead_letters = outcome.dead_letters,
        failed_from = ?outcome.first_failed.map(|i| &records[i].sequence_number),
        "batch processed"
    );
    response
}
