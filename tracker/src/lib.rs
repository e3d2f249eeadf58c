//! adtrack tracker: validates each hit against the program cache (moka in
//! process, Redis behind it, kept current by pub/sub), replies at once, and
//! ships the event to Kinesis in the background.
//!
//! `main` parses [`Config`] and calls [`run`]; tests call [`run`] too.

pub mod admin;
pub mod api_error;
pub mod app_state;
pub mod bots;
pub mod cache;
pub mod config;
pub mod conn_timeouts;
pub mod consent;
pub mod cors;
pub mod customers;
pub mod delivery;
pub mod health;
pub mod hit;
pub mod ingest;
pub mod metric;
pub mod outgoing;
pub mod program_entry;
pub mod routes;
pub mod server;
pub mod shard_map;
pub mod shipper;
pub mod spool;
pub mod spool_writer;
pub mod sync;
pub mod user_cookie;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::cache::{CacheSettings, ProgramCache};
use crate::delivery::{DeliveryReport, DeliverySettings};
use crate::health::Health;
use crate::hit::{IpPolicy, Privacy};
use crate::routes::{AppState, Limits};
use crate::spool::Spool;

/// How long a background loop may go without reporting in before liveness
/// fails (they report every second; see [`health`]).
pub const LOOP_DEADLINE: Duration = Duration::from_secs(30);

/// The share of the drain deadline open connections get to finish their
/// requests; the rest is the delivery engine's alone, so a slow client
/// cannot leave nothing for flushing.
pub const CONNECTIONS_SHARE: f64 = 0.5;

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
        .app_name(aws_config::AppName::new("adtrack-tracker").expect("a valid app name"))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_attempt_timeout(Duration::from_secs(10))
                .build(),
        )
        .load()
        .await;

    let cache = Arc::new(ProgramCache::new(&CacheSettings {
        capacity: config.cache_capacity,
        positive_ttl: config.cache_ttl(),
        negative_ttl: config.negative_ttl(),
        redis_timeout: config.redis_timeout(),
    }));
    let customers = Arc::new(customers::Customers::new(customers::DefaultLimit {
        per_sec: config.customer_rate_limit,
        burst: config.customer_rate_burst,
    }));
    let spool = open_spool(&config)?;
    let (sink, engine) = delivery::channel(
        DeliverySettings {
            stream: config.events_stream.clone(),
            queue_events: config.queue_events as usize,
            queue_bytes: config.queue_bytes,
            linger: config.batch_linger(),
            max_inflight: config.max_inflight_batches as usize,
            aggregate: config.aggregation,
            max_aggregate_bytes: config.max_aggregate_bytes as usize,
            shard_records_per_sec: config.shard_records_per_sec,
            shard_bytes_per_sec: config.shard_bytes_per_sec,
            memory_max_age: config.memory_max_age(),
        },
        spool.clone(),
    )
    .context("starting the spool writer")?;

    let give_up = CancellationToken::new();
    let background = CancellationToken::new();
    let delivery = delivery::start(engine, aws, health.clone(), give_up.clone())
        .context("starting the delivery thread")?;
    let spool_task = spool.map(|spool| tokio::spawn(spool_gauges(spool, background.clone())));
    let sync_task = tokio::spawn(sync::run(
        redis,
        cache.clone(),
        customers.clone(),
        health.clone(),
        health.register("program sync", LOOP_DEADLINE),
        config.redis_timeout(),
        config.reconcile_every(),
        background.clone(),
    ));
    let upkeep_task = tokio::spawn(adtrack_service::metrics_endpoint::upkeep(
        prometheus.clone(),
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
        customers,
        sink: sink.clone(),
        health: health.clone(),
        ip_policy: IpPolicy {
            trusted_proxy_hops: config.trusted_proxy_hops,
            keep_full_ip: config.keep_full_ip,
        },
        privacy: Privacy::new(
            &config.privacy_signals,
            &config.identifier_params,
            consent::ConsentMode::parse(&config.consent),
        ),
        cors: config.cors_origins.clone(),
        limits: Limits {
            max_uri_bytes: config.max_uri_bytes,
            max_body_bytes: config.max_body_bytes,
            max_batch_events: config.max_batch_events,
            body_timeout: config.body_timeout(),
            // One Redis timeout for the whole batch (and a little for the rest).
            lookup_deadline: config.redis_timeout() + Duration::from_millis(50),
            path_prefix: config.path_prefix.clone(),
        },
        meters: metric::RequestMeters::default(),
        user_cookie: config.user_cookie.then(|| user_cookie::CookiePolicy {
            domain: config.user_cookie_domain.clone(),
            max_age_secs: u64::from(config.user_cookie_days) * 86_400,
        }),
    });
    let deadline = config.drain_deadline();
    let stop_accepting = CancellationToken::new();
    let server_task = tokio::spawn(server::serve(
        listener,
        state,
        server::ServerSettings {
            max_connections: config.max_connections as usize,
            header_timeout: config.header_timeout(),
            write_timeout: config.write_timeout(),
            max_uri_bytes: config.max_uri_bytes as usize,
            idle_timeout: config.idle_timeout(),
            max_header_bytes: config.max_header_bytes as usize,
        },
        stop_accepting.clone(),
        // Requests in flight get their share; the rest is for flushing.
        deadline.mul_f64(CONNECTIONS_SHARE),
    ));

    shutdown.cancelled().await;
    let drain_started = Instant::now();
    health.set_draining();
    tracing::info!(
        deadline_secs = deadline.as_secs(),
        "draining: not ready, closing the listener"
    );
    stop_accepting.cancel();
    // Once the server is done (every connection task has ended), the inbox
    // closes and the engine flushes what is left; nothing can be offered
    // after that (it would be refused and counted as `shutting_down`).
    let _ = server_task.await;
    sink.close();
    let remaining = deadline.saturating_sub(drain_started.elapsed());
    let giver = give_up.clone();
    let timer = tokio::spawn(async move {
        tokio::time::sleep(remaining).await;
        giver.cancel();
    });
    let report = delivery.finish().await;
    timer.abort();
    if report.lost > 0 {
        metrics::counter!(metric::EVENTS_DROPPED, "cause" => "drain_deadline")
            .increment(report.lost);
    }
    if report.engine_failed {
        tracing::error!(
            delivered = report.delivered,
            "the delivery engine died: events it held are not accounted for"
        );
    } else if report.undelivered() > 0 {
        tracing::error!(
            delivered = report.delivered,
            spooled = report.spooled,
            lost = report.lost,
            "drain deadline reached: {} event(s) not delivered to Kinesis ({} kept in the spool at {}, {} lost)",
            report.undelivered(),
            report.spooled,
            if config.spool_dir.is_empty() {
                "(none)"
            } else {
                config.spool_dir.as_str()
            },
            report.lost
        );
    } else {
        tracing::info!(
            delivered = report.delivered,
            "drained: every accepted event delivered"
        );
    }
    background.cancel();
    let _ = tokio::join!(sync_task, admin_task, upkeep_task);
    if let Some(t) = spool_task {
        let _ = t.await;
    }
    Ok(report)
}

fn open_spool(config: &Config) -> Result<Option<Arc<Spool>>> {
    if config.spool_dir.is_empty() {
        return Ok(None);
    }
    let dir = std::path::Path::new(&config.spool_dir);
    let (spool, recovered) = Spool::open(dir, config.spool_max_bytes, config.spool_segment_bytes)
        .with_context(|| {
        format!("TRACKER_SPOOL_DIR {}: cannot open the spool", dir.display())
    })?;
    if recovered.entries > 0 || recovered.truncated_bytes > 0 {
        tracing::warn!(
            events = recovered.entries,
            segments = recovered.segments,
            truncated_bytes = recovered.truncated_bytes,
            "spool holds events from a previous run; they will be delivered"
        );
    }
    Ok(Some(Arc::new(spool)))
}

/// Publishes the spool's size (the spool writer flushes it to the device);
/// a last flush at the end covers what the engine spooled on its way out.
async fn spool_gauges(spool: Arc<Spool>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        metrics::gauge!(metric::SPOOL_EVENTS).set(spool.pending() as f64);
        metrics::gauge!(metric::SPOOL_BYTES).set(spool.bytes() as f64);
    }
    let _ = tokio::task::spawn_blocking(move || spool.sync()).await;
}
