//! The dead-letter table's item: one per record a handler could not apply,
//! whatever the stream (events or core data), keyed by `deadLetterId`.
//!
//! Attributes: `deadLetterId`, `stream` (when the id does not name it),
//! `shardId`, `sequenceNumber`, `reason` (at most [`MAX_REASON`] bytes, so
//! it never embeds unbounded input), `badEvents` of `events` (when the
//! record carries several events), `failedAt` (epoch seconds), `data` (the
//! record's first [`MAX_DATA`] bytes, so an item always fits DynamoDB's
//! 400 KB), `dataBytes` and `dataMd5` (the whole record's length and MD5).

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use md5::{Digest, Md5};
use serde::Serialize;

use crate::Record;

/// Longest `reason` kept.
pub const MAX_REASON: usize = 512;
/// Raw bytes kept of the record.
pub const MAX_DATA: usize = 300 * 1024;

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn truncated(text: &str, max: usize) -> &str {
    let mut cut = text.len().min(max);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

/// One dead letter.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter<'a> {
    pub dead_letter_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<&'a str>,
    pub shard_id: &'a str,
    pub sequence_number: &'a str,
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bad_events: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<usize>,
    pub failed_at: i64,
    data: RawBytes<'a>,
    data_bytes: usize,
    data_md5: String,
}

/// Bytes stored as a binary attribute.
#[derive(Debug)]
struct RawBytes<'a>(&'a [u8]);

impl Serialize for RawBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl<'a> DeadLetter<'a> {
    /// The dead letter of `record`, refused for `reason`.
    pub fn new(dead_letter_id: String, record: &'a Record, reason: &str) -> Self {
        Self {
            dead_letter_id,
            stream: None,
            shard_id: &record.shard_id,
            sequence_number: &record.sequence_number,
            reason: truncated(reason, MAX_REASON).to_owned(),
            bad_events: None,
            events: None,
            failed_at: time::OffsetDateTime::now_utc().unix_timestamp(),
            data: RawBytes(&record.data[..record.data.len().min(MAX_DATA)]),
            data_bytes: record.data.len(),
            data_md5: Md5::digest(&record.data)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        }
    }

    /// As a DynamoDB item.
    pub fn item(&self) -> HashMap<String, AttributeValue> {
        // Strings, numbers and bytes only: the conversion cannot fail; were
        // it to, the dead letter still names its record.
        serde_dynamo::to_item(self).unwrap_or_else(|e| {
            HashMap::from([
                (
                    "deadLetterId".to_owned(),
                    AttributeValue::S(self.dead_letter_id.clone()),
                ),
                (
                    "reason".to_owned(),
                    AttributeValue::S(truncated(&e.to_string(), MAX_REASON).to_owned()),
                ),
            ])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_typed() {
        let record = Record {
            shard_id: "shardId-000000000000".into(),
            sequence_number: "42".into(),
            data: bytes::Bytes::from(vec![7u8; MAX_DATA + 10]),
            arrival_ms: None,
        };
        let reason = "é".repeat(MAX_REASON);
        let mut d = DeadLetter::new("x/42".into(), &record, &reason);
        d.events = Some(3);
        let item = d.item();
        assert!(item["reason"].as_s().expect("S").len() <= MAX_REASON);
        assert_eq!(item["data"].as_b().expect("B").as_ref().len(), MAX_DATA);
        assert_eq!(
            item["dataBytes"].as_n().expect("N"),
            &(MAX_DATA + 10).to_string()
        );
        assert_eq!(item["dataMd5"].as_s().expect("S").len(), 32);
        assert_eq!(item["events"].as_n().expect("N"), "3");
        assert!(!item.contains_key("stream") && !item.contains_key("badEvents"));
    }
}

/// Where records that cannot be handled go (the consumer's and the
/// core-data reader's shared setting).
#[derive(clap::Args, Debug, Clone)]
pub struct DeadLetterArgs {
    /// DynamoDB table for records that cannot be stored or applied.
    #[arg(
        long,
        env = "DEAD_LETTER_TABLE",
        value_name = "DEAD_LETTER_TABLE",
        default_value = "adtrack-dead-letters"
    )]
    pub dead_letter_table: String,
}
