//! Writes items with BatchWriteItem: 25 per call, unprocessed items and
//! failed calls retried with exponential backoff and full jitter.

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

/// Writing stopped before every item was durable.
#[derive(Debug, thiserror::Error)]
#[error("stopped before all items were written")]
pub struct Interrupted;

/// Writes all items (keys must be unique within `items`), retrying until
/// done or `stop` fires.
pub async fn write_all(
    client: &Client,
    table: &str,
    items: Vec<Item>,
    stop: &CancellationToken,
) -> Result<(), Interrupted> {
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        let chunk: Vec<WriteRequest> = items
            .by_ref()
            .take(MAX_ITEMS_PER_CALL)
            .filter_map(|item| {
                let put = PutRequest::builder().set_item(Some(item)).build().ok()?;
                Some(WriteRequest::builder().put_request(put).build())
            })
            .collect();
        write_chunk(client, table, chunk, stop).await?;
    }
    Ok(())
}

async fn write_chunk(
    client: &Client,
    table: &str,
    mut pending: Vec<WriteRequest>,
    stop: &CancellationToken,
) -> Result<(), Interrupted> {
    let mut attempt: u32 = 0;
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
                metrics::counter!(metric::ITEMS_WRITTEN).increment((n - left.len()) as u64);
                if left.is_empty() {
                    return Ok(());
                }
                metrics::counter!(metric::WRITE_RETRIES, "cause" => "unprocessed")
                    .increment(left.len() as u64);
                pending = left;
            }
            Err(e) => {
                metrics::counter!(metric::WRITE_RETRIES, "cause" => "call_failed")
                    .increment(n as u64);
                if attempt == 0 || attempt.is_power_of_two() {
                    tracing::warn!(
                        table,
                        items = n,
                        attempt,
                        error = %aws_sdk_dynamodb::error::DisplayErrorContext(&e),
                        "BatchWriteItem failed; retrying"
                    );
                }
            }
        }
        attempt = attempt.saturating_add(1);
        backoff(attempt, stop).await?;
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
