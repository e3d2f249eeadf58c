//! The updater Lambda's front-end: a Kinesis event of the core-data stream
//! from the event source mapping in, the same [`CoreData`] handler as
//! `updater stream`, and a partial batch response out. A record the store
//! cannot take now (the table or Redis unavailable after
//! [`LAMBDA_ATTEMPTS`]) is named in `batchItemFailures`, so Lambda retries
//! from it and nothing before it is applied twice; a record that can never
//! be applied is dead-lettered and does not stop the ones after it. (The
//! mapping needs `ReportBatchItemFailures`; see `cloudformation/`.)

use adtrack_reader::Handler;
use adtrack_reader::lambda::KinesisBatch;
use aws_lambda_events::event::streams::KinesisEventResponse;
use tokio_util::sync::CancellationToken;

use crate::stream::CoreData;

/// Attempts per record inside one invocation while the store fails (the
/// backoff between them is short; the mapping's retry does the rest).
pub const LAMBDA_ATTEMPTS: u32 = 4;

/// Handles one invocation.
pub async fn handle(core: &CoreData, event: KinesisBatch) -> KinesisEventResponse {
    let records = adtrack_reader::lambda::records(event);
    let done = core.handle(&records, &CancellationToken::new()).await;
    tracing::info!(
        records = records.len(),
        done,
        failed_from = ?records.get(done).map(|r| &r.sequence_number),
        "core-data batch applied"
    );
    adtrack_reader::lambda::response(&records, done)
}
