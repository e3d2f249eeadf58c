//! One event on its way to Kinesis, as the request side hands it over and
//! the spool stores it.

use bytes::Bytes;

/// One encoded event and its partition key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The event id: spreads plain records over shards and lets the consumer dedup.
    pub partition_key: String,
    /// The encoded `TrackingEvent`.
    pub data: Bytes,
}

impl Outgoing {
    pub fn size(&self) -> u64 {
        (self.data.len() + self.partition_key.len()) as u64
    }
}
