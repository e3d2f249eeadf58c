//! Conversions matched to their clicks: one item per program and
//! transaction in the conversions table, whatever the duplicates and
//! replays, attributed to the click the postback names when that click is a
//! click of the same program within the program's attribution window.
//!
//! # Table layout
//!
//! Conversions table (`CONVERSIONS_TABLE`), partition key `conversionId` =
//! `{programId}#{txid}`. The first postback of a transaction writes the item
//! (conditional on its absence); another postback of it only adds its event
//! id to `duplicateEventIds` (a string set, so a replay adds nothing); the
//! postback's own event read again changes nothing. Attributes: `programId`,
//! `txid`, `eventId` (the postback's event), `ts` (ms, when the tracker took
//! the postback), `customerId`, `value` (N, when sent), `currency`,
//! `clickId` (as sent), `attributionWindowDays`, `recordedAt` (ms), and
//! either `attributed: true` with `clickEventId`, `clickTs` (ms),
//! `secondsToConvert` and `clickParams` (the click's campaign parameters),
//! or `attributed: false` with `reason`: `no_click_id`, `click_not_found`,
//! `other_program` or `outside_window`.
//!
//! Global secondary index `byProgramTime` (`programId`, `ts`): one program's
//! conversions over a time range.
//!
//! # A click that arrives after its conversion
//!
//! Shards lag independently, so a conversion can be read before its click.
//! Its item is then written `click_not_found` and a marker item
//! `~awaiting#{clickId}` (no `programId`, so not in the index) names it in
//! `conversionIds` until `awaitUntil` (`CONSUMER_CLICK_WAIT_SECS` after it
//! was recorded). Every click the consumer writes is looked up among the
//! markers (one `BatchGetItem` per 100 clicks); a marker found attributes
//! its conversions (each update conditional on the item still waiting) and
//! is deleted. After writing its marker the conversion looks for the click
//! once more, so a click written between the two steps is not missed.
//! Every step is idempotent, so a batch read again settles the same way.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use adtrack_proto::v1::{EventType, TrackingEvent, ValidationOutcome};
use adtrack_service::retry::CALLS;

use crate::batch::{Tables, earliest};
use crate::metric;
use crate::writer::PERMANENT;

type Item = HashMap<String, AttributeValue>;

/// A click may be stamped a little after its conversion by another
/// tracker's clock; more than this is not the click that led to it.
const CLOCK_SKEW_MS: i64 = 60_000;
/// Keys per `BatchGetItem`.
const MAX_KEYS_PER_GET: usize = 100;
/// Conversions named by one marker at most (a marker stays a small item).
const MAX_AWAITING: usize = 100;
/// Duplicate postbacks' event ids kept on one conversion at most.
const MAX_DUPLICATES: usize = 100;
/// Single-item calls in flight per BatchWriteItem call allowed
/// (`CONSUMER_WRITE_CONCURRENCY`).
const CALLS_PER_BATCH_CALL: usize = 4;
/// Prefix of the marker items: `~` is never in a program id, so no
/// conversion id can be a marker's.
const AWAITING: &str = "~awaiting#";
/// The route of click redirects, the only clicks attributed.
const CLICK_SOURCE: &str = "click";

/// A conversion event, as the consumer needs it, with the index of its
/// Kinesis record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversion {
    pub record: usize,
    pub event_id: String,
    pub program_id: String,
    pub customer_id: i32,
    pub ts: i64,
    pub txid: String,
    pub click_id: String,
    pub value: String,
    pub currency: String,
    pub window_days: u32,
}

impl Conversion {
    /// The conversion in an event: a valid postback with a transaction id.
    pub fn of(ev: &TrackingEvent, record: usize) -> Option<Self> {
        let is_postback = ev.event_type == EventType::Conversion as i32
            && ev.source == "postback"
            && ev.validation == ValidationOutcome::Valid as i32
            && !ev.transaction_id.is_empty();
        is_postback.then(|| Self {
            record,
            event_id: ev.message_id.clone(),
            program_id: ev.programid.clone(),
            customer_id: ev.customer_id,
            ts: ev.timestamp_ms,
            txid: ev.transaction_id.clone(),
            click_id: ev.click_id.clone(),
            value: ev.conversion_value.clone(),
            currency: ev.currency.clone(),
            window_days: ev.attribution_window_days,
        })
    }

    pub fn conversion_id(&self) -> String {
        format!("{}#{}", self.program_id, self.txid)
    }
}

/// A click as the events table holds it (what attribution reads).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Click {
    /// The Kinesis record it was read from (0 when read from the table).
    pub record: usize,
    pub event_id: String,
    pub program_id: String,
    pub event_type: String,
    /// The route that took it: only the click redirect (`click`) makes a
    /// click a conversion can be attributed to (a page can post events of
    /// type click, and would learn their ids).
    pub source: String,
    /// Validated against a program that exists and is active (a click
    /// taken while Redis was down was never redirected).
    pub valid: bool,
    pub ts: i64,
    pub params: HashMap<String, String>,
}

impl Click {
    /// A valid click redirect the consumer writes (for late matching).
    pub fn of(ev: &TrackingEvent, record: usize) -> Option<Self> {
        let is_click = ev.event_type == EventType::Click as i32
            && ev.source == CLICK_SOURCE
            && ev.validation == ValidationOutcome::Valid as i32;
        is_click.then(|| Self {
            record,
            event_id: ev.message_id.clone(),
            program_id: ev.programid.clone(),
            event_type: EventType::Click.name().to_owned(),
            source: ev.source.clone(),
            valid: true,
            ts: ev.timestamp_ms,
            params: ev.extra.clone().into_iter().collect(),
        })
    }

    fn from_item(event_id: &str, item: &Item) -> Self {
        Self {
            record: 0,
            event_id: event_id.to_owned(),
            program_id: text(item, "programId"),
            event_type: text(item, "eventType"),
            source: text(item, "source"),
            valid: text(item, "validation") == ValidationOutcome::Valid.name(),
            ts: number(item, "ts").unwrap_or(0),
            params: item
                .get("extra")
                .and_then(|v| v.as_m().ok())
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_s().ok()?.clone())))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

fn number(item: &Item, key: &str) -> Option<i64> {
    item.get(key)?.as_n().ok()?.parse().ok()
}

/// A string attribute of an item, or "".
fn text(item: &Item, key: &str) -> String {
    item.get(key)
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default()
}

/// What a conversion is attributed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribution {
    Attributed {
        click_event_id: String,
        click_ts: i64,
        seconds_to_convert: i64,
        click_params: HashMap<String, String>,
    },
    Unattributed(&'static str),
}

/// Attributes a conversion to the click it names (`None`: not in the
/// events table).
pub fn attribute(conv: &Conversion, click: Option<&Click>) -> Attribution {
    if conv.click_id.is_empty() {
        return Attribution::Unattributed("no_click_id");
    }
    let Some(click) = click
        .filter(|c| c.event_type == EventType::Click.name() && c.source == CLICK_SOURCE && c.valid)
    else {
        return Attribution::Unattributed("click_not_found");
    };
    if click.program_id != conv.program_id {
        return Attribution::Unattributed("other_program");
    }
    let window_ms = i64::from(conv.window_days) * 86_400_000;
    let age = conv.ts - click.ts;
    if age > window_ms || age < -CLOCK_SKEW_MS {
        return Attribution::Unattributed("outside_window");
    }
    Attribution::Attributed {
        click_event_id: click.event_id.clone(),
        click_ts: click.ts,
        seconds_to_convert: age.max(0) / 1000,
        click_params: click.params.clone(),
    }
}

/// Why settling conversions stopped.
#[derive(Debug, thiserror::Error)]
#[error("conversions not settled: {0}")]
pub struct Unsettled(pub String);

/// One DynamoDB attempt's failure: worth retrying or not.
enum Attempt {
    Retry(String),
    Permanent(String),
}

fn classify<E, R>(e: &SdkError<E, R>) -> Attempt
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let code = e.code().unwrap_or_default();
    let text = aws_sdk_dynamodb::error::DisplayErrorContext(e).to_string();
    if PERMANENT.contains(&code) {
        Attempt::Permanent(text)
    } else {
        Attempt::Retry(text)
    }
}

/// A conditional write's answer: true when written, false when its
/// condition did not hold (told by the error code), else how it failed.
fn conditional<T, E, R>(r: Result<T, SdkError<E, R>>) -> Result<bool, Attempt>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match r {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(false),
        Err(e) => Err(classify(&e)),
    }
}

/// Where conversions go, and what stops the retries.
pub struct Settler<'a> {
    pub client: &'a Client,
    pub tables: &'a Tables,
    pub stop: &'a CancellationToken,
}

/// What became of one conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recorded {
    New(bool),
    Duplicate,
    Replayed,
    Refused,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl Settler<'_> {
    /// Runs one DynamoDB call until it answers, retrying what can be
    /// retried (`max_attempts`, 0: until stopped). `Ok(None)`: refused for
    /// good (logged and counted by the caller).
    async fn call<T, F, Fut>(&self, what: &'static str, mut f: F) -> Result<Option<T>, Unsettled>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Attempt>>,
    {
        let mut attempt: u32 = 0;
        loop {
            let last = match f().await {
                Ok(v) => return Ok(Some(v)),
                Err(Attempt::Permanent(reason)) => {
                    tracing::warn!(what, reason, "DynamoDB refused a conversion step for good");
                    return Ok(None);
                }
                Err(Attempt::Retry(reason)) => reason,
            };
            metrics::counter!(metric::WRITE_RETRIES, "cause" => "call_failed").increment(1);
            attempt = attempt.saturating_add(1);
            if attempt == 1 || attempt.is_power_of_two() {
                tracing::warn!(
                    what,
                    attempt,
                    error = last,
                    "conversion step failed; retrying"
                );
            }
            let max = self.tables.max_attempts;
            if (max > 0 && attempt >= max) || CALLS.sleep(attempt, self.stop).await.is_err() {
                return Err(Unsettled(format!("{what}: {last}")));
            }
        }
    }

    /// Settles the conversions and the late clicks of written events.
    /// `Err` names the first record whose conversion is not settled (the
    /// caller reads it again; every step is idempotent).
    pub async fn settle(
        &self,
        conversions: Vec<Conversion>,
        clicks: Vec<Click>,
    ) -> Result<(), usize> {
        // One item per call (a batch write carries 25): more of them in
        // flight for the same load on the table.
        let concurrency = self.tables.write_concurrency.max(1) * CALLS_PER_BATCH_CALL;
        // The postbacks of one transaction one after another, in the order
        // they were read, so the first one read wins; transactions in
        // parallel. A failure leaves the rest of its transaction to the
        // reading again (from the failed record).
        let mut by_id: BTreeMap<String, Vec<Conversion>> = BTreeMap::new();
        for c in conversions {
            by_id.entry(c.conversion_id()).or_default().push(c);
        }
        let results: Vec<Vec<(usize, Result<Recorded, Unsettled>)>> =
            futures_util::stream::iter(by_id.into_values().map(|mut group| async move {
                group.sort_by_key(|c| c.record);
                let mut done = Vec::with_capacity(group.len());
                for c in group {
                    let record = c.record;
                    let r = self.record(c).await;
                    let failed = r.is_err();
                    done.push((record, r));
                    if failed {
                        break;
                    }
                }
                done
            }))
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let mut first_failed: Option<usize> = None;
        for (record, r) in results.into_iter().flatten() {
            match r {
                Ok(recorded) => {
                    let result = match recorded {
                        Recorded::New(true) => "attributed",
                        Recorded::New(false) => "unattributed",
                        Recorded::Duplicate => "duplicate",
                        Recorded::Replayed => "replayed",
                        Recorded::Refused => "refused",
                    };
                    metrics::counter!(metric::CONVERSIONS, "result" => result).increment(1);
                }
                Err(e) => {
                    tracing::warn!(record, error = %e, "a conversion is not settled");
                    first_failed = earliest(first_failed, Some(record));
                }
            }
        }
        // The clicks whatever became of the conversions: their records may
        // come before the first failed one, and would not be read again.
        let first_click = clicks.iter().map(|c| c.record).min();
        if let Err(e) = self.late_clicks(clicks).await {
            tracing::warn!(error = %e, "late clicks not matched");
            first_failed = earliest(first_failed, first_click);
        }
        first_failed.map_or(Ok(()), Err)
    }

    /// One item by its key, consistently; `Ok(None)` when the read was
    /// refused for good, `Ok(Some(None))` when there is no such item.
    async fn get_item(
        &self,
        what: &'static str,
        table: &str,
        key: (&str, &str),
        projection: Option<&str>,
    ) -> Result<Option<Option<Item>>, Unsettled> {
        self.call(what, || async {
            let mut req = self
                .client
                .get_item()
                .table_name(table)
                .key(key.0, AttributeValue::S(key.1.to_owned()))
                .consistent_read(true);
            if let Some(p) = projection {
                // `source` is a reserved word in expressions.
                req = req.projection_expression(p).set_expression_attribute_names(
                    p.contains("#s")
                        .then(|| HashMap::from([("#s".to_owned(), "source".to_owned())])),
                );
            }
            req.send().await.map(|o| o.item).map_err(|e| classify(&e))
        })
        .await
    }

    /// The click an event id names, from the events table.
    async fn click(&self, event_id: &str) -> Result<Option<Option<Click>>, Unsettled> {
        let item = self
            .get_item(
                "GetItem click",
                &self.tables.events,
                ("eventId", event_id),
                Some("programId, eventType, #s, ts, extra, validation"),
            )
            .await?;
        Ok(item.map(|i| i.map(|item| Click::from_item(event_id, &item))))
    }

    /// Records one conversion (see the module docs).
    async fn record(&self, conv: Conversion) -> Result<Recorded, Unsettled> {
        // A read refused for good finds no click: the conversion is still
        // recorded (unattributed, waiting for it).
        let click = match conv.click_id.as_str() {
            "" => None,
            id => self.click(id).await?.flatten(),
        };
        let attribution = attribute(&conv, click.as_ref());
        let id = conv.conversion_id();
        let item = conversion_item(&conv, &attribution);
        let put = self
            .call("PutItem conversion", || async {
                conditional(
                    self.client
                        .put_item()
                        .table_name(&self.tables.conversions)
                        .set_item(Some(item.clone()))
                        .condition_expression("attribute_not_exists(conversionId)")
                        .send()
                        .await,
                )
            })
            .await?;
        let recorded = match put {
            None => return Ok(Recorded::Refused),
            Some(true) => Recorded::New(matches!(attribution, Attribution::Attributed { .. })),
            Some(false) => {
                if self.add_duplicate(&id, &conv.event_id).await? {
                    return Ok(Recorded::Duplicate);
                }
                // Another postback's item (a duplicate read again, or past
                // the cap of duplicates kept): nothing of this one counts.
                if self.owner(&id).await?.as_deref() != Some(conv.event_id.as_str()) {
                    return Ok(Recorded::Duplicate);
                }
                // Its own event read again: redo the follow-ups (each is
                // idempotent), in case the first reading stopped before them.
                self.late_attribute(&id, &attribution).await?;
                Recorded::Replayed
            }
        };
        if attribution == Attribution::Unattributed("click_not_found") {
            self.await_click(&conv, &id).await?;
        }
        Ok(recorded)
    }

    /// The event id of the postback whose item `id` is.
    async fn owner(&self, id: &str) -> Result<Option<String>, Unsettled> {
        let item = self
            .get_item(
                "GetItem conversion owner",
                &self.tables.conversions,
                ("conversionId", id),
                Some("eventId"),
            )
            .await?;
        Ok(item.flatten().map(|i| text(&i, "eventId")))
    }

    /// Adds a duplicate postback's event id to the item; false when the
    /// item is this very event's or already names it (a replay), or names
    /// [`MAX_DUPLICATES`] duplicates already.
    async fn add_duplicate(&self, id: &str, event_id: &str) -> Result<bool, Unsettled> {
        let added = self
            .call("UpdateItem duplicate", || async {
                conditional(self
                    .client
                    .update_item()
                    .table_name(&self.tables.conversions)
                    .key("conversionId", AttributeValue::S(id.to_owned()))
                    .update_expression("ADD duplicateEventIds :e")
                    .condition_expression(
                        "attribute_exists(conversionId) AND eventId <> :id \
                         AND NOT contains(duplicateEventIds, :id) \
                         AND (attribute_not_exists(duplicateEventIds) OR size(duplicateEventIds) < :max)",
                    )
                    .expression_attribute_values(":e", AttributeValue::Ss(vec![event_id.to_owned()]))
                    .expression_attribute_values(":id", AttributeValue::S(event_id.to_owned()))
                    .expression_attribute_values(":max", AttributeValue::N(MAX_DUPLICATES.to_string()))
                    .send()
                    .await)
            })
            .await?;
        Ok(added.unwrap_or(false))
    }

    /// Leaves a marker for a conversion whose click is not in the table
    /// yet, then looks for the click once more.
    async fn await_click(&self, conv: &Conversion, id: &str) -> Result<(), Unsettled> {
        let now = now_ms();
        let until = now + i64::from(self.tables.click_wait_secs) * 1000;
        let marker = format!("{AWAITING}{}", conv.click_id);
        // Not written when the click id is named by too many conversions
        // already: this one then stays unattributed.
        self.call("UpdateItem awaiting", || async {
            conditional(
                self.client
                    .update_item()
                    .table_name(&self.tables.conversions)
                    .key("conversionId", AttributeValue::S(marker.clone()))
                    .update_expression("ADD conversionIds :c SET awaitUntil = :u, expiresAt = :x")
                    .condition_expression(
                        "attribute_not_exists(conversionIds) OR size(conversionIds) < :max",
                    )
                    .expression_attribute_values(":c", AttributeValue::Ss(vec![id.to_owned()]))
                    .expression_attribute_values(":u", AttributeValue::N(until.to_string()))
                    .expression_attribute_values(
                        ":x",
                        AttributeValue::N((until / 1000 + 86_400).to_string()),
                    )
                    .expression_attribute_values(
                        ":max",
                        AttributeValue::N(MAX_AWAITING.to_string()),
                    )
                    .send()
                    .await,
            )
            .map(|_| ())
        })
        .await?;
        if let Some(Some(click)) = self.click(&conv.click_id).await? {
            let attribution = attribute(conv, Some(&click));
            self.late_attribute(id, &attribution).await?;
        }
        Ok(())
    }

    /// Settles a conversion still waiting for its click (conditional on
    /// that, so it never changes a settled one). True when it changed it.
    async fn late_attribute(&self, id: &str, attribution: &Attribution) -> Result<bool, Unsettled> {
        let (expression, values) = match attribution {
            Attribution::Attributed {
                click_event_id,
                click_ts,
                seconds_to_convert,
                click_params,
            } => (
                "SET attributed = :t, clickEventId = :c, clickTs = :ct, secondsToConvert = :s, \
                 clickParams = :p REMOVE reason",
                vec![
                    (":t", AttributeValue::Bool(true)),
                    (":c", AttributeValue::S(click_event_id.clone())),
                    (":ct", AttributeValue::N(click_ts.to_string())),
                    (":s", AttributeValue::N(seconds_to_convert.to_string())),
                    (":p", params_value(click_params)),
                ],
            ),
            Attribution::Unattributed("click_not_found") => return Ok(false),
            Attribution::Unattributed(reason) => (
                "SET reason = :r",
                vec![(":r", AttributeValue::S((*reason).to_owned()))],
            ),
        };
        let changed = self
            .call("UpdateItem attribution", || async {
                let mut req = self
                    .client
                    .update_item()
                    .table_name(&self.tables.conversions)
                    .key("conversionId", AttributeValue::S(id.to_owned()))
                    .update_expression(expression)
                    .condition_expression("attributed = :f AND reason = :nf")
                    .expression_attribute_values(":f", AttributeValue::Bool(false))
                    .expression_attribute_values(
                        ":nf",
                        AttributeValue::S("click_not_found".into()),
                    );
                for (k, v) in &values {
                    req = req.expression_attribute_values(*k, v.clone());
                }
                conditional(req.send().await)
            })
            .await?;
        let changed = changed.unwrap_or(false);
        if changed && matches!(attribution, Attribution::Attributed { .. }) {
            metrics::counter!(metric::CONVERSIONS, "result" => "late_attributed").increment(1);
        }
        Ok(changed)
    }

    /// Matches written clicks with conversions that were waiting for them.
    async fn late_clicks(&self, clicks: Vec<Click>) -> Result<(), Unsettled> {
        for chunk in clicks.chunks(MAX_KEYS_PER_GET) {
            let markers = self.markers(chunk).await?;
            let now = now_ms();
            for (click, marker) in chunk.iter().filter_map(|c| {
                markers
                    .get(&format!("{AWAITING}{}", c.event_id))
                    .map(|m| (c, m))
            }) {
                if number(marker, "awaitUntil").is_some_and(|until| now <= until) {
                    let ids = marker
                        .get("conversionIds")
                        .and_then(|v| v.as_ss().ok())
                        .cloned()
                        .unwrap_or_default();
                    for id in ids {
                        let waiting = self.waiting_conversion(&id).await?;
                        // Only a conversion that names this very click.
                        if let Some(conv) = waiting.filter(|c| c.click_id == click.event_id) {
                            self.late_attribute(&id, &attribute(&conv, Some(click)))
                                .await?;
                        }
                    }
                }
                self.remove_marker(&click.event_id).await?;
            }
        }
        Ok(())
    }

    /// The markers of these clicks that exist.
    async fn markers(&self, clicks: &[Click]) -> Result<HashMap<String, Item>, Unsettled> {
        let mut found = HashMap::new();
        // BatchGetItem refuses a key named twice.
        let ids: std::collections::BTreeSet<&str> =
            clicks.iter().map(|c| c.event_id.as_str()).collect();
        let mut keys: Vec<Item> = ids
            .into_iter()
            .map(|id| {
                HashMap::from([(
                    "conversionId".to_owned(),
                    AttributeValue::S(format!("{AWAITING}{id}")),
                )])
            })
            .collect();
        while !keys.is_empty() {
            let batch = std::mem::take(&mut keys);
            let out = self
                .call("BatchGetItem awaiting", || async {
                    let ka = KeysAndAttributes::builder()
                        .set_keys(Some(batch.clone()))
                        .consistent_read(true)
                        .build()
                        .map_err(|e| Attempt::Permanent(e.to_string()))?;
                    self.client
                        .batch_get_item()
                        .request_items(&self.tables.conversions, ka)
                        .send()
                        .await
                        .map_err(|e| classify(&e))
                })
                .await?;
            let Some(out) = out else { break };
            for item in out
                .responses
                .and_then(|mut r| r.remove(&self.tables.conversions))
                .unwrap_or_default()
            {
                if let Some(AttributeValue::S(k)) = item.get("conversionId") {
                    found.insert(k.clone(), item);
                }
            }
            if let Some(left) = out
                .unprocessed_keys
                .and_then(|mut u| u.remove(&self.tables.conversions))
            {
                keys = left.keys;
                metrics::counter!(metric::WRITE_RETRIES, "cause" => "unprocessed")
                    .increment(keys.len() as u64);
            }
        }
        Ok(found)
    }

    /// A conversion, read back from its item.
    async fn waiting_conversion(&self, id: &str) -> Result<Option<Conversion>, Unsettled> {
        let item = self
            .get_item(
                "GetItem conversion",
                &self.tables.conversions,
                ("conversionId", id),
                None,
            )
            .await?;
        let Some(Some(item)) = item else {
            return Ok(None);
        };
        Ok(Some(Conversion {
            record: 0,
            event_id: text(&item, "eventId"),
            program_id: text(&item, "programId"),
            customer_id: 0,
            ts: number(&item, "ts").unwrap_or(0),
            txid: text(&item, "txid"),
            click_id: text(&item, "clickId"),
            value: String::new(),
            currency: String::new(),
            window_days: number(&item, "attributionWindowDays").unwrap_or(0) as u32,
        }))
    }

    async fn remove_marker(&self, click_id: &str) -> Result<(), Unsettled> {
        self.call("DeleteItem awaiting", || async {
            self.client
                .delete_item()
                .table_name(&self.tables.conversions)
                .key(
                    "conversionId",
                    AttributeValue::S(format!("{AWAITING}{click_id}")),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify(&e))
        })
        .await?;
        Ok(())
    }
}

fn params_value(params: &HashMap<String, String>) -> AttributeValue {
    AttributeValue::M(
        params
            .iter()
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .map(|(k, v)| (k.clone(), AttributeValue::S(v.clone())))
            .collect(),
    )
}

/// The conversion's item (see the module docs).
pub fn conversion_item(conv: &Conversion, attribution: &Attribution) -> Item {
    let mut item: Item = HashMap::from([
        (
            "conversionId".into(),
            AttributeValue::S(conv.conversion_id()),
        ),
        (
            "programId".into(),
            AttributeValue::S(conv.program_id.clone()),
        ),
        ("txid".into(), AttributeValue::S(conv.txid.clone())),
        ("eventId".into(), AttributeValue::S(conv.event_id.clone())),
        ("ts".into(), AttributeValue::N(conv.ts.to_string())),
        (
            "customerId".into(),
            AttributeValue::N(conv.customer_id.to_string()),
        ),
        (
            "attributionWindowDays".into(),
            AttributeValue::N(conv.window_days.to_string()),
        ),
        ("recordedAt".into(), AttributeValue::N(now_ms().to_string())),
    ]);
    let mut put_s = |k: &str, v: &str| {
        if !v.is_empty() {
            item.insert(k.into(), AttributeValue::S(v.to_owned()));
        }
    };
    put_s("currency", &conv.currency);
    put_s("clickId", &conv.click_id);
    if !conv.value.is_empty() {
        item.insert("value".into(), AttributeValue::N(conv.value.clone()));
    }
    match attribution {
        Attribution::Attributed {
            click_event_id,
            click_ts,
            seconds_to_convert,
            click_params,
        } => {
            item.insert("attributed".into(), AttributeValue::Bool(true));
            item.insert(
                "clickEventId".into(),
                AttributeValue::S(click_event_id.clone()),
            );
            item.insert("clickTs".into(), AttributeValue::N(click_ts.to_string()));
            item.insert(
                "secondsToConvert".into(),
                AttributeValue::N(seconds_to_convert.to_string()),
            );
            item.insert("clickParams".into(), params_value(click_params));
        }
        Attribution::Unattributed(reason) => {
            item.insert("attributed".into(), AttributeValue::Bool(false));
            item.insert("reason".into(), AttributeValue::S((*reason).to_owned()));
        }
    }
    item
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(click_id: &str, ts: i64) -> Conversion {
        Conversion {
            record: 0,
            event_id: "conv-1".into(),
            program_id: "p".into(),
            customer_id: 1,
            ts,
            txid: "T1".into(),
            click_id: click_id.into(),
            value: "12.50".into(),
            currency: "EUR".into(),
            window_days: 30,
        }
    }

    fn click(program: &str, ts: i64) -> Click {
        Click {
            record: 0,
            event_id: "click-1".into(),
            program_id: program.into(),
            event_type: "click".into(),
            source: "click".into(),
            valid: true,
            ts,
            params: HashMap::from([("utm_campaign".into(), "spring".into())]),
        }
    }

    #[test]
    fn attribution_needs_a_click_of_the_program_within_the_window() {
        let day = 86_400_000;
        let c = conv("click-1", 10 * day);
        assert_eq!(
            attribute(&c, Some(&click("p", 10 * day - 90_000))),
            Attribution::Attributed {
                click_event_id: "click-1".into(),
                click_ts: 10 * day - 90_000,
                seconds_to_convert: 90,
                click_params: HashMap::from([("utm_campaign".into(), "spring".into())]),
            }
        );
        assert_eq!(
            attribute(&c, None),
            Attribution::Unattributed("click_not_found")
        );
        assert_eq!(
            attribute(&conv("", 10 * day), None),
            Attribution::Unattributed("no_click_id")
        );
        assert_eq!(
            attribute(&c, Some(&click("other", 10 * day))),
            Attribution::Unattributed("other_program")
        );
        assert_eq!(
            attribute(&c, Some(&click("p", 10 * day - 31 * day))),
            Attribution::Unattributed("outside_window")
        );
        // Another tracker's clock a little ahead is tolerated, a minute is not.
        assert!(matches!(
            attribute(&c, Some(&click("p", 10 * day + 5_000))),
            Attribution::Attributed {
                seconds_to_convert: 0,
                ..
            }
        ));
        assert_eq!(
            attribute(&c, Some(&click("p", 10 * day + 61_000))),
            Attribution::Unattributed("outside_window")
        );
        let mut impression = click("p", 10 * day);
        impression.event_type = "impression".into();
        assert_eq!(
            attribute(&c, Some(&impression)),
            Attribution::Unattributed("click_not_found"),
            "only a click is attributed"
        );
        let mut unverified = click("p", 10 * day);
        unverified.valid = false;
        assert_eq!(
            attribute(&c, Some(&unverified)),
            Attribution::Unattributed("click_not_found"),
            "a click taken while Redis was down was never redirected"
        );
        let mut posted = click("p", 10 * day);
        posted.source = "batch".into();
        assert_eq!(
            attribute(&c, Some(&posted)),
            Attribution::Unattributed("click_not_found"),
            "only a click redirect: a page can post events of type click"
        );
    }
}
