//! The updater Lambda's configuration (from the function's environment),
//! and the core-data settings it shares with `updater stream`.

use clap::{Args, Parser};

use crate::store_config::StoreArgs;

/// The core-data stream and where its bad records go.
#[derive(Args, Debug, Clone)]
pub struct CoreDataArgs {
    /// Kinesis stream of core-data records.
    #[arg(
        long,
        env = "CORE_DATA_STREAM",
        value_name = "CORE_DATA_STREAM",
        default_value = "adtrack-core-data"
    )]
    pub core_data_stream: String,

    /// Where the records that cannot be applied go.
    #[command(flatten)]
    pub dead_letters: adtrack_reader::dead_letter::DeadLetterArgs,
}

/// adtrack updater as an AWS Lambda function behind the core-data stream's
/// event source mapping (runtime provided.al2023, handler `bootstrap`).
#[derive(Parser, Debug, Clone)]
#[command(name = "updater-lambda", version)]
pub struct LambdaConfig {
    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub core_data: CoreDataArgs,

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
