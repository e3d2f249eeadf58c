//! The DynamoDB item of one event.
//!
//! # Table layout
//!
//! Events table: partition key `eventId` (S), the event id made at ingress
//! (a UUIDv7), so writing the same event twice overwrites one item: replays
//! never duplicate. Other attributes: `programId`, `eventType`, `ts` (ms since
//! the epoch), `customerId`, `programName`, `customerName`, `checksum`,
//! `isValid`, `validation`, `source`, `programVersion`, `userAgent`,
//! `clientIp`, `referrer`, `pageUrl`, `extra` (map), and where it was read:
//! `shardId`, `sequenceNumber`. Empty strings are left out.
//!
//! `expiresAt` (epoch seconds) is the table's time-to-live attribute: the
//! event's time plus the configured retention.
//!
//! ## Querying one program's events in a time window
//!
//! Global secondary index `byProgramTime`: partition key `programBucket` =
//! `{programId}#{n}`, sort key `ts`. `n` (0-15) comes from the event id's
//! hash, so a busy program's writes spread over 16 index partitions instead
//! of one hot partition (each DynamoDB partition takes about 1,000 writes per
//! second). A window query runs the 16 `Query` calls
//! (`programBucket = :p AND ts BETWEEN :from AND :to`) in parallel and merges
//! them. Keying the table itself by program would make replays depend on the
//! time as well as the id; keying by event id keeps writes idempotent.
//!
//! Checkpoint table: partition key `shardKey` = `{stream}/{shardId}`, with
//! `sequenceNumber` (the last record whose events are all written, or
//! `SHARD_END`), and the poller lease: `leaseOwner`, `leaseExpiresAt` (ms).
//!
//! Dead-letter table: partition key `deadLetterId` =
//! `{shardId}/{sequenceNumber}`, one item per Kinesis record that held
//! anything that could not be written as an event (its good events are
//! written all the same), with the record's raw bytes (`data`, at most the
//! first 300 KiB, so the item always fits DynamoDB's 400 KB), the original
//! length and MD5 (`dataBytes`, `dataMd5`), `shardId`, `sequenceNumber`,
//! `badEvents` of `events` user records, `reason` (the first fault, at most
//! 512 bytes, never a copy of the input) and `failedAt`.

use std::collections::HashMap;

use adtrack_proto::v1::{EventType, TrackingEvent, ValidationOutcome};
use aws_sdk_dynamodb::types::AttributeValue;

/// Largest event accepted: the pipeline's one size contract, defined with
/// the event; the tracker refuses anything bigger at ingress.
pub use adtrack_proto::event::MAX_EVENT_BYTES;
/// Index partitions a program's events are spread over.
pub const PROGRAM_BUCKETS: u32 = 16;
/// Longest program id stored.
const MAX_PROGRAM_ID: usize = 64;

/// Why a record could not become an item.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record is {0} bytes, more than {MAX_EVENT_BYTES}")]
    TooLarge(usize),
    #[error("not a TrackingEvent: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("event has no event id")]
    NoEventId,
    #[error("event id is {0} bytes, longer than 64")]
    BadEventId(usize),
    #[error("{0}")]
    Aggregate(#[from] adtrack_proto::kpl::BadAggregate),
    #[error("event has no program id, or one longer than {MAX_PROGRAM_ID} bytes")]
    BadProgramId,
}

impl RecordError {
    /// Low-cardinality label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge(_) => "too_large",
            Self::Decode(_) => "decode",
            Self::NoEventId | Self::BadEventId(_) => "bad_event_id",
            Self::Aggregate(_) => "bad_aggregate",
            Self::BadProgramId => "bad_program_id",
        }
    }
}

/// The events in one Kinesis record, aggregated (KPL format) or plain.
pub fn decode_record(data: &[u8]) -> Vec<Result<TrackingEvent, RecordError>> {
    use adtrack_proto::kpl::{Deaggregated, deaggregate};
    match deaggregate(data) {
        Ok(Deaggregated::Plain) => vec![decode(data)],
        Ok(Deaggregated::Records(records)) => records.iter().map(|r| decode(&r.data)).collect(),
        Err(e) => vec![Err(e.into())],
    }
}

/// Decodes and checks one record's data.
pub fn decode(data: &[u8]) -> Result<TrackingEvent, RecordError> {
    use prost::Message;
    if data.len() > MAX_EVENT_BYTES {
        return Err(RecordError::TooLarge(data.len()));
    }
    let ev = TrackingEvent::decode(data)?;
    if ev.message_id.is_empty() {
        return Err(RecordError::NoEventId);
    }
    if ev.message_id.len() > 64 {
        return Err(RecordError::BadEventId(ev.message_id.len()));
    }
    if ev.programid.is_empty() || ev.programid.len() > MAX_PROGRAM_ID {
        return Err(RecordError::BadProgramId);
    }
    Ok(ev)
}

fn s(item: &mut HashMap<String, AttributeValue>, k: &str, v: String) {
    if !v.is_empty() {
        item.insert(k.to_owned(), AttributeValue::S(v));
    }
}

fn n(item: &mut HashMap<String, AttributeValue>, k: &str, v: impl ToString) {
    item.insert(k.to_owned(), AttributeValue::N(v.to_string()));
}

/// The index bucket of an event (stable for its id).
pub fn program_bucket(program_id: &str, event_id: &str) -> String {
    use md5::{Digest, Md5};
    let h = Md5::digest(event_id.as_bytes());
    let n = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % PROGRAM_BUCKETS;
    format!("{program_id}#{n}")
}

/// The item for one event; `ttl_days` sets `expiresAt`.
pub fn to_item(
    ev: TrackingEvent,
    shard_id: &str,
    sequence: &str,
    ttl_days: u32,
) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::with_capacity(26);
    item.insert(
        "programBucket".into(),
        AttributeValue::S(program_bucket(&ev.programid, &ev.message_id)),
    );
    let expires = ev.timestamp_ms.max(0) / 1000 + i64::from(ttl_days) * 86_400;
    n(&mut item, "expiresAt", expires);
    let event_type = EventType::try_from(ev.event_type).unwrap_or(EventType::Unspecified);
    let validation =
        ValidationOutcome::try_from(ev.validation).unwrap_or(ValidationOutcome::Unspecified);
    s(&mut item, "eventId", ev.message_id);
    s(&mut item, "programId", ev.programid);
    s(&mut item, "eventType", event_type.name().to_owned());
    n(&mut item, "ts", ev.timestamp_ms);
    n(&mut item, "customerId", ev.customer_id);
    s(&mut item, "programName", ev.program_name);
    s(&mut item, "customerName", ev.customer_name);
    s(&mut item, "checksum", ev.checksum);
    item.insert("isValid".into(), AttributeValue::Bool(ev.is_valid));
    s(&mut item, "validation", validation.name().to_owned());
    s(&mut item, "source", ev.source);
    n(&mut item, "programVersion", ev.program_version);
    s(&mut item, "userAgent", ev.user_agent);
    s(&mut item, "clientIp", ev.client_ip);
    s(&mut item, "referrer", ev.referrer);
    s(&mut item, "pageUrl", ev.page_url);
    s(&mut item, "destinationUrl", ev.destination_url);
    if ev.is_bot {
        item.insert("isBot".into(), AttributeValue::Bool(true));
    }
    if ev.privacy_restricted {
        item.insert("privacyRestricted".into(), AttributeValue::Bool(true));
    }
    let extra: HashMap<String, AttributeValue> = ev
        .extra
        .into_iter()
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .map(|(k, v)| (k, AttributeValue::S(v)))
        .collect();
    if !extra.is_empty() {
        item.insert("extra".into(), AttributeValue::M(extra));
    }
    s(&mut item, "shardId", shard_id.to_owned());
    s(&mut item, "sequenceNumber", sequence.to_owned());
    item
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn decodes_and_refuses() {
        let ev = TrackingEvent {
            message_id: "id-1".into(),
            programid: "p".into(),
            ..Default::default()
        };
        let bytes = ev.encode_to_vec();
        let back = decode(&bytes).expect("decodes");
        let item = to_item(back, "shard-0", "42", 30);
        assert!(item.contains_key("expiresAt"));
        assert!(matches!(&item["programBucket"], AttributeValue::S(b) if b.starts_with("p#")));
        assert_eq!(item["eventId"], AttributeValue::S("id-1".into()));
        assert!(!item.contains_key("referrer"), "empty strings are left out");
        assert!(matches!(
            decode(&[0xff, 0xff, 0xff]),
            Err(RecordError::Decode(_))
        ));
        assert!(matches!(
            decode(&TrackingEvent::default().encode_to_vec()),
            Err(RecordError::NoEventId)
        ));
    }
}
