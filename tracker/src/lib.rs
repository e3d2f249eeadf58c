//! adtrack tracker: validates each hit against the program cache (moka in
//! process, Redis behind it, kept current by pub/sub), replies at once, and
//! ships the event to Kinesis in the background.
//!
//! `main` parses [`Config`] and calls [`run`]; tests call [`run`] too.

pub mod admin;
pub mod api_error;
pub mod batch;
pub mod bots;
pub mod cache;
pub mod config;
pub mod conn_timeouts;
pub mod cors;
pub mod health;
pub mod hit;
pub mod metric;
pub mod routes;
pub mod server;
pub mod shipper;
pub mod sync;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::cache::{CacheSettings, ProgramCache};
use crate::health::Health;
use crate::hit::{IpPolicy, Privacy};
use crate::routes::{AppState, Limits};
use crate::shipper::{DeliveryReport, ShipperSettings};

/// Runs the tracker until `shutdown` fires, then drains: readiness goes false,
/// the listener closes, in-flight requests finish, queued events are sent
/// within the drain deadline. Returns what was delivered and what was not.
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<DeliveryReport> {
    let prometheus = metric::install();
    let health = Arc::new(Health::default());
    let redis = redis::Client::open(config.redis_url.as_str())
        .with_context(|| format!("REDIS_URL {:?} is not a Redis URL", config.redis_url))?;
    let aws = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_attempt_timeout(Duration::from_secs(10))
                .build(),
        )
        .load()
        .await;
    let kinesis = aws_sdk_kinesis::Client::new(&aws);

    let cache = Arc::new(ProgramCache::new(&CacheSettings {
        capacity: config.cache_capacity,
        positive_ttl: config.cache_ttl(),
        negative_ttl: config.negative_ttl(),
        redis_timeout: config.redis_timeout(),
    }));
    let (sink, batcher) = shipper::channel(ShipperSettings {
        stream: config.events_stream.clone(),
        queue_events: config.queue_events as usize,
        queue_bytes: config.queue_bytes,
        linger: config.batch_linger(),
        max_inflight: config.max_inflight_batches as usize,
    });

    let give_up = CancellationToken::new();
    let background = CancellationToken::new();
    let batcher_task = tokio::spawn(batcher.run(kinesis.clone(), give_up.clone()));
    let sync_task = tokio::spawn(sync::run(
        redis,
        cache.clone(),
        health.clone(),
        config.redis_timeout(),
        config.reconcile_every(),
        background.clone(),
    ));
    let stream_task = tokio::spawn(check_stream(
        kinesis,
        config.events_stream.clone(),
        health.clone(),
        background.clone(),
    ));
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(admin::AdminState {
            health: health.clone(),
            cache: cache.clone(),
            prometheus,
        }),
        background.clone(),
    ));

    let state = Arc::new(AppState {
        cache,
        sink,
        health: health.clone(),
        ip_policy: IpPolicy {
            trusted_proxy_hops: config.trusted_proxy_hops,
            keep_full_ip: config.keep_full_ip,
        },
        privacy: Privacy::new(&config.privacy_signals, &config.identifier_params),
        cors: config.cors_origins.clone(),
        limits: Limits {
            max_uri_bytes: config.max_uri_bytes,
            max_body_bytes: config.max_body_bytes,
            max_batch_events: config.max_batch_events,
            body_timeout: config.body_timeout(),
        },
    });
    let deadline = config.drain_deadline();
    let stop_accepting = CancellationToken::new();
    let server_task = tokio::spawn(server::serve(
        listener,
        state,
        server::ServerSettings {
            max_connections: config.max_connections as usize,
            header_timeout: config.header_timeout(),
            idle_timeout: config.idle_timeout(),
            max_header_bytes: config.max_header_bytes as usize,
        },
        stop_accepting.clone(),
        deadline,
    ));

    shutdown.cancelled().await;
    let drain_started = Instant::now();
    health.set_draining();
    tracing::info!(
        deadline_secs = deadline.as_secs(),
        "draining: not ready, closing the listener"
    );
    stop_accepting.cancel();
    // The server task owns the last request-side handle on the queue; once it
    // ends, the batcher sees the queue close and flushes what is left.
    let _ = server_task.await;
    let remaining = deadline.saturating_sub(drain_started.elapsed());
    let giver = give_up.clone();
    let timer = tokio::spawn(async move {
        tokio::time::sleep(remaining).await;
        giver.cancel();
    });
    let report = batcher_task.await.unwrap_or_default();
    timer.abort();
    if report.undelivered > 0 {
        metrics::counter!(metric::EVENTS_DROPPED, "cause" => "drain_deadline")
            .increment(report.undelivered);
        tracing::error!(
            undelivered = report.undelivered,
            delivered = report.delivered,
            "drain deadline reached: {} event(s) not delivered to Kinesis",
            report.undelivered
        );
    } else {
        tracing::info!(
            delivered = report.delivered,
            "drained: every accepted event delivered"
        );
    }
    background.cancel();
    let _ = tokio::join!(sync_task, stream_task, admin_task);
    Ok(report)
}

/// Asks Kinesis about the stream until it answers; readiness waits for it.
async fn check_stream(
    client: aws_sdk_kinesis::Client,
    stream: String,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let mut pause = Duration::from_millis(200);
    loop {
        match client
            .describe_stream_summary()
            .stream_name(&stream)
            .send()
            .await
        {
            Ok(_) => {
                health.set_stream_ok();
                tracing::info!(stream, "Kinesis stream answered");
                return;
            }
            Err(e) => tracing::warn!(
                stream,
                error = %aws_sdk_kinesis::error::DisplayErrorContext(&e),
                "Kinesis stream not available; not ready"
            ),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
