//! Every metric the consumer emits, by name.

/// Kinesis records read.
pub const RECORDS_READ: &str = "adtrack_consumer_records_read_total";
/// Records that could not be decoded or failed validation, label `reason`.
pub const RECORDS_BAD: &str = "adtrack_consumer_records_bad_total";
/// Items written to the events table.
pub const ITEMS_WRITTEN: &str = "adtrack_consumer_items_written_total";
/// Items resent, label `cause` (`unprocessed`, `call_failed`).
pub const WRITE_RETRIES: &str = "adtrack_consumer_write_retries_total";
/// Checkpoints stored.
pub const CHECKPOINTS: &str = "adtrack_consumer_checkpoints_total";
/// Kinesis read errors, label `op`.
pub const READ_ERRORS: &str = "adtrack_consumer_read_errors_total";
/// Milliseconds behind the tip of the stream, per read (max over shards).
pub const MILLIS_BEHIND: &str = "adtrack_consumer_millis_behind_latest";
