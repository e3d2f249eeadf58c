//! Ships events to Kinesis without ever making a request wait: a bounded
//! queue (events and bytes), a batcher that fills PutRecords calls (up to 500
//! records and 5 MiB, or until the linger time), a bounded number of calls in
//! flight, and retries of only the failed entries with exponential backoff and
//! full jitter.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bytes::Bytes;
use rand::Rng;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::metric;

/// Kinesis PutRecords limits.
pub const MAX_RECORDS_PER_CALL: usize = 500;
pub const MAX_BYTES_PER_CALL: usize = 5 * 1024 * 1024;

const RETRY_BASE: Duration = Duration::from_millis(50);
const RETRY_CAP: Duration = Duration::from_secs(5);

/// One event on its way to Kinesis.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The event id: spreads events over shards and lets the consumer dedup.
    pub partition_key: String,
    /// The encoded `TrackingEvent`.
    pub data: Bytes,
}

impl Outgoing {
    fn size(&self) -> u64 {
        (self.data.len() + self.partition_key.len()) as u64
    }
}

/// Why an event was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("event queue is full")]
    Full,
    #[error("shutting down")]
    Closed,
}

impl QueueError {
    pub fn cause(self) -> &'static str {
        match self {
            Self::Full => "queue_full",
            Self::Closed => "shutting_down",
        }
    }
}

/// The request side of the queue; cheap to clone.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<Outgoing>,
    queued_bytes: Arc<AtomicU64>,
    max_bytes: u64,
}

impl EventSink {
    /// Queues an event without waiting.
    pub fn try_send(&self, ev: Outgoing) -> Result<(), QueueError> {
        let size = ev.size();
        let before = self.queued_bytes.fetch_add(size, Ordering::AcqRel);
        if before + size > self.max_bytes {
            self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            return Err(QueueError::Full);
        }
        match self.tx.try_send(ev) {
            Ok(()) => {
                metrics::counter!(metric::EVENTS_ACCEPTED).increment(1);
                Ok(())
            }
            Err(e) => {
                self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => QueueError::Full,
                    mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
                })
            }
        }
    }
}

impl EventSink {
    /// Queues all events or none (a batch request's events go together).
    pub fn try_send_all(&self, events: Vec<Outgoing>) -> Result<(), QueueError> {
        if events.is_empty() {
            return Ok(());
        }
        let size: u64 = events.iter().map(Outgoing::size).sum();
        let before = self.queued_bytes.fetch_add(size, Ordering::AcqRel);
        if before + size > self.max_bytes {
            self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            return Err(QueueError::Full);
        }
        let permits = match self.tx.try_reserve_many(events.len()) {
            Ok(p) => p,
            Err(e) => {
                self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
                return Err(match e {
                    mpsc::error::TrySendError::Full(()) => QueueError::Full,
                    mpsc::error::TrySendError::Closed(()) => QueueError::Closed,
                });
            }
        };
        let n = events.len() as u64;
        for (permit, ev) in permits.zip(events) {
            permit.send(ev);
        }
        metrics::counter!(metric::EVENTS_ACCEPTED).increment(n);
        Ok(())
    }
}

/// Batcher settings.
#[derive(Debug, Clone)]
pub struct ShipperSettings {
    pub stream: String,
    pub queue_events: usize,
    pub queue_bytes: u64,
    pub linger: Duration,
    pub max_inflight: usize,
}

/// What the batcher did by the time it stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub delivered: u64,
    pub undelivered: u64,
}

/// Creates the queue; run the returned [`Batcher`] until the sink's clones
/// are all dropped.
pub fn channel(settings: ShipperSettings) -> (EventSink, Batcher) {
    let (tx, rx) = mpsc::channel(settings.queue_events.max(1));
    let queued_bytes = Arc::new(AtomicU64::new(0));
    let sink = EventSink {
        tx,
        queued_bytes: queued_bytes.clone(),
        max_bytes: settings.queue_bytes,
    };
    (
        sink,
        Batcher {
            rx,
            queued_bytes,
            settings,
        },
    )
}

/// The consuming side: batches and sends.
pub struct Batcher {
    rx: mpsc::Receiver<Outgoing>,
    queued_bytes: Arc<AtomicU64>,
    settings: ShipperSettings,
}

impl Batcher {
    /// Sends until the queue is closed and empty and every call has finished.
    /// `give_up` stops retrying: what is still unsent is reported undelivered.
    pub async fn run(mut self, client: Client, give_up: CancellationToken) -> DeliveryReport {
        let inflight = Arc::new(Semaphore::new(self.settings.max_inflight.max(1)));
        let mut calls: JoinSet<DeliveryReport> = JoinSet::new();
        let mut report = DeliveryReport::default();
        let mut buf: Vec<Outgoing> = Vec::with_capacity(MAX_RECORDS_PER_CALL);
        let stream: Arc<str> = self.settings.stream.as_str().into();
        loop {
            // Reap finished calls without waiting.
            while let Some(done) = calls.try_join_next() {
                add(&mut report, done);
            }
            if self.rx.recv_many(&mut buf, MAX_RECORDS_PER_CALL).await == 0 {
                break; // closed and empty
            }
            let deadline = tokio::time::Instant::now() + self.settings.linger;
            while buf.len() < MAX_RECORDS_PER_CALL {
                let room = MAX_RECORDS_PER_CALL - buf.len();
                match tokio::time::timeout_at(deadline, self.rx.recv_many(&mut buf, room)).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            // Split by the 5 MiB call limit.
            let mut batch = Vec::with_capacity(buf.len());
            let mut batch_bytes = 0usize;
            for ev in buf.drain(..) {
                let size = ev.size() as usize;
                if batch_bytes + size > MAX_BYTES_PER_CALL && !batch.is_empty() {
                    let full = std::mem::take(&mut batch);
                    self.dispatch(full, &inflight, &mut calls, &client, &stream, &give_up)
                        .await;
                    batch_bytes = 0;
                }
                batch_bytes += size;
                batch.push(ev);
            }
            if !batch.is_empty() {
                self.dispatch(batch, &inflight, &mut calls, &client, &stream, &give_up)
                    .await;
            }
            metrics::gauge!(metric::QUEUE_EVENTS).set(self.rx.len() as f64);
            metrics::gauge!(metric::QUEUE_BYTES)
                .set(self.queued_bytes.load(Ordering::Acquire) as f64);
        }
        while let Some(done) = calls.join_next().await {
            add(&mut report, done);
        }
        metrics::gauge!(metric::QUEUE_EVENTS).set(0.0);
        metrics::gauge!(metric::QUEUE_BYTES).set(0.0);
        report
    }

    async fn dispatch(
        &self,
        batch: Vec<Outgoing>,
        inflight: &Arc<Semaphore>,
        calls: &mut JoinSet<DeliveryReport>,
        client: &Client,
        stream: &Arc<str>,
        give_up: &CancellationToken,
    ) {
        let bytes: u64 = batch.iter().map(Outgoing::size).sum();
        let permit = inflight
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
        let (client, stream, give_up) = (client.clone(), stream.clone(), give_up.clone());
        calls.spawn(async move {
            let r = send_with_retries(&client, &stream, batch, &give_up).await;
            drop(permit);
            r
        });
    }
}

fn add(total: &mut DeliveryReport, r: Result<DeliveryReport, tokio::task::JoinError>) {
    match r {
        Ok(r) => {
            total.delivered += r.delivered;
            total.undelivered += r.undelivered;
        }
        Err(e) => tracing::error!(error = %e, "Kinesis send task failed"),
    }
}

/// Sends one batch, resending only the entries that failed, until all are in
/// or `give_up` fires.
async fn send_with_retries(
    client: &Client,
    stream: &str,
    mut pending: Vec<Outgoing>,
    give_up: &CancellationToken,
) -> DeliveryReport {
    let mut report = DeliveryReport::default();
    if give_up.is_cancelled() {
        report.undelivered = pending.len() as u64;
        return report;
    }
    let mut attempt: u32 = 0;
    loop {
        let entries: Vec<PutRecordsRequestEntry> = pending
            .iter()
            .filter_map(|r| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(r.data.to_vec()))
                    .partition_key(&r.partition_key)
                    .build()
                    .ok()
            })
            .collect();
        let started = Instant::now();
        let result = client
            .put_records()
            .stream_name(stream)
            .set_records(Some(entries))
            .send()
            .await;
        metrics::histogram!(metric::KINESIS_CALL_DURATION).record(started.elapsed().as_secs_f64());
        match result {
            Ok(out) => {
                let failed = out.failed_record_count.unwrap_or(0);
                if failed == 0 {
                    metrics::counter!(metric::KINESIS_CALLS, "result" => "ok").increment(1);
                    delivered(&mut report, pending.len());
                    return report;
                }
                metrics::counter!(metric::KINESIS_CALLS, "result" => "partial").increment(1);
                let mut retry = Vec::with_capacity(failed as usize);
                let mut ok = 0;
                for (ev, res) in pending.into_iter().zip(out.records) {
                    match res.error_code.as_deref() {
                        None => ok += 1,
                        Some(code) => {
                            let cause = if code == "ProvisionedThroughputExceededException" {
                                "throttled"
                            } else {
                                "internal"
                            };
                            metrics::counter!(metric::KINESIS_RETRIES, "cause" => cause)
                                .increment(1);
                            retry.push(ev);
                        }
                    }
                }
                delivered(&mut report, ok);
                pending = retry;
            }
            Err(e) => {
                metrics::counter!(metric::KINESIS_CALLS, "result" => "error").increment(1);
                metrics::counter!(metric::KINESIS_RETRIES, "cause" => "call_failed")
                    .increment(pending.len() as u64);
                if attempt == 0 || attempt.is_power_of_two() {
                    tracing::warn!(error = %aws_sdk_kinesis::error::DisplayErrorContext(&e), records = pending.len(), attempt, "PutRecords failed; retrying");
                }
            }
        }
        attempt = attempt.saturating_add(1);
        let ceiling = RETRY_BASE
            .saturating_mul(1u32 << attempt.min(16))
            .min(RETRY_CAP);
        let pause = rand::rng().random_range(Duration::ZERO..=ceiling);
        tokio::select! {
            _ = give_up.cancelled() => {
                report.undelivered += pending.len() as u64;
                return report;
            }
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

fn delivered(report: &mut DeliveryReport, n: usize) {
    report.delivered += n as u64;
    metrics::counter!(metric::KINESIS_RECORDS).increment(n as u64);
    metrics::counter!(metric::EVENTS_DELIVERED).increment(n as u64);
}
