//! BatchWriteItem with retries: unprocessed items and failed calls (throttling
//! included) retried with exponential backoff and full jitter, a bounded
//! number of attempts.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::metric;

/// DynamoDB's BatchWriteItem limit.
pub const MAX_ITEMS_PER_CALL: usize = 25;
const RETRY_BASE: Duration = Duration::from_millis(50);
const RETRY_CAP: Duration = Duration::from_secs(10);

pub type Item = HashMap<String, AttributeValue>;

/// Writing stopped (shutdown) before every item was durable.
#[derive(Debug, thiserror::Error)]
#[error("stopped before all items were written")]
pub struct Interrupted;

/// Items still unwritten after every attempt (or when stopped).
#[derive(Debug, thiserror::Error)]
#[error("{} item(s) not written after {attempts} attempts: {last_error}", unwritten.len())]
pub struct WriteFailed {
    pub unwritten: Vec<Item>,
    pub attempts: u32,
    pub last_error: String,
}

fn items_of(requests: Vec<WriteRequest>) -> Vec<Item> {
    requests
        .into_iter()
        .filter_map(|r| r.put_request.map(|p| p.item))
        .collect()
}

/// Writes up to 25 items (unique keys) to `table`; `label` names the table
/// in metrics. `max_attempts` 0 retries until `stop`.
pub async fn write_chunk(
    client: &Client,
    table: &str,
    label: &'static str,
    items: Vec<Item>,
    max_attempts: u32,
    stop: &CancellationToken,
) -> Result<(), WriteFailed> {
    let mut pending: Vec<WriteRequest> = items
        .into_iter()
        .filter_map(|item| {
            let put = PutRequest::builder().set_item(Some(item)).build().ok()?;
            Some(WriteRequest::builder().put_request(put).build())
        })
        .collect();
    let mut attempt: u32 = 0;
    let mut last_error;
    loop {
        let n = pending.len();
        let result = client
            .batch_write_item()
            .request_items(table, pending.clone())
            .send()
            .await;
        match result {
            Ok(out) => {
                let left = out
                    .unprocessed_items
                    .and_then(|mut m| m.remove(table))
                    .unwrap_or_default();
                metrics::counter!(metric::ITEMS_WRITTEN, "table" => label)
                    .increment((n - left.len()) as u64);
                if left.is_empty() {
                    return Ok(());
                }
                metrics::counter!(metric::WRITE_RETRIES, "cause" => "unprocessed")
                    .increment(left.len() as u64);
                last_error = format!("{} unprocessed item(s)", left.len());
                pending = left;
            }
            Err(e) => {
                last_error = aws_sdk_dynamodb::error::DisplayErrorContext(&e).to_string();
                let cause = if last_error.contains("Throughput") || last_error.contains("Throttl") {
                    "throttled"
                } else {
                    "call_failed"
                };
                metrics::counter!(metric::WRITE_RETRIES, "cause" => cause).increment(n as u64);
                if attempt == 0 || attempt.is_power_of_two() {
                    tracing::warn!(table, items = n, attempt, error = %last_error, "BatchWriteItem failed; retrying");
                }
            }
        }
        attempt = attempt.saturating_add(1);
        if max_attempts > 0 && attempt >= max_attempts {
            return Err(WriteFailed {
                unwritten: items_of(pending),
                attempts: attempt,
                last_error,
            });
        }
        if backoff(attempt, stop).await.is_err() {
            return Err(WriteFailed {
                unwritten: items_of(pending),
                attempts: attempt,
                last_error: "stopped by shutdown".into(),
            });
        }
    }
}

/// Sleeps a full-jitter exponential backoff; `Err` if `stop` fires first.
pub async fn backoff(attempt: u32, stop: &CancellationToken) -> Result<(), Interrupted> {
    let ceiling = RETRY_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(RETRY_CAP);
    let pause = rand::rng().random_range(Duration::ZERO..=ceiling);
    tokio::select! {
        _ = stop.cancelled() => Err(Interrupted),
        _ = tokio::time::sleep(pause) => Ok(()),
    }
}
