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

    #[command(flatten)]
    pub log: adtrack_service::LogArgs,
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
