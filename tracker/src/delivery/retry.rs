//! The one retry policy of delivery: exponential backoff with full jitter
//! for resent records, and how a failure is classified (by the SDK's error
//! type and Kinesis's error codes, never by message text).

use std::time::Duration;

use rand::Rng;

const RETRY_BASE: Duration = Duration::from_millis(50);
const RETRY_CAP: Duration = Duration::from_secs(5);

/// Error code of a PutRecords entry refused for the shard's throughput.
pub const THROTTLED: &str = "ProvisionedThroughputExceededException";

/// How long a record waits before its next attempt (`attempts` made so far).
pub fn backoff(attempts: u32) -> Duration {
    let ceiling = RETRY_BASE
        .saturating_mul(1u32 << attempts.min(16))
        .min(RETRY_CAP);
    rand::rng().random_range(Duration::ZERO..=ceiling)
}

/// Why an entry is resent, for the retries metric.
pub fn entry_cause(error_code: &str) -> &'static str {
    if error_code == THROTTLED {
        "throttled"
    } else {
        "internal"
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
        for attempts in 0..40 {
            let d = backoff(attempts);
            assert!(d <= RETRY_CAP);
            assert!(d <= RETRY_BASE.saturating_mul(1u32 << attempts.min(16)));
        }
    }

    #[test]
    fn throttling_is_told_apart() {
        assert_eq!(entry_cause(THROTTLED), "throttled");
        assert_eq!(entry_cause("InternalFailure"), "internal");
    }
}
