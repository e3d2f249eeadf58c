//! The Lambda side of the reader's contract: an event source mapping does
//! the leasing and checkpointing, the handler is the same. A Kinesis event
//! becomes [`Record`]s, and the handler's answer becomes a partial batch
//! response naming the first record not done, so Lambda retries from there
//! and nothing before it is handled twice. (The mapping needs
//! `ReportBatchItemFailures`; see `cloudformation/`.)

use aws_lambda_events::event::kinesis::KinesisEvent;
use aws_lambda_events::event::streams::{KinesisBatchItemFailure, KinesisEventResponse};
use bytes::Bytes;

use crate::Record;

/// Runs a Lambda function behind a Kinesis event source mapping: each
/// invocation's event goes to `handle`, its partial batch response back to
/// Lambda. Returns (with the exit code the process should end with) only
/// when the runtime fails.
pub async fn serve<F, Fut>(handle: F) -> std::process::ExitCode
where
    F: Fn(KinesisEvent) -> Fut,
    Fut: std::future::Future<Output = KinesisEventResponse>,
{
    let handle = &handle;
    let result = lambda_runtime::run(lambda_runtime::service_fn(
        |event: lambda_runtime::LambdaEvent<KinesisEvent>| async move {
            Ok::<_, lambda_runtime::Error>(handle(event.payload).await)
        },
    ))
    .await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("lambda runtime failed: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// The records of one invocation, in order.
pub fn records(event: KinesisEvent) -> Vec<Record> {
    event
        .records
        .into_iter()
        .map(|r| {
            // eventID is "shardId-000000000000:sequenceNumber".
            let shard_id = r
                .event_id
                .as_deref()
                .and_then(|id| id.split(':').next())
                .unwrap_or("")
                .to_owned();
            Record {
                shard_id,
                arrival_ms: Some(r.kinesis.approximate_arrival_timestamp.0.timestamp_millis()),
                sequence_number: r.kinesis.sequence_number,
                data: Bytes::from(r.kinesis.data.0),
            }
        })
        .collect()
}

/// The answer when the first `done` of `records` are done.
pub fn response(records: &[Record], done: usize) -> KinesisEventResponse {
    let mut response = KinesisEventResponse::default();
    if let Some(first) = records.get(done) {
        let mut failure = KinesisBatchItemFailure::default();
        failure.item_identifier = Some(first.sequence_number.clone());
        response.batch_item_failures.push(failure);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: &str) -> Record {
        Record {
            shard_id: "shardId-000000000000".into(),
            sequence_number: seq.into(),
            data: Bytes::new(),
            arrival_ms: None,
        }
    }

    #[test]
    fn names_the_first_record_not_done() {
        let rs = [record("1"), record("2"), record("3")];
        assert!(response(&rs, 3).batch_item_failures.is_empty());
        let r = response(&rs, 1);
        assert_eq!(r.batch_item_failures.len(), 1);
        assert_eq!(
            r.batch_item_failures[0].item_identifier.as_deref(),
            Some("2")
        );
    }
}
