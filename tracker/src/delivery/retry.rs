//! Delivery's retries: the services' one backoff policy for resent
//! records, and how a failure is classified (by the SDK's error type and
//! Kinesis's error codes, never by message text).

use std::time::Duration;

use adtrack_service::retry::Backoff;

/// Resent records wait up to 50 ms after the first failure, doubling to 5 s.
pub const RESEND: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));

/// Error code of a PutRecords entry refused for the shard's throughput.
pub const THROTTLED: &str = "ProvisionedThroughputExceededException";

/// Why Kinesis refused one entry of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryFailure {
    /// The shard's throughput was exceeded: pause the shard.
    Throttled,
    /// Anything else (`InternalFailure`): retry after a backoff.
    Internal,
}

impl EntryFailure {
    pub fn of(error_code: &str) -> Self {
        if error_code == THROTTLED {
            Self::Throttled
        } else {
            Self::Internal
        }
    }
}

/// What a failed PutRecords call says about the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFailure {
    /// The stream or a shard is gone or was resharded: refresh the shard map.
    StreamChanged,
    /// Anything else (network, throttled call, 5xx): retry as it is.
    Transient,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_is_told_apart() {
        assert_eq!(EntryFailure::of(THROTTLED), EntryFailure::Throttled);
        assert_eq!(EntryFailure::of("InternalFailure"), EntryFailure::Internal);
    }
}
