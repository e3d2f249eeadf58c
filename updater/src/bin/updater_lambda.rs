//! `updater-lambda` (deployed as `bootstrap`): the core-data stream's
//! reader as an AWS Lambda function behind a Kinesis event source mapping.

use std::process::ExitCode;

use adtrack_updater::lambda::{LAMBDA_ATTEMPTS, handle};
use adtrack_updater::lambda_config::LambdaConfig;
use adtrack_updater::stream::CoreData;

#[tokio::main]
async fn main() -> ExitCode {
    let config: LambdaConfig = match adtrack_service::parse_config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    config.log.init();
    let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .app_name(aws_config::AppName::new("adtrack-updater-lambda").expect("a valid app name"))
        .load()
        .await;
    let store = match config.store.connect(&aws).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot reach the program store");
            return ExitCode::from(1);
        }
    };
    let core = CoreData {
        store,
        dynamodb: aws_sdk_dynamodb::Client::new(&aws),
        stream: config.core_data.core_data_stream.clone(),
        dead_letter_table: config.core_data.dead_letters.dead_letter_table.clone(),
        max_attempts: LAMBDA_ATTEMPTS,
    };
    adtrack_reader::lambda::serve("updater-lambda", |event| handle(&core, event)).await
}
