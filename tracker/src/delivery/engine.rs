//! The engine loop: takes events from the inbox (and, once Kinesis answers,
//! from the disk spool), hands them to the batcher, sends ready records in
//! PutRecords calls of up to 500 records and 5 MiB, a bounded number at a
//! time, and settles each call: delivered records release their memory or
//! acknowledge their spool entries; failed entries wait their backoff in a
//! timer heap and go again. Every step is O(1) or O(log n) per record;
//! nothing walks what is pending.

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use tokio::task::{Id as TaskId, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::batcher::{Batcher, KRecord, MAX_RECORDS_PER_CALL, Unit};
use super::budget::Budget;
use super::inbox::Inbox;
use super::put::{CallError, Entry, EntryResult, RecordStream};
use super::retry::{self, CallFailure, EntryFailure};
use super::{DeliveryReport, DeliverySettings};
use crate::health::{BEAT_EVERY, Beat, Health};
use crate::metric;
use crate::outgoing::Outgoing;
use crate::shard_map::ShardMap;
use crate::shipper::Shared;
use crate::spool::SegmentId;

/// Kinesis's bound on the bytes of one PutRecords call.
pub const MAX_BYTES_PER_CALL: usize = 5 * 1024 * 1024;
const FAILURES_BEFORE_DOWN: u32 = 3;
const MAP_REFRESH: Duration = Duration::from_secs(60);
/// Most spooled events held in memory at once while replaying.
const SPOOL_WINDOW: u64 = 20_000;
/// Spooled events held at once while Kinesis is not keeping up: a call's
/// worth, which probes whether it has recovered (memory holds nothing old
/// enough to do so: it moved to the spool).
const PROBE_EVENTS: u64 = 500;
/// How often the engine looks for events memory has held past
/// [`DeliverySettings::memory_max_age`].
const AGE_SWEEP: Duration = Duration::from_millis(100);
/// How often the engine looks at the spool while it holds events.
const SPOOL_TICK: Duration = Duration::from_millis(50);
/// A call goes out once it would carry about this many bytes of records,
/// or when its oldest record is due: under load, a few large calls instead
/// of one per sealed aggregate (each call costs the SDK's fixed work of
/// building, signing and parsing).
const CALL_FILL_BYTES: usize = 1024 * 1024;

type CallResult = Result<Vec<EntryResult>, CallError>;

/// Metric handles, registered once.
struct Meters {
    records: Counter,
    delivered: Counter,
    per_record: Histogram,
    calls_ok: Counter,
    calls_partial: Counter,
    calls_error: Counter,
    retry_throttled: Counter,
    retry_internal: Counter,
    retry_call_failed: Counter,
    call_duration: Histogram,
    queue_events: Gauge,
    queue_bytes: Gauge,
    spooled_aged: Counter,
    behind: Gauge,
}

impl Meters {
    fn new() -> Self {
        Self {
            records: metrics::counter!(metric::KINESIS_RECORDS),
            delivered: metrics::counter!(metric::EVENTS_DELIVERED),
            per_record: metrics::histogram!(metric::EVENTS_PER_RECORD),
            calls_ok: metrics::counter!(metric::KINESIS_CALLS, "result" => "ok"),
            calls_partial: metrics::counter!(metric::KINESIS_CALLS, "result" => "partial"),
            calls_error: metrics::counter!(metric::KINESIS_CALLS, "result" => "error"),
            retry_throttled: metrics::counter!(metric::KINESIS_RETRIES, "cause" => "throttled"),
            retry_internal: metrics::counter!(metric::KINESIS_RETRIES, "cause" => "internal"),
            retry_call_failed: metrics::counter!(metric::KINESIS_RETRIES, "cause" => "call_failed"),
            call_duration: metrics::histogram!(metric::KINESIS_CALL_DURATION),
            queue_events: metrics::gauge!(metric::QUEUE_EVENTS),
            queue_bytes: metrics::gauge!(metric::QUEUE_BYTES),
            spooled_aged: metrics::counter!(metric::EVENTS_SPOOLED, "cause" => "aged"),
            behind: metrics::gauge!(metric::KINESIS_BEHIND),
        }
    }
}

/// A record waiting for its time (backoff, or a shard's budget).
struct Delayed {
    at: Instant,
    seq: u64,
    rec: KRecord,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The consuming side: batches, aggregates, sends, retries, spools.
pub struct Engine {
    pub(super) inbox: Arc<Inbox>,
    pub(super) shared: Arc<Shared>,
    pub(super) settings: DeliverySettings,
    /// Reported to every time round the loop (liveness), when set.
    pub(super) beat: Option<Arc<Beat>>,
    /// Told once the engine has the stream's shards (readiness), when set.
    pub(super) health: Option<Arc<Health>>,
}

struct Run<S: RecordStream> {
    stream: Arc<S>,
    settings: DeliverySettings,
    shared: Arc<Shared>,
    inbox: Arc<Inbox>,
    map: ShardMap,
    budgets: Vec<Budget>,
    batcher: Batcher,
    ready: VecDeque<KRecord>,
    delayed: BinaryHeap<Reverse<Delayed>>,
    seq: u64,
    inflight: HashMap<TaskId, Vec<KRecord>>,
    calls: JoinSet<CallResult>,
    failures: u32,
    spool_held: u64,
    need_refresh: bool,
    refresh_at: Instant,
    report: DeliveryReport,
    meters: Meters,
    intake: Vec<Outgoing>,
    beat: Option<Arc<Beat>>,
    next_sweep: Instant,
}

impl Engine {
    /// Runs until the inbox is closed and everything it held, and everything
    /// in the spool, is delivered, or until `give_up`.
    pub async fn run<S: RecordStream>(
        self,
        stream: S,
        give_up: CancellationToken,
    ) -> DeliveryReport {
        let stream = Arc::new(stream);
        let mut pause = Duration::from_millis(100);
        let mut attempts = 0u32;
        let map = loop {
            if let Some(beat) = &self.beat {
                beat.beat();
            }
            match stream.shard_map().await {
                Ok(map) => break map,
                Err(e) => {
                    // One line at first, then one every ~30 s while it lasts.
                    if attempts.is_multiple_of(8) {
                        tracing::warn!(stream = self.settings.stream, error = %e, "cannot list the stream's shards yet; not ready");
                    }
                    attempts += 1;
                    tokio::select! {
                        _ = give_up.cancelled() => return self.abandon_inbox(),
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        };
        tracing::info!(
            stream = self.settings.stream,
            shards = map.len(),
            aggregate = self.settings.aggregate,
            "delivery engine started"
        );
        self.shared.kinesis_down.store(false, Ordering::Release);
        // The engine's gauges exist, at their first values, before anyone
        // is told it runs.
        let meters = Meters::new();
        meters.behind.set(0.0);
        meters.queue_events.set(0.0);
        meters
            .queue_bytes
            .set(self.shared.mem_bytes.load(Ordering::Acquire) as f64);
        // Ready only now: before this, every event would go to the spool,
        // and while the spool holds any, new events follow them there.
        if let Some(health) = &self.health {
            health.set_stream_ok();
        }
        let now = Instant::now();
        let mut run = Run {
            stream,
            batcher: Batcher::new(
                self.settings.aggregate,
                self.settings.max_aggregate_bytes,
                self.settings.linger,
            ),
            budgets: Vec::new(),
            settings: self.settings,
            shared: self.shared,
            inbox: self.inbox,
            map,
            ready: VecDeque::new(),
            delayed: BinaryHeap::new(),
            seq: 0,
            inflight: HashMap::new(),
            calls: JoinSet::new(),
            failures: 0,
            spool_held: 0,
            need_refresh: false,
            refresh_at: now + MAP_REFRESH,
            report: DeliveryReport::default(),
            meters,
            intake: Vec::new(),
            beat: self.beat,
            next_sweep: now + AGE_SWEEP,
        };
        run.budgets = run.new_budgets(now);
        run.main_loop(give_up).await
    }

    /// Gave up before any shard map: spool (or count lost) what is queued.
    fn abandon_inbox(self) -> DeliveryReport {
        let mut report = DeliveryReport::default();
        let mut events = Vec::new();
        self.inbox.take(&mut events);
        let units = events
            .into_iter()
            .map(|ev| Unit { ev, origin: None })
            .collect();
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

impl<S: RecordStream> Run<S> {
    async fn main_loop(mut self, give_up: CancellationToken) -> DeliveryReport {
        let mut closed = false;
        let mut next_gauges = Instant::now();
        loop {
            if let Some(beat) = &self.beat {
                beat.beat();
            }
            let now = Instant::now();
            let memory_empty = self.take_inbox(&mut closed, now);
            self.intake_spool(memory_empty, now);
            if self.need_refresh || now >= self.refresh_at {
                self.refresh_map().await;
            }
            let now = Instant::now();
            self.batcher
                .seal_if_due(closed, now, &self.map, &self.budgets, &mut self.ready);
            self.dispatch(closed, now);
            if now >= self.next_sweep {
                self.next_sweep = now + AGE_SWEEP;
                self.spool_aged(now);
            }
            if now >= next_gauges {
                next_gauges = now + Duration::from_millis(250);
                let behind = self.shared.kinesis_down.load(Ordering::Acquire);
                self.meters.behind.set(if behind { 1.0 } else { 0.0 });
                self.meters.queue_events.set(self.held_events() as f64);
                self.meters
                    .queue_bytes
                    .set(self.shared.mem_bytes.load(Ordering::Acquire) as f64);
            }
            if closed && self.is_empty() {
                break;
            }
            if !closed && (self.batcher.is_empty() || self.settings.linger.is_zero()) {
                // Nothing waits for a linger: the next event should wake us.
                self.inbox.wake_on_next();
                if !self.inbox.is_empty() {
                    continue;
                }
            }
            let wake = self.next_wake(closed, now);
            tokio::select! {
                _ = give_up.cancelled() => return self.abandon().await,
                Some(done) = self.calls.join_next_with_id(), if !self.calls.is_empty() => {
                    self.complete(done, Instant::now());
                }
                _ = self.inbox.woken(), if !closed => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
        if let Some(spool) = &self.shared.spool {
            spool.reset_if_drained();
        }
        self.meters.queue_events.set(0.0);
        self.meters.queue_bytes.set(0.0);
        self.report
    }

    fn new_budgets(&self, now: Instant) -> Vec<Budget> {
        (0..self.map.len())
            .map(|_| {
                Budget::new(
                    self.settings.shard_records_per_sec,
                    self.settings.shard_bytes_per_sec,
                    now,
                )
            })
            .collect()
    }

    /// Moves what handlers queued into the batcher. True if there was nothing.
    fn take_inbox(&mut self, closed: &mut bool, now: Instant) -> bool {
        let mut intake = std::mem::take(&mut self.intake);
        *closed |= self.inbox.take(&mut intake);
        let empty = intake.is_empty();
        for ev in intake.drain(..) {
            self.batcher.place(
                Unit { ev, origin: None },
                now,
                &self.map,
                &self.budgets,
                &mut self.ready,
            );
        }
        self.intake = intake;
        empty
    }

    fn held_events(&self) -> usize {
        self.inbox.len()
            + self.ready.iter().map(|r| r.units.len()).sum::<usize>()
            + self
                .delayed
                .iter()
                .map(|d| d.0.rec.units.len())
                .sum::<usize>()
    }

    fn is_empty(&self) -> bool {
        self.inflight.is_empty()
            && self.batcher.is_empty()
            && self.ready.is_empty()
            && self.delayed.is_empty()
            && self.inbox.is_empty()
            && self
                .shared
                .spool
                .as_ref()
                .is_none_or(|s| s.pending() == 0 && s.queued() == 0)
    }

    fn intake_spool(&mut self, memory_empty: bool, now: Instant) {
        let Some(spool) = self.shared.spool.clone() else {
            return;
        };
        let window = if self.shared.kinesis_down.load(Ordering::Acquire) {
            PROBE_EVENTS
        } else {
            SPOOL_WINDOW
        };
        if !memory_empty || self.spool_held >= window || spool.pending() == 0 {
            return;
        }
        match spool.read_batch((window - self.spool_held).min(2_000) as usize) {
            Ok(batch) => {
                for (seg, ev) in batch {
                    self.spool_held += 1;
                    self.batcher.place(
                        Unit {
                            ev,
                            origin: Some(seg),
                        },
                        now,
                        &self.map,
                        &self.budgets,
                        &mut self.ready,
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the spool"),
        }
    }

    fn delay(&mut self, rec: KRecord, at: Instant) {
        self.seq += 1;
        self.delayed.push(Reverse(Delayed {
            at,
            seq: self.seq,
            rec,
        }));
    }

    /// Records that fill a call (about [`CALL_FILL_BYTES`]).
    fn fill_records(&self) -> usize {
        if self.settings.aggregate {
            (CALL_FILL_BYTES / self.settings.max_aggregate_bytes.max(1))
                .clamp(1, MAX_RECORDS_PER_CALL)
        } else {
            MAX_RECORDS_PER_CALL
        }
    }

    /// Whether the ready records make a call now: enough to fill one, the
    /// oldest is due, or the engine is draining.
    fn call_is_due(&self, closed: bool, now: Instant) -> bool {
        closed
            || self.ready.len() >= self.fill_records()
            || self.ready.front().is_some_and(|r| r.due <= now)
    }

    /// Sends calls while there is room in flight and a call's worth ready.
    fn dispatch(&mut self, closed: bool, now: Instant) {
        while self.delayed.peek().is_some_and(|d| d.0.at <= now) {
            if let Some(Reverse(d)) = self.delayed.pop() {
                self.ready.push_front(d.rec);
            }
        }
        while self.calls.len() < self.settings.max_inflight
            && !self.ready.is_empty()
            && self.call_is_due(closed, now)
        {
            let mut call = Vec::new();
            let mut bytes = 0;
            // Each ready record is looked at once per call at most.
            for _ in 0..self.ready.len() {
                if call.len() >= MAX_RECORDS_PER_CALL {
                    break;
                }
                let Some(r) = self.ready.pop_front() else {
                    break;
                };
                let size = r.size();
                if bytes + size > MAX_BYTES_PER_CALL {
                    self.ready.push_front(r);
                    break;
                }
                let shard = self.map.index_for_hash(r.hash);
                if !self.budgets[shard].try_take(size, now) {
                    let at = self.budgets[shard].next_chance(now);
                    self.delay(r, at);
                    continue;
                }
                bytes += size;
                call.push(r);
            }
            if call.is_empty() {
                return;
            }
            self.spawn_call(call);
        }
    }

    fn spawn_call(&mut self, call: Vec<KRecord>) {
        let entries: Vec<Entry> = call
            .iter()
            .map(|r| Entry {
                data: r.data.clone(),
                partition_key: r.partition_key.clone(),
                explicit_hash_key: r.explicit_hash_key.clone(),
            })
            .collect();
        let stream = self.stream.clone();
        let duration = self.meters.call_duration.clone();
        let handle = self.calls.spawn(async move {
            let started = std::time::Instant::now();
            let result = stream.put_records(entries).await;
            duration.record(started.elapsed().as_secs_f64());
            result
        });
        self.inflight.insert(handle.id(), call);
    }

    fn retry_later(&mut self, mut r: KRecord, now: Instant) {
        r.attempts = r.attempts.saturating_add(1);
        let at = now + retry::RESEND.delay(r.attempts);
        self.delay(r, at);
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
        if let Some(spool) = &self.shared.spool
            && !acks.is_empty()
        {
            for (seg, n) in acks {
                spool.ack(seg, n);
            }
            // Everything spooled is delivered: give the active segment's
            // bytes back now, not at the next start.
            if spool.pending() == 0 {
                spool.reset_if_drained();
            }
        }
        self.report.delivered += events;
        self.meters.records.increment(1);
        self.meters.per_record.record(events as f64);
        self.meters.delivered.increment(events);
    }

    fn complete(
        &mut self,
        done: Result<(TaskId, CallResult), tokio::task::JoinError>,
        now: Instant,
    ) {
        let (id, result) = match done {
            Ok((id, result)) => (id, result),
            Err(e) => (
                e.id(),
                Err(CallError {
                    failure: CallFailure::Transient,
                    message: format!("PutRecords task failed: {e}"),
                }),
            ),
        };
        let Some(records) = self.inflight.remove(&id) else {
            return;
        };
        let result = match result {
            Ok(entries) if entries.len() != records.len() => Err(CallError {
                failure: CallFailure::Transient,
                message: format!(
                    "PutRecords answered {} entries for {} records",
                    entries.len(),
                    records.len()
                ),
            }),
            other => other,
        };
        match result {
            Ok(entries) => self.settle(records, entries, now),
            Err(e) => self.call_failed(records, e, now),
        }
    }

    fn settle(&mut self, records: Vec<KRecord>, entries: Vec<EntryResult>, now: Instant) {
        if entries.iter().any(|e| e.error_code.is_none()) {
            self.failures = 0;
            self.shared.kinesis_down.store(false, Ordering::Release);
        } else {
            // Every entry refused (throttled): as far as keeping up goes,
            // a call that delivered nothing is a failed call.
            self.fell_behind("every entry of a PutRecords call was refused");
        }
        let failed = entries.iter().any(|e| e.error_code.is_some());
        if failed {
            self.meters.calls_partial.increment(1);
        } else {
            self.meters.calls_ok.increment(1);
        }
        for (r, res) in records.into_iter().zip(entries) {
            let shard = self.map.index_for_hash(r.hash);
            match res.error_code.as_deref() {
                None => {
                    let expected = &self.map.shard(shard).id;
                    if res.shard_id.as_deref().is_some_and(|s| s != expected) {
                        self.need_refresh = true;
                    }
                    self.budgets[shard].succeeded();
                    self.delivered(r);
                }
                Some(code) => {
                    match EntryFailure::of(code) {
                        EntryFailure::Throttled => {
                            self.meters.retry_throttled.increment(1);
                            self.budgets[shard].throttled(now);
                        }
                        EntryFailure::Internal => self.meters.retry_internal.increment(1),
                    }
                    self.retry_later(r, now);
                }
            }
        }
    }

    /// Counts a call that delivered nothing; after a few in a row, new
    /// events go to the spool before they are answered.
    fn fell_behind(&mut self, why: &str) {
        self.failures += 1;
        if self.failures >= FAILURES_BEFORE_DOWN {
            self.mark_behind(why);
        }
    }

    /// Kinesis is not keeping up: new events go to the spool before they
    /// are answered, until a call delivers again.
    fn mark_behind(&self, why: &str) {
        if !self.shared.kinesis_down.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                why,
                "Kinesis is not keeping up (unreachable or throttling); new events go to the spool"
            );
        }
    }

    /// Moves events memory has held longer than the age bound while
    /// Kinesis was not taking them (records waiting for a retry or for a
    /// throttled shard's budget) to the spool, so that a crash cannot lose
    /// them. Spooled events in the same records are packed again. Records
    /// that only wait for the engine (a call slot, CPU under saturation)
    /// stay: spooling them would cost the CPU that is short, and they are
    /// bounded by the memory queue's bytes. Records in a call in flight are
    /// left alone; the call settles within its attempt timeout.
    fn spool_aged(&mut self, now: Instant) {
        let Some(spool) = self.shared.spool.clone() else {
            return;
        };
        let max_age = self.settings.memory_max_age;
        let aged = |r: &KRecord| {
            now.saturating_duration_since(r.since) >= max_age
                && r.units.iter().any(|u| u.origin.is_none())
        };
        if !self.delayed.iter().any(|d| aged(&d.0.rec)) {
            return;
        }
        let mut old = Vec::new();
        for d in std::mem::take(&mut self.delayed).into_vec() {
            if aged(&d.0.rec) {
                old.push(d.0.rec);
            } else {
                self.delayed.push(d);
            }
        }
        let (memory, mut again): (Vec<Unit>, Vec<Unit>) = old
            .into_iter()
            .flat_map(|r| r.units)
            .partition(|u| u.origin.is_none());
        let events: Vec<Outgoing> = memory.into_iter().map(|u| u.ev).collect();
        match spool.append_all(&events) {
            Ok(()) => {
                for ev in &events {
                    self.shared.release(ev.size());
                }
                self.meters.spooled_aged.increment(events.len() as u64);
                self.mark_behind("events were not delivered within TRACKER_MEMORY_MAX_AGE_MS");
            }
            Err(e) => {
                // Kept in memory (and tried again at the next sweep).
                tracing::warn!(error = %e, events = events.len(), "cannot move old events to the spool");
                again.extend(events.into_iter().map(|ev| Unit { ev, origin: None }));
            }
        }
        for unit in again {
            self.batcher
                .place(unit, now, &self.map, &self.budgets, &mut self.ready);
        }
    }

    fn call_failed(&mut self, records: Vec<KRecord>, e: CallError, now: Instant) {
        self.fell_behind("PutRecords calls fail");
        self.meters.calls_error.increment(1);
        self.meters
            .retry_call_failed
            .increment(records.len() as u64);
        if self.failures == 1 || self.failures.is_power_of_two() {
            tracing::warn!(error = %e.message, records = records.len(), failures = self.failures, "PutRecords failed; retrying");
        }
        if e.failure == CallFailure::StreamChanged {
            self.need_refresh = true;
        }
        for r in records {
            self.retry_later(r, now);
        }
    }

    async fn refresh_map(&mut self) {
        self.need_refresh = false;
        self.refresh_at = Instant::now() + MAP_REFRESH;
        let map = match tokio::time::timeout(Duration::from_secs(5), self.stream.shard_map()).await
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
        tracing::info!(
            shards = map.len(),
            "stream resharded; budgets follow the new shards"
        );
        // Records keep their routing hash (an aggregate's explicit hash key
        // lies in exactly one child); their budget is that child's.
        self.map = map;
        self.budgets = self.new_budgets(Instant::now());
    }

    fn next_wake(&self, closed: bool, now: Instant) -> Instant {
        // Round the loop at least this often, to report in.
        let mut wake = self.refresh_at.min(now + BEAT_EVERY);
        if let Some(t) = self.batcher.due() {
            wake = wake.min(t);
        }
        if let Some(d) = self.delayed.peek() {
            wake = wake.min(d.0.at);
        }
        // (With every call slot taken, a finished call wakes the loop.)
        if self.calls.len() < self.settings.max_inflight
            && let Some(r) = self.ready.front()
        {
            wake = wake.min(r.due);
        }
        let spool_waiting = self.shared.spool.as_ref().is_some_and(|s| s.pending() > 0);
        // Records waiting for Kinesis may come of age: look again then.
        if self.shared.spool.is_some() && !self.delayed.is_empty() {
            wake = wake.min(self.next_sweep);
        }
        if closed || spool_waiting {
            wake = wake.min(now + SPOOL_TICK);
        }
        wake.max(now)
    }

    /// The deadline passed: stop sending; keep what is left on disk.
    async fn abandon(mut self) -> DeliveryReport {
        self.calls.abort_all();
        while self.calls.join_next().await.is_some() {}
        let mut units: Vec<Unit> = Vec::new();
        for (_, records) in self.inflight.drain() {
            units.extend(records.into_iter().flat_map(|r| r.units));
        }
        units.extend(self.batcher.take_open());
        units.extend(self.ready.drain(..).flat_map(|r| r.units));
        units.extend(self.delayed.drain().flat_map(|d| d.0.rec.units));
        let mut rest = Vec::new();
        self.inbox.take(&mut rest);
        units.extend(rest.into_iter().map(|ev| Unit { ev, origin: None }));
        let from_spool = self.shared.spool.as_ref().map_or(0, |s| s.pending());
        let mut report = self.report;
        spool_or_lose(&self.shared, units, &mut report);
        // Spooled before the deadline and still unsent: already on disk.
        report.spooled += from_spool;
        report
    }
}
