//! The DynamoDB item of one event.
//!
//! # Table layout
//!
//! Events table: partition key `eventId` (S), the event id made at ingress
//! (a UUIDv7), so writing the same event twice overwrites one item: replays
//! never duplicate. Other attributes: `programId`, `eventType`, `ts` (ms since
//! the epoch), `customerId`, `programName`, `customerName`, `checksum`,
//! `isValid`, `validation`, `source`, `programVersion`, `userAgent`,
//! `clientIp`, `referrer`, `pageUrl`, `extra` (map), `consent` (`granted`,
//! `denied`, `not_applicable`, `unreadable`; absent without a signal),
//! `userId` (the first-party id, when kept), and where it was read:
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

use adtrack_proto::v1::{ConsentState, EventType, TrackingEvent, ValidationOutcome};
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
    #[error("event cannot be an item: {0}")]
    Item(String),
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
            Self::Item(_) => "item",
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

/// The index bucket of an event (stable for its id).
pub fn program_bucket(program_id: &str, event_id: &str) -> String {
    use md5::{Digest, Md5};
    let h = Md5::digest(event_id.as_bytes());
    let n = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % PROGRAM_BUCKETS;
    format!("{program_id}#{n}")
}

/// The events table's item for one event, as DynamoDB stores it (empty
/// strings and unset flags are left out).
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventItem {
    pub event_id: String,
    pub program_bucket: String,
    pub expires_at: i64,
    pub program_id: String,
    pub event_type: &'static str,
    pub ts: i64,
    pub customer_id: i32,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub program_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub customer_name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub checksum: String,
    pub is_valid: bool,
    pub validation: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source: String,
    pub program_version: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user_agent: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub client_ip: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub referrer: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub page_url: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub destination_url: String,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub is_bot: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub privacy_restricted: bool,
    /// The hit's consent state (left out when it carried no signal).
    #[serde(skip_serializing_if = "is_unspecified")]
    pub consent: &'static str,
    /// The browser's first-party id, when the tracker kept one.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user_id: String,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub extra: HashMap<String, String>,
    pub shard_id: String,
    pub sequence_number: String,
}

impl EventItem {
    /// The item for one event read at `shard_id`/`sequence`; `ttl_days`
    /// sets `expiresAt`.
    pub fn new(ev: TrackingEvent, shard_id: &str, sequence: &str, ttl_days: u32) -> Self {
        let event_type = EventType::try_from(ev.event_type).unwrap_or(EventType::Unspecified);
        let validation =
            ValidationOutcome::try_from(ev.validation).unwrap_or(ValidationOutcome::Unspecified);
        Self {
            program_bucket: program_bucket(&ev.programid, &ev.message_id),
            expires_at: ev.timestamp_ms.max(0) / 1000 + i64::from(ttl_days) * 86_400,
            event_id: ev.message_id,
            program_id: ev.programid,
            event_type: event_type.name(),
            ts: ev.timestamp_ms,
            customer_id: ev.customer_id,
            program_name: ev.program_name,
            customer_name: ev.customer_name,
            checksum: ev.checksum,
            is_valid: ev.is_valid,
            validation: validation.name(),
            source: ev.source,
            program_version: ev.program_version,
            user_agent: ev.user_agent,
            client_ip: ev.client_ip,
            referrer: ev.referrer,
            page_url: ev.page_url,
            destination_url: ev.destination_url,
            is_bot: ev.is_bot,
            privacy_restricted: ev.privacy_restricted,
            consent: ConsentState::try_from(ev.consent)
                .unwrap_or(ConsentState::Unspecified)
                .name(),
            user_id: ev.user_id,
            extra: ev
                .extra
                .into_iter()
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .collect(),
            shard_id: shard_id.to_owned(),
            sequence_number: sequence.to_owned(),
        }
    }
}

fn is_unspecified(consent: &&'static str) -> bool {
    *consent == ConsentState::Unspecified.name()
}

/// The item for one event; `ttl_days` sets `expiresAt`.
pub fn to_item(
    ev: TrackingEvent,
    shard_id: &str,
    sequence: &str,
    ttl_days: u32,
) -> Result<HashMap<String, AttributeValue>, RecordError> {
    serde_dynamo::to_item(EventItem::new(ev, shard_id, sequence, ttl_days))
        .map_err(|e| RecordError::Item(e.to_string()))
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
            timestamp_ms: 1_700_000_000_000,
            customer_id: 7,
            is_valid: true,
            extra: [
                ("utm".to_owned(), "x".to_owned()),
                (String::new(), "y".to_owned()),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let bytes = ev.encode_to_vec();
        let back = decode(&bytes).expect("decodes");
        let item = to_item(back, "shard-0", "42", 30).expect("item");
        assert!(item.contains_key("expiresAt"));
        assert!(matches!(&item["programBucket"], AttributeValue::S(b) if b.starts_with("p#")));
        assert_eq!(item["eventId"], AttributeValue::S("id-1".into()));
        assert!(!item.contains_key("referrer"), "empty strings are left out");
        assert!(!item.contains_key("isBot"), "unset flags are left out");
        assert_eq!(item["ts"], AttributeValue::N("1700000000000".into()));
        assert_eq!(
            item["expiresAt"],
            AttributeValue::N((1_700_000_000 + 30 * 86_400).to_string())
        );
        assert_eq!(item["customerId"], AttributeValue::N("7".into()));
        assert_eq!(item["isValid"], AttributeValue::Bool(true));
        assert_eq!(item["sequenceNumber"], AttributeValue::S("42".into()));
        assert_eq!(
            item["extra"],
            AttributeValue::M([("utm".to_owned(), AttributeValue::S("x".into()))].into()),
            "extras without a name are left out"
        );
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
