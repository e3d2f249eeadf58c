//! The one retry policy of delivery: exponential backoff with full jitter
//! for resent records, and how a failure is classified (by the SDK's error
//! type and Kinesis's error codes, never by message text).

use std::time::Duration;

use rand::Rng;

const RETRY_BASE: Duration = Duration::from_millis(50);
const RETRY_CAP: Duration = Duration::from_secs(5);

/// Error code of a PutRecords entry refused for the shard's throughput.
pub const THROTTLED: &str = "ProvisionedThroughputExceededException";

/// The longest wait before the next attempt (`attempts` made so far).
fn ceiling(attempts: u32) -> Duration {
    RETRY_BASE
        .saturating_mul(1u32 << attempts.min(16))
        .min(RETRY_CAP)
}

/// How long a record waits before its next attempt: full jitter under the
/// ceiling.
pub fn backoff(attempts: u32) -> Duration {
    rand::rng().random_range(Duration::ZERO..=ceiling(attempts))
}

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
    fn backoff_grows_and_is_capped() {
        assert_eq!(ceiling(0), RETRY_BASE);
        for attempts in 1..40 {
            assert!(ceiling(attempts) >= ceiling(attempts - 1));
            assert!(ceiling(attempts) <= RETRY_CAP);
            assert!(backoff(attempts) <= ceiling(attempts));
        }
        assert!(ceiling(3) > ceiling(2), "does not grow");
        assert_eq!(ceiling(39), RETRY_CAP);
    }

    #[test]
    fn throttling_is_told_apart() {
        assert_eq!(EntryFailure::of(THROTTLED), EntryFailure::Throttled);
        assert_eq!(EntryFailure::of("InternalFailure"), EntryFailure::Internal);
    }
}
