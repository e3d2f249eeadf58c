//! adtrack consumer: Kinesis events stream to DynamoDB. Every event becomes
//! one item keyed by its event id, so at-least-once delivery from Kinesis
//! gives exactly one item per event. See [`item`] for the table layout.
//!
//! One core ([`batch::process`]), two front-ends: the Lambda handler
//! ([`lambda`], behind an event source mapping, answering a partial batch
//! response) and the poller ([`poller`], with leases and checkpoints in
//! DynamoDB, for local runs and ECS).

pub mod batch;
pub mod config;
pub mod item;
pub mod lambda;
pub mod lambda_config;
pub mod lease;
pub mod metric;
pub mod poller;
pub mod write_config;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// Runs the poller until `shutdown`. Records whose events are not yet
/// written when it stops are read again on the next start.
pub async fn run(
    config: Config,
    admin: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let prometheus = adtrack_service::metrics_endpoint::install(&[]);
    let aws = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_attempt_timeout(Duration::from_secs(10))
                .build(),
        )
        .load()
        .await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&aws);
    let owner = format!(
        "poller-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    );
    tracing::info!(owner, "poller identity");
    let leases = lease::Leases::new(
        dynamodb.clone(),
        config.checkpoint_table.clone(),
        config.events_stream.clone(),
        owner,
        config.lease_duration(),
    );
    let poller = Arc::new(poller::Poller {
        kinesis: aws_sdk_kinesis::Client::new(&aws),
        dynamodb,
        config,
        leases,
    });
    let upkeep_task = tokio::spawn(adtrack_service::metrics_endpoint::upkeep(
        prometheus.clone(),
        shutdown.clone(),
    ));
    let admin_task = tokio::spawn(adtrack_service::metrics_endpoint::serve(
        admin,
        prometheus,
        shutdown.clone(),
    ));
    poller.run(shutdown).await;
    let _ = admin_task.await;
    let _ = upkeep_task.await;
    Ok(())
}
