//! The Lambda front-end's configuration, from the function's environment.

use clap::Parser;

/// adtrack consumer as an AWS Lambda function behind a Kinesis event source
/// mapping (runtime provided.al2023, handler `bootstrap`).
#[derive(Parser, Debug, Clone)]
#[command(name = "consumer-lambda", version)]
pub struct LambdaConfig {
    /// DynamoDB table the events are written to.
    #[arg(
        long,
        env = "EVENTS_TABLE",
        value_name = "EVENTS_TABLE",
        default_value = "adtrack-events"
    )]
    pub events_table: String,

    /// DynamoDB table for records and events that cannot be stored as events.
    #[arg(
        long,
        env = "DEAD_LETTER_TABLE",
        value_name = "DEAD_LETTER_TABLE",
        default_value = "adtrack-dead-letters"
    )]
    pub dead_letter_table: String,

    /// Days an event item is kept (its `expiresAt` time-to-live attribute).
    #[arg(long, env = "CONSUMER_EVENT_TTL_DAYS", value_name = "CONSUMER_EVENT_TTL_DAYS", default_value_t = 90, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub event_ttl_days: u32,

    /// BatchWriteItem calls in flight at once.
    #[arg(long, env = "CONSUMER_WRITE_CONCURRENCY", value_name = "CONSUMER_WRITE_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub write_concurrency: u32,

    /// Log format: `json` or `text`.
    #[arg(long, env = "LOG_FORMAT", value_name = "LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    pub log_format: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        LambdaConfig::command().debug_assert();
    }
}
