//! `consumer-lambda` (deployed as `bootstrap`): the consumer as an AWS Lambda
//! function behind a Kinesis event source mapping.

use std::process::ExitCode;

use adtrack_consumer::lambda::{LAMBDA_WRITE_ATTEMPTS, handle};
use adtrack_consumer::lambda_config::LambdaConfig;
use aws_lambda_events::event::kinesis::KinesisEvent;
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> ExitCode {
    let config: LambdaConfig = match adtrack_service::parse_config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    adtrack_service::init_logging(&config.log_format);
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let client = aws_sdk_dynamodb::Client::new(&aws);
    let tables = config.write.tables(LAMBDA_WRITE_ATTEMPTS);
    let result = lambda_runtime::run(service_fn(|event: LambdaEvent<KinesisEvent>| {
        let (client, tables) = (&client, &tables);
        async move { Ok::<_, lambda_runtime::Error>(handle(client, tables, event.payload).await) }
    }))
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("lambda runtime failed: {e}");
            ExitCode::from(1)
        }
    }
}
