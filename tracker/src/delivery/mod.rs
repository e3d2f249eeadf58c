//! Delivery: everything between a handler's queued event and Kinesis.
//!
//! Handlers append encoded events to the [`inbox`]; the engine, on a thread
//! and runtime of its own so its work (aggregation, MD5, the SDK's JSON,
//! base64 and signing) never sits in front of a request, packs them into
//! KPL aggregates ([`batcher`]), holds every shard to its write budget
//! ([`budget`]), sends PutRecords calls ([`put`]) and resends only failed
//! entries after a backoff ([`retry`]). While Kinesis is unreachable new
//! events go to the disk spool; on shutdown the engine sends what it holds
//! until everything is delivered or the deadline passes, then spools the
//! rest (or, without a spool, reports it lost).

mod batcher;
mod budget;
mod engine;
mod inbox;
mod put;
mod retry;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use aws_config::SdkConfig;
use tokio_util::sync::CancellationToken;

pub use batcher::MAX_RECORDS_PER_CALL;
pub use engine::{Engine, MAX_BYTES_PER_CALL};
pub use inbox::{Inbox, Refused};
pub use put::{CallError, Entry, EntryResult, KinesisStream, RecordStream};
pub use retry::CallFailure;

use crate::health::Health;
use crate::shipper::{EventSink, Shared};
use crate::spool::Spool;
use crate::spool_writer::SpoolWriter;

/// The inbox wakes the engine once it holds this many events (about an
/// aggregate's worth), so full aggregates leave without waiting.
const WAKE_AT_EVENTS: usize = 128;

/// How long the engine may leave the hand-over list untaken before it
/// counts as stuck and new events are spooled (at least the memory age bound).
const STUCK_ENGINE: Duration = Duration::from_secs(10);

/// Engine settings.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub stream: String,
    pub queue_events: usize,
    pub queue_bytes: u64,
    /// Longest an event waits before its call leaves (unless a call fills first).
    pub linger: Duration,
    pub max_inflight: usize,
    /// Pack events into KPL aggregated records.
    pub aggregate: bool,
    pub max_aggregate_bytes: usize,
    pub shard_records_per_sec: u32,
    pub shard_bytes_per_sec: u32,
    /// Longest an event is held only in memory before it is moved to the
    /// spool (with a spool).
    pub memory_max_age: Duration,
}

/// What the engine did by the time it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Events acknowledged by Kinesis.
    pub delivered: u64,
    /// Events not delivered by the deadline, left in the spool for the next start.
    pub spooled: u64,
    /// Events not delivered and not spooled: lost.
    pub lost: u64,
    /// The engine died (panicked) before it could account for what it held.
    pub engine_failed: bool,
}

impl DeliveryReport {
    pub fn undelivered(&self) -> u64 {
        self.spooled + self.lost
    }

    /// Every event accepted was delivered and the engine ran to its end.
    pub fn is_clean(&self) -> bool {
        self.undelivered() == 0 && !self.engine_failed
    }
}

/// Creates the request side and the engine that drains it (and, with a
/// spool, starts the spool's writer thread).
pub fn channel(
    settings: DeliverySettings,
    spool: Option<Arc<Spool>>,
) -> std::io::Result<(EventSink, Engine)> {
    let writer = match &spool {
        Some(spool) => Some(SpoolWriter::start(spool.clone())?.0),
        None => None,
    };
    // With a spool, an engine that leaves the hand-over list untaken this
    // long is stuck (at idle priority under saturation it still takes the
    // list now and then): new events go to disk. Without a spool, memory is
    // the only place.
    let max_wait = if spool.is_some() {
        settings.memory_max_age.max(STUCK_ENGINE)
    } else {
        Duration::MAX
    };
    let inbox = Arc::new(Inbox::new(settings.queue_events, WAKE_AT_EVENTS, max_wait));
    let shared = Arc::new(Shared {
        mem_bytes: AtomicU64::new(0),
        max_mem_bytes: settings.queue_bytes,
        // Until the engine has reached Kinesis, events go to the spool.
        kinesis_down: AtomicBool::new(true),
        spool,
    });
    Ok((
        EventSink::new(inbox.clone(), shared.clone(), writer),
        Engine {
            inbox,
            shared,
            settings,
            beat: None,
            health: None,
        },
    ))
}

/// The engine running on its own thread.
pub struct DeliveryThread {
    done: tokio::sync::oneshot::Receiver<DeliveryReport>,
    thread: std::thread::JoinHandle<()>,
}

/// Starts the engine on a thread with its own single-threaded runtime and
/// its own Kinesis client. The tracker is ready (as far as the stream goes)
/// once the engine has listed the stream's shards.
pub fn start(
    mut engine: Engine,
    aws: SdkConfig,
    health: Arc<Health>,
    give_up: CancellationToken,
) -> std::io::Result<DeliveryThread> {
    engine.beat = Some(health.register("delivery engine", crate::LOOP_DEADLINE));
    engine.health = Some(health);
    let (tx, done) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("delivery")
        .build()?;
    let thread = std::thread::Builder::new()
        .name("delivery".into())
        .spawn(move || {
            lower_priority();
            runtime.block_on(async move {
                let stream = KinesisStream {
                    client: aws_sdk_kinesis::Client::new(&aws),
                    stream: engine.settings.stream.clone(),
                };
                let report = engine.run(stream, give_up).await;
                let _ = tx.send(report);
            });
        })?;
    Ok(DeliveryThread { done, thread })
}

/// Runs the calling (delivery) thread under `SCHED_IDLE`: on a core shared
/// with the request path the engine only uses time no request wants, and a
/// handler that wakes preempts it at once instead of waiting out its time
/// slice (which is what put milliseconds on the p99 at a fixed rate). Under
/// sustained saturation shipping waits: the queue, then the spool, hold the
/// events (both bounded and metered), and it catches up when load eases or
/// the drain stops the listener.
fn lower_priority() {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    if let Err(e) = set_thread_priority_and_policy(
        thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    ) {
        tracing::warn!(error = ?e, "cannot run the delivery thread at idle priority");
    }
}

impl DeliveryThread {
    /// Waits for the engine to end; a dead engine is reported as such.
    pub async fn finish(self) -> DeliveryReport {
        let report = self.done.await.unwrap_or(DeliveryReport {
            engine_failed: true,
            ..DeliveryReport::default()
        });
        let thread = self.thread;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        report
    }
}

#[cfg(test)]
mod tests;
