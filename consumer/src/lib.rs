//! adtrack consumer: Kinesis events stream to DynamoDB. Every event becomes
//! one item keyed by its event id, so at-least-once delivery from Kinesis
//! gives exactly one item per event. See [`item`] for the table layout.
//!
//! One core ([`batch::process`]), two front-ends: the Lambda handler
//! ([`lambda`], behind an event source mapping, answering a partial batch
//! response) and the poller (for local runs and ECS): adtrack's Kinesis
//! reader (`adtrack_reader`: leases, checkpoints, reshard order) with
//! [`EventWriter`] as its handler.

pub mod batch;
pub mod config;
pub mod conversions;
pub mod item;
pub mod lambda;
pub mod lambda_config;
pub mod metric;
pub mod write_config;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use adtrack_reader::{Handler, Reader, Record, Settings};
use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The events stream's handler: each page through the batch core into the
/// events table. It waits out a DynamoDB outage rather than skip ahead, so
/// a page is short only when stopped.
pub struct EventWriter {
    pub client: aws_sdk_dynamodb::Client,
    pub tables: batch::Tables,
}

impl Handler for EventWriter {
    async fn handle(&self, records: &[Record], stop: &CancellationToken) -> usize {
        let outcome = batch::process(&self.client, &self.tables, records, stop).await;
        outcome.first_failed.unwrap_or(records.len())
    }
}

impl Config {
    /// The reader's settings for the events stream.
    pub fn reader_settings(&self) -> Settings {
        Settings {
            stream: self.events_stream.clone(),
            checkpoint_table: self.checkpoints.checkpoint_table.clone(),
            lease_duration: self.lease_duration(),
            poll_interval: self.poll_interval(),
            max_records: self.max_records,
            start_position: self.start_position,
            metric_prefix: metric::READER_PREFIX,
        }
    }
}

/// Runs the poller until `shutdown`. Records whose events are not yet
/// written when it stops are read again on the next start.
pub async fn run(
    config: Config,
    admin: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let prometheus = adtrack_service::metrics_endpoint::install(&[]);
    let aws = aws_config::defaults(BehaviorVersion::latest())
        .app_name(aws_config::AppName::new("adtrack-consumer").expect("a valid app name"))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_attempt_timeout(Duration::from_secs(10))
                .build(),
        )
        .load()
        .await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&aws);
    let owner = adtrack_reader::owner_name("poller");
    tracing::info!(owner, "poller identity");
    let handler = EventWriter {
        client: dynamodb.clone(),
        // Attempts 0: retry until written or stopped.
        tables: config.write.tables(0),
    };
    let reader = Arc::new(Reader::new(
        aws_sdk_kinesis::Client::new(&aws),
        dynamodb,
        owner,
        config.reader_settings(),
        handler,
    ));
    let upkeep_task = tokio::spawn(adtrack_service::metrics_endpoint::upkeep(
        prometheus.clone(),
        shutdown.clone(),
    ));
    let admin_task = tokio::spawn(adtrack_service::metrics_endpoint::serve(
        admin,
        prometheus,
        shutdown.clone(),
    ));
    reader.run(shutdown).await;
    let _ = admin_task.await;
    let _ = upkeep_task.await;
    Ok(())
}
