//! Helpers around the generated [`TrackingEvent`]: event ids and the
//! wire names of enums used in JSON and DynamoDB.

use crate::v1::{ConsentState, EventType, TrackingEvent, ValidationOutcome};

/// The largest event, in bytes of its `TrackingEvent` encoding: the one size
/// contract of the pipeline. The tracker refuses a bigger event at ingress,
/// before it answers; every later stage (the memory queue, the spool,
/// Kinesis records and aggregates, the consumer, the DynamoDB item) takes
/// any event up to this size.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// A fresh event id: a UUIDv7 in its hyphenated text form. Made once, at
/// ingress; time-ordered so DynamoDB and logs sort naturally.
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().hyphenated().to_string()
}

impl EventType {
    /// Parses the `type` query parameter (`impression`, `click`, ...).
    pub fn from_param(s: &str) -> Option<Self> {
        Some(match s {
            "impression" | "imp" | "view" => Self::Impression,
            "click" => Self::Click,
            "conversion" | "conv" => Self::Conversion,
            "viewable" => Self::Viewable,
            "custom" => Self::Custom,
            _ => return None,
        })
    }

    /// The short lower-case name used in JSON and DynamoDB.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Impression => "impression",
            Self::Click => "click",
            Self::Conversion => "conversion",
            Self::Viewable => "viewable",
            Self::Custom => "custom",
        }
    }
}

impl ConsentState {
    /// The short lower-case name used in JSON and DynamoDB.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::NotApplicable => "not_applicable",
            Self::Granted => "granted",
            Self::Denied => "denied",
            Self::Unreadable => "unreadable",
        }
    }
}

impl ValidationOutcome {
    /// The short lower-case name used in JSON and DynamoDB.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Valid => "valid",
            Self::Invalid => "invalid",
            Self::Unverified => "unverified",
        }
    }
}

impl TrackingEvent {
    /// The event id (field 8, `message_id`).
    pub fn event_id(&self) -> &str {
        &self.message_id
    }
}

/// A tracking event by reference: what the tracker encodes on the request
/// path, straight from the request and the cached program, without building
/// a [`TrackingEvent`] of owned strings first. Encodes exactly as prost
/// encodes the same [`TrackingEvent`] (proto3: default values are left out).
#[derive(Debug, Clone, Copy, Default)]
pub struct EventRef<'a> {
    pub programid: &'a str,
    pub checksum: &'a str,
    pub customer_id: i32,
    pub user_agent: &'a str,
    pub program_name: &'a str,
    pub customer_name: &'a str,
    pub is_valid: bool,
    pub message_id: &'a str,
    pub event_type: EventType,
    pub timestamp_ms: i64,
    pub client_ip: &'a str,
    pub referrer: &'a str,
    pub page_url: &'a str,
    /// Extra parameters, in key order; keys `skip` names are left out.
    pub extra: Option<&'a std::collections::BTreeMap<String, String>>,
    pub skip: &'a [&'a str],
    pub validation: ValidationOutcome,
    pub source: &'a str,
    pub program_version: u64,
    pub privacy_restricted: bool,
    pub is_bot: bool,
    pub destination_url: &'a str,
    pub click_id: &'a str,
    pub transaction_id: &'a str,
    pub conversion_value: &'a str,
    pub currency: &'a str,
    pub attribution_window_days: u32,
    pub consent: ConsentState,
    pub user_id: &'a str,
}

mod wire {
    use bytes::BufMut;
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

    pub fn str_len(tag: u32, s: &str) -> usize {
        if s.is_empty() {
            0
        } else {
            key_len(tag) + encoded_len_varint(s.len() as u64) + s.len()
        }
    }

    pub fn put_str(tag: u32, s: &str, buf: &mut impl BufMut) {
        if !s.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(s.len() as u64, buf);
            buf.put_slice(s.as_bytes());
        }
    }

    pub fn varint_len(tag: u32, v: u64) -> usize {
        if v == 0 {
            0
        } else {
            key_len(tag) + encoded_len_varint(v)
        }
    }

    pub fn put_varint(tag: u32, v: u64, buf: &mut impl BufMut) {
        if v != 0 {
            encode_key(tag, WireType::Varint, buf);
            encode_varint(v, buf);
        }
    }

    /// A map entry's body: key (1) and value (2), defaults left out.
    pub fn entry_len(k: &str, v: &str) -> usize {
        str_len(1, k) + str_len(2, v)
    }
}

impl EventRef<'_> {
    fn extras(&self) -> impl Iterator<Item = (&str, &str)> {
        let skip = self.skip;
        self.extra
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(move |(k, _)| !skip.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Bytes [`Self::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        use prost::encoding::{encoded_len_varint, key_len};
        let extra: usize = self
            .extras()
            .map(|(k, v)| {
                let body = wire::entry_len(k, v);
                key_len(14) + encoded_len_varint(body as u64) + body
            })
            .sum();
        wire::str_len(1, self.programid)
            + wire::str_len(2, self.checksum)
            + wire::varint_len(3, self.customer_id as i64 as u64)
            + wire::str_len(4, self.user_agent)
            + wire::str_len(5, self.program_name)
            + wire::str_len(6, self.customer_name)
            + wire::varint_len(7, self.is_valid as u64)
            + wire::str_len(8, self.message_id)
            + wire::varint_len(9, self.event_type as i32 as i64 as u64)
            + wire::varint_len(10, self.timestamp_ms as u64)
            + wire::str_len(11, self.client_ip)
            + wire::str_len(12, self.referrer)
            + wire::str_len(13, self.page_url)
            + extra
            + wire::varint_len(15, self.validation as i32 as i64 as u64)
            + wire::str_len(16, self.source)
            + wire::varint_len(17, self.program_version)
            + wire::varint_len(18, self.privacy_restricted as u64)
            + wire::varint_len(19, self.is_bot as u64)
            + wire::str_len(20, self.destination_url)
            + wire::str_len(21, self.click_id)
            + wire::str_len(22, self.transaction_id)
            + wire::str_len(23, self.conversion_value)
            + wire::str_len(24, self.currency)
            + wire::varint_len(25, u64::from(self.attribution_window_days))
            + wire::varint_len(26, self.consent as i32 as i64 as u64)
            + wire::str_len(27, self.user_id)
    }

    /// Writes the event's protobuf encoding.
    pub fn encode(&self, buf: &mut impl bytes::BufMut) {
        use prost::encoding::{WireType, encode_key, encode_varint};
        wire::put_str(1, self.programid, buf);
        wire::put_str(2, self.checksum, buf);
        wire::put_varint(3, self.customer_id as i64 as u64, buf);
        wire::put_str(4, self.user_agent, buf);
        wire::put_str(5, self.program_name, buf);
        wire::put_str(6, self.customer_name, buf);
        wire::put_varint(7, self.is_valid as u64, buf);
        wire::put_str(8, self.message_id, buf);
        wire::put_varint(9, self.event_type as i32 as i64 as u64, buf);
        wire::put_varint(10, self.timestamp_ms as u64, buf);
        wire::put_str(11, self.client_ip, buf);
        wire::put_str(12, self.referrer, buf);
        wire::put_str(13, self.page_url, buf);
        for (k, v) in self.extras() {
            encode_key(14, WireType::LengthDelimited, buf);
            encode_varint(wire::entry_len(k, v) as u64, buf);
            wire::put_str(1, k, buf);
            wire::put_str(2, v, buf);
        }
        wire::put_varint(15, self.validation as i32 as i64 as u64, buf);
        wire::put_str(16, self.source, buf);
        wire::put_varint(17, self.program_version, buf);
        wire::put_varint(18, self.privacy_restricted as u64, buf);
        wire::put_varint(19, self.is_bot as u64, buf);
        wire::put_str(20, self.destination_url, buf);
        wire::put_str(21, self.click_id, buf);
        wire::put_str(22, self.transaction_id, buf);
        wire::put_str(23, self.conversion_value, buf);
        wire::put_str(24, self.currency, buf);
        wire::put_varint(25, u64::from(self.attribution_window_days), buf);
        wire::put_varint(26, self.consent as i32 as i64 as u64, buf);
        wire::put_str(27, self.user_id, buf);
    }

    /// The encoding in one exactly-sized buffer.
    pub fn to_bytes(&self) -> bytes::Bytes {
        let mut buf = bytes::BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn reference_fields_keep_their_numbers() {
        // Hand-encoded bytes of the reference event's first fields:
        // field 1 (string) "7", field 3 (varint) 42, field 7 (varint) 1, field 8 "m".
        let bytes = [0x0a, 0x01, b'7', 0x18, 42, 0x38, 0x01, 0x42, 0x01, b'm'];
        let ev = TrackingEvent::decode(&bytes[..]).expect("decodes");
        assert_eq!(ev.programid, "7");
        assert_eq!(ev.customer_id, 42);
        assert!(ev.is_valid);
        assert_eq!(ev.message_id, "m");
    }

    #[test]
    fn event_ids_are_uuid_v7_and_ordered() {
        let a = new_event_id();
        let b = new_event_id();
        let ua = uuid::Uuid::parse_str(&a).expect("uuid");
        assert_eq!(ua.get_version_num(), 7);
        assert!(a < b);
    }

    proptest::proptest! {
        #[test]
        fn event_ref_encodes_as_prost_does(
            text in proptest::collection::vec(".{0,40}", 16),
            window in proptest::prelude::any::<u32>(),
            consent in 0i32..5,
            customer_id in proptest::prelude::any::<i32>(),
            timestamp_ms in proptest::prelude::any::<i64>(),
            version in proptest::prelude::any::<u64>(),
            flags in proptest::prelude::any::<[bool; 3]>(),
            kind in 0i32..6,
            outcome in 0i32..4,
            extra in proptest::collection::btree_map("[a-z]{0,8}", ".{0,20}", 0..6),
        ) {
            let skip = ["page", "type"];
            let r = EventRef {
                programid: &text[0],
                checksum: &text[1],
                customer_id,
                user_agent: &text[2],
                program_name: &text[3],
                customer_name: &text[4],
                is_valid: flags[0],
                message_id: &text[5],
                event_type: EventType::try_from(kind).expect("kind"),
                timestamp_ms,
                client_ip: &text[6],
                referrer: &text[7],
                page_url: &text[8],
                extra: Some(&extra),
                skip: &skip,
                validation: ValidationOutcome::try_from(outcome).expect("outcome"),
                source: &text[9],
                program_version: version,
                privacy_restricted: flags[1],
                is_bot: flags[2],
                destination_url: &text[10],
                click_id: &text[11],
                transaction_id: &text[12],
                conversion_value: &text[13],
                currency: &text[14],
                attribution_window_days: window,
                consent: ConsentState::try_from(consent).expect("consent"),
                user_id: &text[15],
            };
            let owned = TrackingEvent {
                programid: text[0].clone(),
                checksum: text[1].clone(),
                customer_id,
                user_agent: text[2].clone(),
                program_name: text[3].clone(),
                customer_name: text[4].clone(),
                is_valid: flags[0],
                message_id: text[5].clone(),
                event_type: kind,
                timestamp_ms,
                client_ip: text[6].clone(),
                referrer: text[7].clone(),
                page_url: text[8].clone(),
                extra: extra.iter().filter(|(k, _)| !skip.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect(),
                validation: outcome,
                source: text[9].clone(),
                program_version: version,
                privacy_restricted: flags[1],
                is_bot: flags[2],
                destination_url: text[10].clone(),
                click_id: text[11].clone(),
                transaction_id: text[12].clone(),
                conversion_value: text[13].clone(),
                currency: text[14].clone(),
                attribution_window_days: window,
                consent,
                user_id: text[15].clone(),
            };
            let bytes = r.to_bytes();
            proptest::prop_assert_eq!(bytes.len(), r.encoded_len());
            proptest::prop_assert_eq!(TrackingEvent::decode(&bytes[..]).expect("decodes"), owned);
        }
    }
}
