//! Keeps the program cache and the customer settings current: connects to
//! Redis, subscribes to the change channel, loads every customer record and
//! every program (warm start), then applies each pushed change. Pub/sub is
//! at-most-once, so after every reconnect it loads again.

use std::sync::Arc;
use std::time::Duration;

use adtrack_proto::redis_layout::{CHANGES_CHANNEL, CoreChange};
use adtrack_service::retry::Backoff;
use futures_util::StreamExt;
use redis::aio::ConnectionManagerConfig;
use tokio_util::sync::CancellationToken;

use crate::cache::{FetchError, Loaded, ProgramCache};
use crate::customers::Customers;
use crate::health::{BEAT_EVERY, Beat, Health};
use crate::metric;

/// Reconnects wait up to 100 ms after the first failure, doubling to 5 s.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// Runs until `shutdown`; reconnects with the services' backoff.
/// Beats `beat` as it goes round (see [`crate::health`]).
#[expect(
    clippy::too_many_arguments,
    reason = "the sync task's whole context, given once at start"
)]
pub async fn run(
    client: redis::Client,
    cache: Arc<ProgramCache>,
    customers: Arc<Customers>,
    health: Arc<Health>,
    beat: Arc<Beat>,
    redis_timeout: Duration,
    reconcile_every: Duration,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    let mut connected_before = false;
    loop {
        beat.beat();
        if shutdown.is_cancelled() {
            return;
        }
        match session(
            &client,
            &cache,
            &customers,
            &health,
            &beat,
            redis_timeout,
            reconcile_every,
            &shutdown,
        )
        .await
        {
            Ok(()) if shutdown.is_cancelled() => return,
            Ok(()) => {
                tracing::warn!("Redis pub/sub connection closed; reconnecting");
                failures = 0;
            }
            Err(e) => tracing::warn!(error = %e, "Redis pub/sub unavailable; retrying"),
        }
        if connected_before || cache.is_connected() {
            metrics::counter!(metric::PUBSUB_RECONNECTS).increment(1);
        }
        connected_before = true;
        if RECONNECT.sleep(failures, &shutdown).await.is_err() {
            return;
        }
        failures = failures.saturating_add(1);
    }
}

/// One connected session: subscribe, (re)load everything, apply changes
/// until the connection ends. Returns `Ok` when the stream closed.
#[expect(
    clippy::too_many_arguments,
    reason = "the sync task's whole context, passed down once per session"
)]
async fn session(
    client: &redis::Client,
    cache: &Arc<ProgramCache>,
    customers: &Customers,
    health: &Health,
    beat: &Beat,
    redis_timeout: Duration,
    reconcile_every: Duration,
    shutdown: &CancellationToken,
) -> Result<(), redis::RedisError> {
    if !cache.is_connected() {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(redis_timeout.max(Duration::from_secs(1))));
        let conn = client.get_connection_manager_with_config(config).await?;
        cache.set_connection(conn);
    }
    // Subscribe before loading so no change between the two is missed;
    // versions make the order of the two harmless.
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(CHANGES_CHANNEL).await?;
    let loaded = load_all(cache, customers)
        .await
        .map_err(|e| redis::RedisError::from(std::io::Error::other(e.to_string())))?;
    report_lost_data(&loaded);
    tracing::info!(
        programs = loaded.programs,
        vanished = loaded.vanished,
        "program cache loaded from Redis"
    );
    if !warm_if_complete(health, &loaded) && !health.is_cache_warm() {
        tracing::warn!(
            programs = loaded.programs,
            "Redis has no program version counter (it lost its data, or no programs were ever synced): not ready until it holds every program"
        );
    }
    let mut messages = pubsub.into_on_message();
    // While Redis does not hold every program, look again every second.
    let mut incomplete = tokio::time::interval(Duration::from_secs(1));
    let mut reconcile = tokio::time::interval_at(
        tokio::time::Instant::now() + reconcile_every,
        reconcile_every,
    );
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut alive = tokio::time::interval(BEAT_EVERY);
    loop {
        beat.beat();
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = alive.tick() => {}
            _ = incomplete.tick(), if !health.is_cache_warm() => {
                match load_all(cache, customers).await {
                    Ok(loaded) if warm_if_complete(health, &loaded) => {
                        tracing::info!(programs = loaded.programs, "Redis holds every program: ready");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "loading programs failed"),
                }
            }
            _ = reconcile.tick() => {
                let result = match load_all(cache, customers).await {
                    Ok(loaded) if loaded.redis_lost_data => {
                        report_lost_data(&loaded);
                        "redis_lost_data"
                    }
                    Ok(loaded) => {
                        tracing::debug!(
                            programs = loaded.programs,
                            vanished = loaded.vanished,
                            "cache reconciled with Redis"
                        );
                        "ok"
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cache reconciliation failed");
                        "error"
                    }
                };
                metrics::counter!(metric::RECONCILES, "result" => result).increment(1);
            }
            msg = messages.next() => match msg {
                None => return Ok(()),
                Some(msg) => match CoreChange::parse(msg.get_payload_bytes()) {
                    Ok(change) => {
                        let applied = match &change {
                            CoreChange::Program(change) => cache.apply(change).await,
                            CoreChange::Customer(change) => customers.apply(change),
                        };
                        let result = if applied { "applied" } else { "stale" };
                        metrics::counter!(metric::PUBSUB_CHANGES, "result" => result).increment(1);
                    }
                    Err(e) => {
                        metrics::counter!(metric::PUBSUB_CHANGES, "result" => "invalid").increment(1);
                        tracing::warn!(error = %e, "ignoring unreadable program change message");
                    }
                },
            }
        }
    }
}

/// Loads every customer record, then every program: a tracker that becomes
/// ready with this load already holds every switched-off customer.
async fn load_all(cache: &ProgramCache, customers: &Customers) -> Result<Loaded, FetchError> {
    let mut conn = cache.connection().ok_or(FetchError::NotConnected)?;
    let loaded = customers.load(&mut conn).await?;
    metrics::counter!(metric::CUSTOMERS_LOADED).increment(loaded.records as u64);
    tracing::debug!(
        records = loaded.records,
        vanished = loaded.vanished,
        "customer records loaded from Redis"
    );
    cache.load_all().await
}

/// A tracker becomes ready only once Redis holds every program (its version
/// counter is there): a new tracker never takes an emptied Redis for the
/// truth and refuses hits for programs the sync has not restored yet.
/// True when this load made it ready.
fn warm_if_complete(health: &Health, loaded: &Loaded) -> bool {
    let becomes_ready = !health.is_cache_warm() && loaded.redis_complete;
    if becomes_ready {
        health.set_cache_warm();
    }
    becomes_ready
}

/// A Redis without its version counter lost its data: the cache keeps what
/// it holds rather than take an emptied Redis for the truth.
fn report_lost_data(loaded: &Loaded) {
    if loaded.redis_lost_data {
        tracing::warn!(
            programs = loaded.programs,
            "Redis has no program version counter (it lost its data): keeping every cached program"
        );
    }
}
