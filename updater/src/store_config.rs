//! Where the program store is: the settings every updater process shares
//! (the command line, the sync, the stream reader, the Lambda).

use anyhow::Result;
use clap::Args;

use crate::{Counter, CustomerTable, ProgramTable, Programs, RedisPrograms};

/// The programs and customers tables and the Redis copy.
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Redis holding the trackers' copy of the programs.
    #[arg(
        long,
        env = "REDIS_URL",
        value_name = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        global = true
    )]
    pub redis_url: String,
    /// DynamoDB table holding the programs (the source of truth).
    #[arg(
        long,
        env = "PROGRAMS_TABLE",
        value_name = "PROGRAMS_TABLE",
        default_value = "adtrack-programs",
        global = true
    )]
    pub programs_table: String,
    /// DynamoDB table holding the customer records (kill switch, rate
    /// limits).
    #[arg(
        long,
        env = "CUSTOMERS_TABLE",
        value_name = "CUSTOMERS_TABLE",
        default_value = "adtrack-customers",
        global = true
    )]
    pub customers_table: String,
}

impl StoreArgs {
    /// The programs table alone.
    pub fn table(&self, aws: &aws_config::SdkConfig) -> ProgramTable {
        ProgramTable::new(aws_sdk_dynamodb::Client::new(aws), &self.programs_table)
    }

    /// The store: the table, and Redis as its copy (an emptied Redis is
    /// marked complete only by a sync).
    pub async fn connect(&self, aws: &aws_config::SdkConfig) -> Result<Programs> {
        let redis = RedisPrograms::connect(&self.redis_url, Counter::KeepIfPresent).await?;
        let customers =
            CustomerTable::new(aws_sdk_dynamodb::Client::new(aws), &self.customers_table);
        Ok(Programs::new(self.table(aws), redis).with_customers(customers))
    }
}
