//! Helpers around the generated [`TrackingEvent`]: event ids and the
//! wire names of enums used in JSON and DynamoDB.

use crate::v1::{EventType, TrackingEvent, ValidationOutcome};

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
}
