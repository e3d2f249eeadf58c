//! Where and how events are written: the settings the poller and the
//! Lambda front-end share (one flattened group of both configs).

use crate::batch::Tables;

/// Where and how events are written: the same settings, with the same
/// variables, for the poller and the Lambda front-end.
#[derive(clap::Args, Debug, Clone)]
pub struct WriteConfig {
    /// DynamoDB table the events are written to.
    #[arg(
        long,
        env = "EVENTS_TABLE",
        value_name = "EVENTS_TABLE",
        default_value = "adtrack-events"
    )]
    pub events_table: String,

    /// DynamoDB table of conversions (one item per program and transaction,
    /// attributed to their clicks).
    #[arg(
        long,
        env = "CONVERSIONS_TABLE",
        value_name = "CONVERSIONS_TABLE",
        default_value = "adtrack-conversions"
    )]
    pub conversions_table: String,

    /// Seconds a conversion waits for its click to reach the events table
    /// (a lagging shard) before it stays unattributed.
    #[arg(long, env = "CONSUMER_CLICK_WAIT_SECS", value_name = "CONSUMER_CLICK_WAIT_SECS", default_value_t = 300, value_parser = clap::value_parser!(u32).range(0..=86_400))]
    pub click_wait_secs: u32,

    /// Where records and events that cannot be stored as events go.
    #[command(flatten)]
    pub dead_letters: adtrack_reader::dead_letter::DeadLetterArgs,

    /// Days an event item is kept (its `expiresAt` time-to-live attribute).
    #[arg(long, env = "CONSUMER_EVENT_TTL_DAYS", value_name = "CONSUMER_EVENT_TTL_DAYS", default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub event_ttl_days: u32,

    /// BatchWriteItem calls in flight at once per batch.
    #[arg(long, env = "CONSUMER_WRITE_CONCURRENCY", value_name = "CONSUMER_WRITE_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub write_concurrency: u32,
}

impl WriteConfig {
    /// The tables and write settings, with `max_attempts` attempts per call
    /// before a batch is reported failed (0: keep trying).
    pub fn tables(&self, max_attempts: u32) -> Tables {
        Tables {
            events: self.events_table.clone(),
            dead_letters: self.dead_letters.dead_letter_table.clone(),
            conversions: self.conversions_table.clone(),
            click_wait_secs: self.click_wait_secs,
            ttl_days: self.event_ttl_days,
            write_concurrency: self.write_concurrency as usize,
            max_attempts,
        }
    }
}
