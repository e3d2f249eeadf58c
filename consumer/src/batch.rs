//! The core both front-ends share: a batch of Kinesis records in (KPL
//! aggregates and plain records), every event written to the events table,
//! one dead letter per record that held anything that cannot be an event
//! (or that DynamoDB refused for good), and, when writing fails, the first
//! record not fully written, so the caller resumes exactly there. Memory is
//! bounded whatever a page holds: items are written in parts of at most
//! 2,000, and a consumer that is stopping ends the page after the part it
//! is writing (a page of conversions takes a while), leaving the rest to be
//! read again.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use aws_sdk_dynamodb::Client;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::conversions::{Click, Conversion, Settler};
use crate::item::{decode_record, to_item};
use crate::metric;
use crate::writer::{Item, MAX_ITEMS_PER_CALL, Refused, WriteFailed, write_chunk};

pub use adtrack_reader::Record;
use adtrack_reader::dead_letter::{DeadLetter, MAX_REASON, truncated};

/// Where events, dead letters and conversions go.
#[derive(Debug, Clone)]
pub struct Tables {
    pub events: String,
    pub dead_letters: String,
    pub conversions: String,
    /// Seconds a conversion waits for a click that is not in the events
    /// table yet (see [`crate::conversions`]).
    pub click_wait_secs: u32,
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

/// Items held at once: a page whose records decode into more is written in
/// parts, so memory stays bounded whatever the page holds (one 1 MiB
/// aggregate can carry tens of thousands of events).
const FLUSH_ITEMS: usize = 2_000;

/// What a batch has decoded and not yet written.
#[derive(Default)]
struct Held {
    // Kinesis may deliver an event twice; one item per event id per call
    // (BatchWriteItem refuses duplicate keys in one call).
    items: HashMap<String, Pending>,
    dead: Vec<(usize, Item)>,
    /// User records per record read so far, for the dead letters of
    /// refused events.
    totals: Vec<usize>,
    /// Conversions and clicks among the held events, settled once the
    /// events are written.
    conversions: Vec<Conversion>,
    clicks: Vec<Click>,
}

/// Where one batch writes, and what stops it.
struct Writer<'a> {
    client: &'a Client,
    tables: &'a Tables,
    stop: &'a CancellationToken,
}

impl Held {
    fn len(&self) -> usize {
        self.items.len() + self.dead.len()
    }
}

/// Processes one batch, in order.
pub async fn process(
    client: &Client,
    tables: &Tables,
    records: &[Record],
    stop: &CancellationToken,
) -> BatchOutcome {
    let mut outcome = BatchOutcome::default();
    let mut held = Held::default();
    let w = Writer {
        client,
        tables,
        stop,
    };
    for (index, r) in records.iter().enumerate() {
        metrics::counter!(metric::RECORDS_READ).increment(1);
        let events = decode_record(&r.data);
        let total = events.len();
        held.totals.push(total);
        let mut bad = 0;
        let mut first_fault = None;
        for ev in events {
            let item = ev.and_then(|ev| {
                if let Some(c) = Conversion::of(&ev, index) {
                    held.conversions.push(c);
                }
                if let Some(c) = Click::of(&ev, index) {
                    held.clicks.push(c);
                }
                let id = ev.message_id.clone();
                to_item(ev, &r.shard_id, &r.sequence_number, tables.ttl_days).map(|item| (id, item))
            });
            match item {
                Ok((id, item)) => {
                    match held.items.entry(id) {
                        Entry::Occupied(mut o) => o.get_mut().item = item,
                        Entry::Vacant(v) => {
                            v.insert(Pending {
                                item,
                                record: index,
                            });
                        }
                    }
                    if held.len() >= FLUSH_ITEMS {
                        if !w.flush(records, &mut held, &mut outcome).await {
                            return outcome;
                        }
                        // Stopping: what is written is done; this record
                        // (partly written) and the rest are read again.
                        if stop.is_cancelled() {
                            outcome.first_failed = Some(index);
                            return outcome;
                        }
                    }
                }
                Err(e) => {
                    metrics::counter!(metric::RECORDS_BAD, "reason" => e.reason()).increment(1);
                    bad += 1;
                    first_fault.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_fault {
            let reason = if total == 1 {
                e.to_string()
            } else {
                format!("{bad} of {total} user records are not valid events; the first: {e}")
            };
            tracing::warn!(
                shard = r.shard_id,
                sequence = r.sequence_number,
                bad,
                events = total,
                reason = truncated(&reason, MAX_REASON),
                "dead-lettering a record that holds data that is not a valid event"
            );
            held.dead
                .push((index, dead_letter_item(r, &reason, bad, total)));
        }
    }
    w.flush(records, &mut held, &mut outcome).await;
    outcome
}

/// Writes what is held; false when some of it could not be written
/// (`outcome.first_failed` then names the first record not durable).
/// Events DynamoDB refuses for good are dead-lettered with their record.
impl Writer<'_> {
    async fn flush(&self, records: &[Record], held: &mut Held, outcome: &mut BatchOutcome) -> bool {
        let mut pending: Vec<Pending> = std::mem::take(&mut held.items).into_values().collect();
        pending.sort_by_key(|p| p.record);
        let mut all: Vec<(bool, usize, Item)> = pending
            .into_iter()
            .map(|p| (true, p.record, p.item))
            .collect();
        all.extend(
            std::mem::take(&mut held.dead)
                .into_iter()
                .map(|(i, item)| (false, i, item)),
        );
        let refused = self.write_all(all, outcome).await;
        let (conversions, clicks) = (
            std::mem::take(&mut held.conversions),
            std::mem::take(&mut held.clicks),
        );
        if outcome.first_failed.is_some() {
            // Their conversions and clicks are not settled either: read
            // again from the first record that has one.
            let first = conversions
                .iter()
                .map(|c| c.record)
                .chain(clicks.iter().map(|c| c.record))
                .min();
            lower_first_failed(outcome, first);
            return false;
        }
        self.dead_letter_refused_events(records, held, refused, outcome)
            .await;
        // The events are durable: now their conversions and late clicks.
        let settler = Settler {
            client: self.client,
            tables: self.tables,
            stop: self.stop,
        };
        // Boxed: the settling future is deep, and every front-end's future
        // would otherwise carry its whole layout.
        if let Err(record) = Box::pin(settler.settle(conversions, clicks)).await {
            lower_first_failed(outcome, Some(record));
        }
        outcome.first_failed.is_none()
    }

    /// Events DynamoDB refused for good: one dead letter per record they
    /// came from.
    async fn dead_letter_refused_events(
        &self,
        records: &[Record],
        held: &Held,
        refused: Vec<(bool, usize, Refused)>,
        outcome: &mut BatchOutcome,
    ) {
        let mut by_record: BTreeMap<usize, (usize, String)> = BTreeMap::new();
        for (is_event, record, r) in refused {
            if is_event {
                let entry = by_record.entry(record).or_insert((0, r.reason));
                entry.0 += 1;
            } else {
                dead_letter_refused(&r);
            }
        }
        if by_record.is_empty() {
            return;
        }
        let dead: Vec<(bool, usize, Item)> = by_record
            .into_iter()
            .map(|(i, (n, reason))| {
                let r = &records[i];
                let reason = format!("DynamoDB refused {n} event(s) of this record: {reason}");
                tracing::warn!(
                    shard = r.shard_id,
                    sequence = r.sequence_number,
                    reason,
                    "dead-lettering a record"
                );
                (false, i, dead_letter_item(r, &reason, n, held.totals[i]))
            })
            .collect();
        for (_, _, r) in self.write_all(dead, outcome).await {
            dead_letter_refused(&r);
        }
    }

    /// Writes items (events and dead letters, each with its record), 25 per
    /// call, several calls in flight; counts what was written into `outcome`
    /// and sets `first_failed` for what could not be. Returns the items
    /// refused for good.
    async fn write_all(
        &self,
        all: Vec<(bool, usize, Item)>,
        outcome: &mut BatchOutcome,
    ) -> Vec<(bool, usize, Refused)> {
        let (client, tables, stop) = (self.client, self.tables, self.stop);
        // Which record each item belongs to (by table and key), for failures.
        let key_of = |is_event: bool, item: &Item| -> Option<String> {
            let key = if is_event { "eventId" } else { "deadLetterId" };
            item.get(key).and_then(|v| v.as_s().ok()).cloned()
        };
        let mut record_of: HashMap<(bool, String), usize> = HashMap::new();
        for (is_event, record, item) in &all {
            if let Some(k) = key_of(*is_event, item) {
                record_of.entry((*is_event, k)).or_insert(*record);
            }
        }
        let mut chunks: Vec<(bool, Vec<usize>, Vec<Item>)> = Vec::new();
        for (is_event, record, item) in all {
            match chunks.last_mut() {
                Some((t, recs, its)) if *t == is_event && its.len() < MAX_ITEMS_PER_CALL => {
                    recs.push(record);
                    its.push(item);
                }
                _ => chunks.push((is_event, vec![record], vec![item])),
            }
        }
        let client = Arc::new(client.clone());
        let results: Vec<ChunkResult> =
            futures_util::stream::iter(chunks.into_iter().map(|(is_event, recs, its)| {
                let client = client.clone();
                let stop = stop.clone();
                let attempts = tables.max_attempts;
                let (table, label) = if is_event {
                    (tables.events.clone(), "events")
                } else {
                    (tables.dead_letters.clone(), "dead_letters")
                };
                async move {
                    let r = write_chunk(&client, &table, label, its, attempts, &stop).await;
                    (is_event, recs, r)
                }
            }))
            .buffer_unordered(tables.write_concurrency.max(1))
            .collect()
            .await;
        let mut refused_all = Vec::new();
        for (is_event, recs, r) in results {
            let count = |outcome: &mut BatchOutcome, n: usize| {
                if is_event {
                    outcome.events_written += n;
                } else {
                    outcome.dead_letters += n;
                }
            };
            match r {
                Ok(refused) => {
                    count(outcome, recs.len() - refused.len());
                    for r in refused {
                        let record = key_of(is_event, &r.item)
                            .and_then(|k| record_of.get(&(is_event, k)).copied())
                            .unwrap_or_else(|| recs.iter().copied().min().unwrap_or(0));
                        refused_all.push((is_event, record, r));
                    }
                }
                Err(e) => {
                    // The earliest record with an item left unwritten.
                    let first = e
                        .unwritten
                        .iter()
                        .filter_map(|item| key_of(is_event, item))
                        .filter_map(|k| record_of.get(&(is_event, k)).copied())
                        .min()
                        .unwrap_or_else(|| recs.iter().copied().min().unwrap_or(0));
                    count(outcome, recs.len().saturating_sub(e.unwritten.len()));
                    let table = if is_event { "events" } else { "dead_letters" };
                    tracing::warn!(table, error = %e, first_record = first, "items not written");
                    lower_first_failed(outcome, Some(first));
                }
            }
        }
        refused_all
    }
}

/// The earlier of two records, either of which may be none.
pub(crate) fn earliest(a: Option<usize>, b: Option<usize>) -> Option<usize> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Moves `first_failed` back to `record` if that is earlier.
fn lower_first_failed(outcome: &mut BatchOutcome, record: Option<usize>) {
    outcome.first_failed = earliest(outcome.first_failed, record);
}

/// A dead letter DynamoDB refused for good: counted and logged, since it
/// has nowhere else to go.
fn dead_letter_refused(r: &Refused) {
    metrics::counter!(metric::RECORDS_BAD, "reason" => "dead_letter_refused").increment(1);
    tracing::error!(
        reason = r.reason,
        "DynamoDB refused a dead letter; it is dropped"
    );
}

/// One call's items: events (true) or dead letters, their records, and
/// what became of them.
type ChunkResult = (bool, Vec<usize>, Result<Vec<Refused>, WriteFailed>);

fn dead_letter_item(r: &Record, reason: &str, bad: usize, total: usize) -> Item {
    let mut d = DeadLetter::new(format!("{}/{}", r.shard_id, r.sequence_number), r, reason);
    d.bad_events = Some(bad);
    d.events = Some(total);
    d.item()
}
