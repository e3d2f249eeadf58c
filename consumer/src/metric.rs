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
/// Conversions recorded, label `result`: `attributed`, `unattributed` (a
/// new conversion), `duplicate` (another postback of a transaction already
/// recorded), `replayed` (its own event read again), `late_attributed` (its
/// click arrived after it), `refused` (DynamoDB refused the item for good).
pub const CONVERSIONS: &str = "adtrack_consumer_conversions_total";
/// Lambda batches, label `result` (`ok`, `partial`).
pub const LAMBDA_BATCHES: &str = "adtrack_consumer_lambda_batches_total";
/// Prefix of the poller's reader metrics (see `adtrack_reader::Settings`):
/// `adtrack_consumer_checkpoints_total`, `_read_errors_total` (label `op`),
/// `_leases_held`, `_lease_changes_total` (label `change`: `acquired`,
/// `lost`, `released`), `_millis_behind_latest`.
pub const READER_PREFIX: &str = "adtrack_consumer";
