//! `consumer-lambda` (deployed as `bootstrap`): the consumer as an AWS Lambda
//! function behind a Kinesis event source mapping.

use std::process::ExitCode;

use adtrack_consumer::lambda::{LAMBDA_WRITE_ATTEMPTS, handle};
use adtrack_consumer::lambda_config::LambdaConfig;

#[tokio::main]
async fn main() -> ExitCode {
    let config: LambdaConfig = match adtrack_service::parse_config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    config.log.init();
    let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .app_name(aws_config::AppName::new("adtrack-consumer-lambda").expect("a valid app name"))
        .load()
        .await;
    let client = aws_sdk_dynamodb::Client::new(&aws);
    let tables = config.write.tables(LAMBDA_WRITE_ATTEMPTS);
    adtrack_reader::lambda::serve("consumer-lambda", |event| handle(&client, &tables, event)).await
}
