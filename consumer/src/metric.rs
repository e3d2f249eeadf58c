//! Every metric the consumer emits, by name.

/// Kinesis records read.
pub const RECORDS_READ: &str = "adtrack_consumer_records_read_total";
/// Records that could not be decoded or failed validation, label `reason`.
pub const RECORDS_BAD: &str = "adtrack_consumer_records_bad_total";
/// Items written, label `table` (`events`, `dead_letters`).
pub const ITEMS_WRITTEN: &str = "adtrack_consumer_items_written_total";
/// Items DynamoDB refused for good, labels `table`, `code` (never retried;
/// an event refused so is dead-lettered with its record).
pub const ITEMS_REFUSED: &str = "adtrack_consumer_items_refused_total";
/// Items resent, label `cause` (`unprocessed`, `throttled`, `call_failed`).
pub const WRITE_RETRIES: &str = "adtrack_consumer_write_retries_total";
/// Checkpoints stored.
pub const CHECKPOINTS: &str = "adtrack_consumer_checkpoints_total";
/// Kinesis read errors, label `op`.
pub const READ_ERRORS: &str = "adtrack_consumer_read_errors_total";
/// Shard leases held by this poller.
pub const LEASES_HELD: &str = "adtrack_consumer_leases_held";
/// Lease changes, label `change` (`acquired`, `lost`, `released`).
pub const LEASE_CHANGES: &str = "adtrack_consumer_lease_changes_total";
/// Lambda batches, label `result` (`ok`, `partial`).
pub const LAMBDA_BATCHES: &str = "adtrack_consumer_lambda_batches_total";
/// Milliseconds behind the tip of the stream, per read (max over shards).
pub const MILLIS_BEHIND: &str = "adtrack_consumer_millis_behind_latest";
