//! The core both front-ends share: a batch of Kinesis records in (KPL
//! aggregates and plain records), every event written to the events table,
//! every record or event that cannot be one written to the dead-letter
//! table, and, when writing fails for good, the first record not fully
//! written, so the caller resumes exactly there.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::item::{decode_record, to_item};
use crate::metric;
use crate::writer::{Item, MAX_ITEMS_PER_CALL, write_chunk};

/// One Kinesis record as a front-end received it.
#[derive(Debug, Clone)]
pub struct InRecord {
    pub shard_id: String,
    pub sequence_number: String,
    pub data: Bytes,
}

/// Where events and dead letters go.
#[derive(Debug, Clone)]
pub struct Tables {
    pub events: String,
    pub dead_letters: String,
    pub ttl_days: u32,
    /// BatchWriteItem calls in flight at once.
    pub write_concurrency: usize,
    /// Attempts per call before the batch is reported failed.
    pub max_attempts: u32,
}

/// The result of one batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub events_written: usize,
    pub dead_letters: usize,
    /// Index of the first record whose events (or dead letter) could not be
    /// written; every record before it is durable. `None`: all written.
    pub first_failed: Option<usize>,
}

struct Pending {
    item: Item,
    /// Earliest record that carries this event id.
    record: usize,
}

/// Processes one batch, in order.
pub async fn process(
    client: &Client,
    tables: &Tables,
    records: &[InRecord],
    stop: &CancellationToken,
) -> BatchOutcome {
    let mut outcome = BatchOutcome::default();
    // Kinesis may deliver an event twice; one item per event id per batch
    // (BatchWriteItem refuses duplicate keys in one call).
    let mut items: HashMap<String, Pending> = HashMap::new();
    let mut dead: Vec<(usize, Item)> = Vec::new();
    for (index, r) in records.iter().enumerate() {
        metrics::counter!(metric::RECORDS_READ).increment(1);
        for (n, ev) in decode_record(&r.data).into_iter().enumerate() {
            match ev {
                Ok(ev) => {
                    let id = ev.message_id.clone();
                    let item = to_item(ev, &r.shard_id, &r.sequence_number, tables.ttl_days);
                    items
                        .entry(id)
                        .and_modify(|p| p.item = item.clone())
                        .or_insert(Pending {
                            item,
                            record: index,
                        });
                }
                Err(e) => {
                    metrics::counter!(metric::RECORDS_BAD, "reason" => e.reason()).increment(1);
                    tracing::warn!(
                        shard = r.shard_id,
                        sequence = r.sequence_number,
                        error = %e,
                        "dead-lettering data that is not a valid event"
                    );
                    dead.push((index, dead_letter_item(r, n, &e.to_string())));
                }
            }
        }
    }
    // Which record each item belongs to (by table and key), for failures.
    let mut record_of: HashMap<(bool, String), usize> = HashMap::new();
    for (id, p) in &items {
        record_of.insert((true, id.clone()), p.record);
    }
    for (i, item) in &dead {
        if let Some(AttributeValue::S(k)) = item.get("deadLetterId") {
            record_of.insert((false, k.clone()), *i);
        }
    }
    let mut pending: Vec<Pending> = items.into_values().collect();
    pending.sort_by_key(|p| p.record);
    let dead_count = dead.len();
    let mut all: Vec<(String, usize, Item)> = pending
        .into_iter()
        .map(|p| (tables.events.clone(), p.record, p.item))
        .collect();
    all.extend(
        dead.into_iter()
            .map(|(i, item)| (tables.dead_letters.clone(), i, item)),
    );

    // Chunks of 25 per table, several calls in flight.
    let mut chunks: Vec<(String, Vec<usize>, Vec<Item>)> = Vec::new();
    for (table, record, item) in all {
        match chunks.last_mut() {
            Some((t, recs, its)) if *t == table && its.len() < MAX_ITEMS_PER_CALL => {
                recs.push(record);
                its.push(item);
            }
            _ => chunks.push((table, vec![record], vec![item])),
        }
    }
    let client = Arc::new(client.clone());
    let results: Vec<(
        String,
        Vec<usize>,
        Result<usize, crate::writer::WriteFailed>,
    )> = futures_util::stream::iter(chunks.into_iter().map(|(table, recs, its)| {
        let client = client.clone();
        let stop = stop.clone();
        let attempts = tables.max_attempts;
        let label = if table == tables.events {
            "events"
        } else {
            "dead_letters"
        };
        async move {
            let n = its.len();
            let r = write_chunk(&client, &table, label, its, attempts, &stop)
                .await
                .map(|()| n);
            (table, recs, r)
        }
    }))
    .buffer_unordered(tables.write_concurrency.max(1))
    .collect()
    .await;
    for (table, recs, r) in results {
        match r {
            Ok(n) if table == tables.events => outcome.events_written += n,
            Ok(n) => outcome.dead_letters += n,
            Err(e) => {
                // The earliest record with an item left unwritten.
                let key = if table == tables.events {
                    "eventId"
                } else {
                    "deadLetterId"
                };
                let first = e
                    .unwritten
                    .iter()
                    .filter_map(|item| item.get(key).and_then(|v| v.as_s().ok()))
                    .filter_map(|k| record_of.get(&(table == tables.events, k.clone())))
                    .copied()
                    .min()
                    .unwrap_or_else(|| recs.iter().copied().min().unwrap_or(0));
                let written = recs.len() - e.unwritten.len();
                if table == tables.events {
                    outcome.events_written += written;
                } else {
                    outcome.dead_letters += written;
                }
                tracing::warn!(table, error = %e, first_record = first, "items not written");
                outcome.first_failed = Some(outcome.first_failed.map_or(first, |f| f.min(first)));
            }
        }
    }
    debug_assert!(outcome.dead_letters <= dead_count);
    outcome
}

fn dead_letter_item(r: &InRecord, n: usize, reason: &str) -> Item {
    let mut item = HashMap::new();
    item.insert(
        "deadLetterId".to_owned(),
        AttributeValue::S(format!("{}/{}/{n}", r.shard_id, r.sequence_number)),
    );
    item.insert("shardId".to_owned(), AttributeValue::S(r.shard_id.clone()));
    item.insert(
        "sequenceNumber".to_owned(),
        AttributeValue::S(r.sequence_number.clone()),
    );
    item.insert("reason".to_owned(), AttributeValue::S(reason.to_owned()));
    item.insert(
        "failedAt".to_owned(),
        AttributeValue::N(time::OffsetDateTime::now_utc().unix_timestamp().to_string()),
    );
    // DynamoDB items are bounded (400 KB): keep the first 300 KB of the raw bytes.
    let raw = &r.data[..r.data.len().min(300 * 1024)];
    item.insert(
        "data".to_owned(),
        AttributeValue::B(Blob::new(raw.to_vec())),
    );
    item.insert(
        "dataBytes".to_owned(),
        AttributeValue::N(r.data.len().to_string()),
    );
    item
}
