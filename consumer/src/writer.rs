//! BatchWriteItem with retries: unprocessed items and failed calls (throttling
//! included) retried with exponential backoff and full jitter, a bounded
//! number of attempts. An error retrying cannot fix (DynamoDB's
//! `ValidationException`: the item itself is wrong) is never retried: the
//! call's items are written one by one to find the refused ones, which come
//! back to the caller to be dead-lettered. Errors are told apart by their
//! code, never by their text.

use std::collections::HashMap;

use adtrack_service::retry::CALLS;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use tokio_util::sync::CancellationToken;

use crate::metric;

/// DynamoDB's BatchWriteItem limit.
pub const MAX_ITEMS_PER_CALL: usize = 25;

pub type Item = HashMap<String, AttributeValue>;

/// Items still unwritten after every attempt (or when stopped).
#[derive(Debug, thiserror::Error)]
#[error("{} item(s) not written after {attempts} attempts: {last_error}", unwritten.len())]
pub struct WriteFailed {
    pub unwritten: Vec<Item>,
    pub attempts: u32,
    pub last_error: String,
}

/// An item DynamoDB refused for good, and why (its message, bounded).
#[derive(Debug)]
pub struct Refused {
    pub item: Item,
    pub reason: String,
}

/// Error codes that no retry can fix: the request (an item) is wrong.
pub(crate) const PERMANENT: &[&str] = &[
    "ValidationException",
    "SerializationException",
    "ItemCollectionSizeLimitExceededException",
];
/// Error codes of throttling (retried, counted as such).
const THROTTLED: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "RequestLimitExceeded",
];
/// Longest error message kept in a reason.
const MAX_MESSAGE: usize = 256;

enum Failure {
    /// The call was refused for good: these items, this reason.
    Permanent(Vec<Item>, String),
    Gave(WriteFailed),
}

fn bounded(text: &str) -> String {
    let mut cut = text.len().min(MAX_MESSAGE);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].to_owned()
}

fn items_of(requests: Vec<WriteRequest>) -> Vec<Item> {
    requests
        .into_iter()
        .filter_map(|r| r.put_request.map(|p| p.item))
        .collect()
}

/// Writes up to 25 items (unique keys) to `table`; `label` names the table
/// in metrics. `max_attempts` 0 retries until `stop`. Returns the items
/// DynamoDB refused for good (each written alone to tell which).
pub async fn write_chunk(
    client: &Client,
    table: &str,
    label: &'static str,
    items: Vec<Item>,
    max_attempts: u32,
    stop: &CancellationToken,
) -> Result<Vec<Refused>, WriteFailed> {
    let (items, reason) = match write_call(client, table, label, items, max_attempts, stop).await {
        Ok(()) => return Ok(Vec::new()),
        Err(Failure::Gave(e)) => return Err(e),
        Err(Failure::Permanent(items, reason)) => (items, reason),
    };
    if items.len() == 1 {
        // Already written alone: it is the one refused.
        return Ok(items
            .into_iter()
            .map(|item| Refused {
                item,
                reason: reason.clone(),
            })
            .collect());
    }
    tracing::warn!(
        table,
        items = items.len(),
        reason,
        "a write was refused for good; writing its items one by one"
    );
    let mut refused = Vec::new();
    let mut rest = items.into_iter();
    while let Some(item) = rest.next() {
        match write_call(client, table, label, vec![item], max_attempts, stop).await {
            Ok(()) => {}
            Err(Failure::Permanent(mut one, reason)) => {
                if let Some(item) = one.pop() {
                    refused.push(Refused { item, reason });
                }
            }
            Err(Failure::Gave(mut e)) => {
                e.unwritten.extend(rest);
                return Err(e);
            }
        }
    }
    Ok(refused)
}

async fn write_call(
    client: &Client,
    table: &str,
    label: &'static str,
    items: Vec<Item>,
    max_attempts: u32,
    stop: &CancellationToken,
) -> Result<(), Failure> {
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
                let code = e.code().unwrap_or_default();
                if PERMANENT.contains(&code) {
                    metrics::counter!(metric::ITEMS_REFUSED, "table" => label, "code" => code.to_owned())
                        .increment(n as u64);
                    let reason = format!("{code}: {}", bounded(e.message().unwrap_or_default()));
                    return Err(Failure::Permanent(items_of(pending), reason));
                }
                last_error = aws_sdk_dynamodb::error::DisplayErrorContext(&e).to_string();
                let cause = if THROTTLED.contains(&code) {
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
            return Err(Failure::Gave(WriteFailed {
                unwritten: items_of(pending),
                attempts: attempt,
                last_error,
            }));
        }
        if CALLS.sleep(attempt, stop).await.is_err() {
            return Err(Failure::Gave(WriteFailed {
                unwritten: items_of(pending),
                attempts: attempt,
                last_error: "stopped by shutdown".into(),
            }));
        }
    }
}
