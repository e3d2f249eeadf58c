//! The delivery engine: takes events from the in-memory queue (and, once
//! Kinesis answers, from the disk spool), groups them by the shard their own
//! partition key hashes to, packs each group into KPL aggregated records
//! (with an explicit hash key inside that shard, so the whole aggregate lands
//! where its events belong), and sends PutRecords calls of up to 500 records
//! and 5 MiB, a bounded number at a time.
//!
//! Only failed entries are resent, after an exponential backoff with full
//! jitter. A shard that answers `ProvisionedThroughputExceededException` is
//! paused, and every shard is held to its write budget (1,000 records and
//! 1 MiB per second by default). After consecutive failed calls Kinesis is
//! marked down and the request side writes new events to the spool.
//!
//! On shutdown the engine sends what it holds until the queue and the spool
//! are empty, or until `give_up` fires; then what is still in memory is
//! written to the spool (or, without one, reported lost).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use adtrack_proto::kpl::{Aggregator, UserRecord};
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::operation::put_records::PutRecordsOutput;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bytes::Bytes;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metric;
use crate::shard_map::ShardMap;
use crate::shipper::{EventSink, Outgoing, Shared};
use crate::spool::{SegmentId, Spool};

/// Kinesis PutRecords limits.
pub const MAX_RECORDS_PER_CALL: usize = 500;
pub const MAX_BYTES_PER_CALL: usize = 5 * 1024 * 1024;

const RETRY_BASE: Duration = Duration::from_millis(50);
const RETRY_CAP: Duration = Duration::from_secs(5);
const THROTTLE_PAUSE_BASE: Duration = Duration::from_millis(100);
const THROTTLE_PAUSE_CAP: Duration = Duration::from_secs(2);
const FAILURES_BEFORE_DOWN: u32 = 3;
const MAP_REFRESH: Duration = Duration::from_secs(60);
/// Most spooled events held in memory at once while replaying.
const SPOOL_WINDOW: u64 = 20_000;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub stream: String,
    pub queue_events: usize,
    pub queue_bytes: u64,
    pub linger: Duration,
    pub max_inflight: usize,
    /// Pack events into KPL aggregated records.
    pub aggregate: bool,
    pub max_aggregate_bytes: usize,
    pub shard_records_per_sec: u32,
    pub shard_bytes_per_sec: u32,
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
}

impl DeliveryReport {
    pub fn undelivered(&self) -> u64 {
        self.spooled + self.lost
    }
}

/// Creates the queue and the engine that drains it.
pub fn channel(settings: DeliverySettings, spool: Option<Arc<Spool>>) -> (EventSink, Engine) {
    let (tx, rx) = mpsc::channel(settings.queue_events.max(1));
    let shared = Arc::new(Shared {
        mem_bytes: std::sync::atomic::AtomicU64::new(0),
        max_mem_bytes: settings.queue_bytes,
        // Until the engine has reached Kinesis, events go to the spool.
        kinesis_down: std::sync::atomic::AtomicBool::new(true),
        spool,
    });
    (
        EventSink::new(tx, shared.clone()),
        Engine {
            rx,
            shared,
            settings,
        },
    )
}

/// One event inside the engine, with where it came from.
#[derive(Debug, Clone)]
struct Unit {
    ev: Outgoing,
    /// `None`: from memory (its bytes are released on delivery);
    /// `Some`: read from this spool segment (acknowledged on delivery).
    origin: Option<SegmentId>,
}

/// One Kinesis record: an aggregate or a plain event.
#[derive(Debug)]
struct KRecord {
    partition_key: String,
    explicit_hash_key: Option<String>,
    data: Bytes,
    units: Vec<Unit>,
    shard: usize,
    attempts: u32,
    not_before: Instant,
    ready_since: Instant,
}

impl KRecord {
    fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// A shard's write budget (token bucket of one second's allowance).
#[derive(Debug)]
struct Budget {
    records: f64,
    bytes: f64,
    rate_records: f64,
    rate_bytes: f64,
    refilled: Instant,
    paused_until: Instant,
    throttles: u32,
}

impl Budget {
    fn new(records_per_sec: u32, bytes_per_sec: u32, now: Instant) -> Self {
        Self {
            records: records_per_sec as f64,
            bytes: bytes_per_sec as f64,
            rate_records: records_per_sec as f64,
            rate_bytes: bytes_per_sec as f64,
            refilled: now,
            paused_until: now,
            throttles: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.records = (self.records + dt * self.rate_records).min(self.rate_records);
        self.bytes = (self.bytes + dt * self.rate_bytes).min(self.rate_bytes);
        self.refilled = now;
    }

    /// Takes one record of `size` bytes if the shard can take it now.
    fn try_take(&mut self, size: usize, now: Instant) -> bool {
        if now < self.paused_until {
            return false;
        }
        self.refill(now);
        // A record bigger than a second's allowance still goes when the bucket is full.
        let size = (size as f64).min(self.rate_bytes);
        if self.records >= 1.0 && self.bytes >= size {
            self.records -= 1.0;
            self.bytes -= size;
            true
        } else {
            false
        }
    }

    fn throttled(&mut self, now: Instant) {
        self.throttles = self.throttles.saturating_add(1);
        let pause = THROTTLE_PAUSE_BASE
            .saturating_mul(1 << self.throttles.min(5))
            .min(THROTTLE_PAUSE_CAP);
        self.paused_until = now + pause;
        self.records = 0.0;
        self.bytes = 0.0;
    }

    fn succeeded(&mut self) {
        self.throttles = 0;
    }

    /// When this shard may send again, if it cannot now.
    fn next_chance(&self, now: Instant) -> Instant {
        if now < self.paused_until {
            self.paused_until
        } else {
            now + Duration::from_millis(10)
        }
    }
}

struct ShardState {
    open: Vec<Unit>,
    aggregator: Aggregator,
    open_since: Option<Instant>,
    ready: VecDeque<KRecord>,
    budget: Budget,
}

struct CallOutcome {
    id: u64,
    result: Result<PutRecordsOutput, String>,
}

/// The consuming side: batches, aggregates, sends, retries, spools.
pub struct Engine {
    rx: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
    settings: DeliverySettings,
}

struct Run {
    client: Client,
    settings: DeliverySettings,
    shared: Arc<Shared>,
    map: ShardMap,
    shards: Vec<ShardState>,
    inflight: HashMap<u64, Vec<KRecord>>,
    calls: JoinSet<CallOutcome>,
    next_call: u64,
    rotate: usize,
    failures: u32,
    spool_held: u64,
    need_refresh: bool,
    refresh_at: Instant,
    report: DeliveryReport,
}

impl Engine {
    /// Runs until the queue is closed (all sinks dropped) and everything it
    /// held, and everything in the spool, is delivered, or until `give_up`.
    pub async fn run(mut self, client: Client, give_up: CancellationToken) -> DeliveryReport {
        let stream = self.settings.stream.clone();
        let mut pause = Duration::from_millis(100);
        let map = loop {
            match ShardMap::fetch(&client, &stream).await {
                Ok(map) => break map,
                Err(e) => {
                    tracing::warn!(stream, error = %e, "cannot list the stream's shards yet");
                    tokio::select! {
                        _ = give_up.cancelled() => {
                            return self.abandon_queue();
                        }
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        };
        tracing::info!(
            stream,
            shards = map.len(),
            aggregate = self.settings.aggregate,
            "delivery engine started"
        );
        self.shared.kinesis_down.store(false, Ordering::Release);
        let now = Instant::now();
        let mut run = Run {
            shards: Vec::new(),
            client,
            settings: self.settings.clone(),
            shared: self.shared.clone(),
            map,
            inflight: HashMap::new(),
            calls: JoinSet::new(),
            next_call: 0,
            rotate: 0,
            failures: 0,
            spool_held: 0,
            need_refresh: false,
            refresh_at: now + MAP_REFRESH,
            report: DeliveryReport::default(),
        };
        run.shards = (0..run.map.len()).map(|_| run.new_shard(now)).collect();
        let mut closed = false;
        let mut next_gauges = Instant::now();
        loop {
            let now = Instant::now();
            // Intake from memory, then (when Kinesis answers) from the spool.
            let mut taken = 0;
            while taken < 20_000 {
                match self.rx.try_recv() {
                    Ok(ev) => {
                        run.place(Unit { ev, origin: None }, now);
                        taken += 1;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            run.intake_spool(self.rx.is_empty(), now);
            if run.need_refresh || now >= run.refresh_at {
                run.refresh_map().await;
            }
            run.seal_due(closed, now);
            run.dispatch(closed, now);
            if now >= next_gauges {
                next_gauges = now + Duration::from_millis(250);
                metrics::gauge!(metric::QUEUE_EVENTS).set(self.rx.len() as f64);
                metrics::gauge!(metric::QUEUE_BYTES)
                    .set(self.shared.mem_bytes.load(Ordering::Acquire) as f64);
            }
            if closed && run.is_empty() {
                break;
            }
            let wake = run.next_wake(closed, now);
            tokio::select! {
                _ = give_up.cancelled() => {
                    return run.abandon(&mut self.rx).await;
                }
                Some(done) = run.calls.join_next(), if !run.calls.is_empty() => {
                    if let Ok(done) = done {
                        run.complete(done, Instant::now());
                    }
                }
                msg = self.rx.recv(), if !closed => match msg {
                    Some(ev) => run.place(Unit { ev, origin: None }, Instant::now()),
                    None => closed = true,
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
        if let Some(spool) = &self.shared.spool {
            spool.reset_if_drained();
        }
        metrics::gauge!(metric::QUEUE_EVENTS).set(0.0);
        metrics::gauge!(metric::QUEUE_BYTES).set(0.0);
        run.report
    }

    /// Gave up before any shard map: spool (or count lost) what is queued.
    fn abandon_queue(&mut self) -> DeliveryReport {
        let mut report = DeliveryReport::default();
        let mut units = Vec::new();
        while let Ok(ev) = self.rx.try_recv() {
            units.push(Unit { ev, origin: None });
        }
        spool_or_lose(&self.shared, units, &mut report);
        report
    }
}

fn spool_or_lose(shared: &Shared, units: Vec<Unit>, report: &mut DeliveryReport) {
    let memory: Vec<Outgoing> = units
        .into_iter()
        .filter(|u| u.origin.is_none())
        .map(|u| {
            shared.release(u.ev.size());
            u.ev
        })
        .collect();
    if memory.is_empty() {
        return;
    }
    let n = memory.len() as u64;
    match &shared.spool {
        Some(spool) => match spool.append_all(&memory) {
            Ok(()) => {
                let _ = spool.sync();
                report.spooled += n;
            }
            Err(e) => {
                tracing::error!(error = %e, events = n, "could not spool undelivered events");
                report.lost += n;
            }
        },
        None => report.lost += n,
    }
}

impl Run {
    fn new_shard(&self, now: Instant) -> ShardState {
        ShardState {
            open: Vec::new(),
            aggregator: Aggregator::new(self.settings.max_aggregate_bytes),
            open_since: None,
            ready: VecDeque::new(),
            budget: Budget::new(
                self.settings.shard_records_per_sec,
                self.settings.shard_bytes_per_sec,
                now,
            ),
        }
    }

    fn is_empty(&self) -> bool {
        self.inflight.is_empty()
            && self
                .shards
                .iter()
                .all(|s| s.open.is_empty() && s.ready.is_empty())
            && self.shared.spool.as_ref().is_none_or(|s| s.pending() == 0)
    }

    fn intake_spool(&mut self, memory_empty: bool, now: Instant) {
        let Some(spool) = self.shared.spool.clone() else {
            return;
        };
        if !memory_empty
            || self.shared.kinesis_down.load(Ordering::Acquire)
            || self.spool_held >= SPOOL_WINDOW
            || spool.pending() == 0
        {
            return;
        }
        match spool.read_batch(2_000) {
            Ok(batch) => {
                for (seg, ev) in batch {
                    self.spool_held += 1;
                    self.place(
                        Unit {
                            ev,
                            origin: Some(seg),
                        },
                        now,
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the spool"),
        }
    }

    /// Puts an event into its shard's open group; seals the group when full.
    fn place(&mut self, unit: Unit, now: Instant) {
        let idx = self.map.index_for(&unit.ev.partition_key);
        if self.settings.aggregate {
            let rec = UserRecord {
                partition_key: unit.ev.partition_key.clone(),
                explicit_hash_key: None,
                data: unit.ev.data.clone(),
            };
            let shard = &mut self.shards[idx];
            if let Err(rec) = shard.aggregator.push(rec) {
                self.seal(idx, now);
                let shard = &mut self.shards[idx];
                if shard.aggregator.push(rec).is_err() {
                    tracing::error!("an event does not fit an empty aggregate; this is a bug");
                }
            }
        }
        let shard = &mut self.shards[idx];
        shard.open_since.get_or_insert(now);
        shard.open.push(unit);
        if !self.settings.aggregate && shard.open.len() >= MAX_RECORDS_PER_CALL {
            self.seal(idx, now);
        }
    }

    /// Turns a shard's open group into ready Kinesis records.
    fn seal(&mut self, idx: usize, now: Instant) {
        let ehk = self.map.shard(idx).explicit_hash_key();
        let shard = &mut self.shards[idx];
        if shard.open.is_empty() {
            return;
        }
        let units = std::mem::take(&mut shard.open);
        shard.open_since = None;
        if self.settings.aggregate {
            let data = shard.aggregator.finish();
            metrics::histogram!(metric::EVENTS_PER_RECORD).record(units.len() as f64);
            shard.ready.push_back(KRecord {
                partition_key: units[0].ev.partition_key.clone(),
                explicit_hash_key: Some(ehk),
                data,
                units,
                shard: idx,
                attempts: 0,
                not_before: now,
                ready_since: now,
            });
        } else {
            for unit in units {
                shard.ready.push_back(KRecord {
                    partition_key: unit.ev.partition_key.clone(),
                    explicit_hash_key: None,
                    data: unit.ev.data.clone(),
                    units: vec![unit],
                    shard: idx,
                    attempts: 0,
                    not_before: now,
                    ready_since: now,
                });
            }
        }
    }

    fn seal_due(&mut self, closed: bool, now: Instant) {
        for idx in 0..self.shards.len() {
            let due = self.shards[idx].open_since.is_some_and(|t| {
                closed || now.saturating_duration_since(t) >= self.settings.linger
            });
            if due {
                self.seal(idx, now);
            }
        }
    }

    /// Sends calls while there is room in flight and something worth sending.
    fn dispatch(&mut self, closed: bool, now: Instant) {
        while self.calls.len() < self.settings.max_inflight {
            // Wait for a full call unless something has waited its linger.
            let sendable: usize = self
                .shards
                .iter()
                .map(|s| s.ready.iter().filter(|r| r.not_before <= now).count())
                .sum();
            if sendable == 0 {
                return;
            }
            let waited = self.shards.iter().any(|s| {
                s.ready.iter().any(|r| {
                    r.not_before <= now
                        && now.saturating_duration_since(r.ready_since) >= self.settings.linger
                })
            });
            if sendable < MAX_RECORDS_PER_CALL
                && !waited
                && !closed
                && self.settings.linger > Duration::ZERO
            {
                return;
            }
            let call = self.build_call(now);
            if call.is_empty() {
                return;
            }
            self.spawn_call(call);
        }
    }

    fn build_call(&mut self, now: Instant) -> Vec<KRecord> {
        let mut call = Vec::new();
        let mut bytes = 0;
        let n = self.shards.len();
        self.rotate = (self.rotate + 1) % n.max(1);
        for k in 0..n {
            let idx = (self.rotate + k) % n;
            let shard = &mut self.shards[idx];
            let mut i = 0;
            while i < shard.ready.len() && call.len() < MAX_RECORDS_PER_CALL {
                let r = &shard.ready[i];
                if r.not_before > now {
                    i += 1;
                    continue;
                }
                if bytes + r.size() > MAX_BYTES_PER_CALL || !shard.budget.try_take(r.size(), now) {
                    break;
                }
                bytes += r.size();
                if let Some(r) = shard.ready.remove(i) {
                    call.push(r);
                }
            }
        }
        call
    }

    fn spawn_call(&mut self, call: Vec<KRecord>) {
        let entries: Vec<PutRecordsRequestEntry> = call
            .iter()
            .filter_map(|r| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(r.data.to_vec()))
                    .partition_key(&r.partition_key)
                    .set_explicit_hash_key(r.explicit_hash_key.clone())
                    .build()
                    .ok()
            })
            .collect();
        let id = self.next_call;
        self.next_call += 1;
        self.inflight.insert(id, call);
        let client = self.client.clone();
        let stream = self.settings.stream.clone();
        self.calls.spawn(async move {
            let started = std::time::Instant::now();
            let result = client
                .put_records()
                .stream_name(stream)
                .set_records(Some(entries))
                .send()
                .await
                .map_err(|e| aws_sdk_kinesis::error::DisplayErrorContext(&e).to_string());
            metrics::histogram!(metric::KINESIS_CALL_DURATION)
                .record(started.elapsed().as_secs_f64());
            CallOutcome { id, result }
        });
    }

    fn retry_later(&mut self, mut r: KRecord, now: Instant) {
        r.attempts = r.attempts.saturating_add(1);
        let ceiling = RETRY_BASE
            .saturating_mul(1u32 << r.attempts.min(16))
            .min(RETRY_CAP);
        r.not_before = now + rand::rng().random_range(Duration::ZERO..=ceiling);
        r.ready_since = now;
        let idx = r.shard.min(self.shards.len() - 1);
        self.shards[idx].ready.push_front(r);
    }

    fn delivered(&mut self, r: KRecord) {
        let mut acks: Vec<(SegmentId, u64)> = Vec::new();
        let events = r.units.len() as u64;
        for u in r.units {
            match u.origin {
                None => self.shared.release(u.ev.size()),
                Some(seg) => {
                    self.spool_held = self.spool_held.saturating_sub(1);
                    match acks.last_mut() {
                        Some((s, n)) if *s == seg => *n += 1,
                        _ => acks.push((seg, 1)),
                    }
                }
            }
        }
        if let Some(spool) = &self.shared.spool {
            for (seg, n) in acks {
                spool.ack(seg, n);
            }
        }
        self.report.delivered += events;
        metrics::counter!(metric::KINESIS_RECORDS).increment(1);
        metrics::counter!(metric::EVENTS_DELIVERED).increment(events);
    }

    fn complete(&mut self, done: CallOutcome, now: Instant) {
        let Some(records) = self.inflight.remove(&done.id) else {
            return;
        };
        match done.result {
            Ok(out) => {
                self.failures = 0;
                self.shared.kinesis_down.store(false, Ordering::Release);
                let failed = out.failed_record_count.unwrap_or(0);
                let result = if failed == 0 { "ok" } else { "partial" };
                metrics::counter!(metric::KINESIS_CALLS, "result" => result).increment(1);
                let mut throttled_shards = Vec::new();
                for (r, res) in records.into_iter().zip(out.records) {
                    match res.error_code.as_deref() {
                        None => {
                            let expected = &self.map.shard(r.shard.min(self.map.len() - 1)).id;
                            if res.shard_id.as_deref().is_some_and(|s| s != expected) {
                                self.need_refresh = true;
                            }
                            self.shards[r.shard].budget.succeeded();
                            self.delivered(r);
                        }
                        Some(code) => {
                            let cause = if code == "ProvisionedThroughputExceededException" {
                                throttled_shards.push(r.shard);
                                "throttled"
                            } else {
                                "internal"
                            };
                            metrics::counter!(metric::KINESIS_RETRIES, "cause" => cause)
                                .increment(1);
                            self.retry_later(r, now);
                        }
                    }
                }
                for idx in throttled_shards {
                    self.shards[idx].budget.throttled(now);
                }
            }
            Err(e) => {
                self.failures += 1;
                metrics::counter!(metric::KINESIS_CALLS, "result" => "error").increment(1);
                metrics::counter!(metric::KINESIS_RETRIES, "cause" => "call_failed")
                    .increment(records.len() as u64);
                if self.failures == 1 || self.failures.is_power_of_two() {
                    tracing::warn!(error = %e, records = records.len(), failures = self.failures, "PutRecords failed; retrying");
                }
                if self.failures >= FAILURES_BEFORE_DOWN
                    && !self.shared.kinesis_down.swap(true, Ordering::AcqRel)
                {
                    tracing::warn!("Kinesis unreachable; new events go to the spool");
                }
                if e.contains("ResourceNotFound") || e.contains("InvalidArgument") {
                    self.need_refresh = true;
                }
                for r in records {
                    self.retry_later(r, now);
                }
            }
        }
    }

    async fn refresh_map(&mut self) {
        self.need_refresh = false;
        self.refresh_at = Instant::now() + MAP_REFRESH;
        let map = match tokio::time::timeout(
            Duration::from_secs(5),
            ShardMap::fetch(&self.client, &self.settings.stream),
        )
        .await
        {
            Ok(Ok(map)) => map,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot refresh the shard map");
                return;
            }
            Err(_) => return,
        };
        if map == self.map {
            return;
        }
        tracing::info!(shards = map.len(), "stream resharded; regrouping events");
        let now = Instant::now();
        let old = std::mem::take(&mut self.shards);
        self.map = map;
        self.shards = (0..self.map.len()).map(|_| self.new_shard(now)).collect();
        for s in old {
            for u in s.open {
                self.place(u, now);
            }
            // Sealed aggregates keep their events together; they go to the
            // shard that now owns their first event.
            for mut r in s.ready {
                r.shard = self.map.index_for(&r.partition_key);
                if let Some(ehk) = &mut r.explicit_hash_key {
                    *ehk = self.map.shard(r.shard).explicit_hash_key();
                }
                self.shards[r.shard].ready.push_back(r);
            }
        }
        for records in self.inflight.values_mut() {
            for r in records {
                r.shard = self.map.index_for(&r.partition_key);
                if let Some(ehk) = &mut r.explicit_hash_key {
                    *ehk = self.map.shard(r.shard).explicit_hash_key();
                }
            }
        }
    }

    fn next_wake(&self, closed: bool, now: Instant) -> Instant {
        let mut wake = self.refresh_at;
        for s in &self.shards {
            if let Some(t) = s.open_since {
                wake = wake.min(t + self.settings.linger);
            }
            for r in &s.ready {
                let t = if r.not_before > now {
                    r.not_before
                } else if s.budget.paused_until > now || s.budget.records < 1.0 {
                    s.budget.next_chance(now)
                } else {
                    (r.ready_since + self.settings.linger).max(now + Duration::from_millis(1))
                };
                wake = wake.min(t);
            }
        }
        if closed || self.shared.spool.as_ref().is_some_and(|s| s.pending() > 0) {
            wake = wake.min(now + Duration::from_millis(50));
        }
        wake.max(now)
    }

    /// The deadline passed: stop sending; keep what is left on disk.
    async fn abandon(mut self, rx: &mut mpsc::Receiver<Outgoing>) -> DeliveryReport {
        self.calls.abort_all();
        while self.calls.join_next().await.is_some() {}
        let mut units: Vec<Unit> = Vec::new();
        for (_, records) in self.inflight.drain() {
            units.extend(records.into_iter().flat_map(|r| r.units));
        }
        for s in std::mem::take(&mut self.shards) {
            units.extend(s.open);
            units.extend(s.ready.into_iter().flat_map(|r| r.units));
        }
        while let Ok(ev) = rx.try_recv() {
            units.push(Unit { ev, origin: None });
        }
        let from_spool = self.shared.spool.as_ref().map_or(0, |s| s.pending());
        let mut report = self.report;
        spool_or_lose(&self.shared, units, &mut report);
        // Spooled before the deadline and still unsent: already on disk.
        report.spooled += from_spool;
        report
    }
}
