//! The Lambda front-end's configuration, from the function's environment.

use clap::Parser;

use crate::write_config::WriteConfig;

/// adtrack consumer as an AWS Lambda function behind a Kinesis event source
/// mapping (runtime provided.al2023, handler `bootstrap`).
#[derive(Parser, Debug, Clone)]
#[command(name = "consumer-lambda", version)]
pub struct LambdaConfig {
    /// Where and how events are written (the poller's settings).
    #[command(flatten)]
    pub write: WriteConfig,

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
