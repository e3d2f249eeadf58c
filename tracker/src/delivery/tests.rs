//! Engine logic against a scripted stream, on tokio's paused clock: partial
//! failures, throttling, budgets, linger, answers that do not add up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adtrack_proto::kpl::{Deaggregated, deaggregate};
use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::outgoing::Outgoing;
use crate::shard_map::ShardMap;
use crate::shipper::Accepted;

type Script = Box<dyn FnMut(usize, &[Entry]) -> Result<Vec<EntryResult>, CallError> + Send>;

/// A stream that records every call and answers as its script says.
struct Scripted {
    map: ShardMap,
    calls: Mutex<Vec<(Instant, Vec<Entry>)>>,
    script: Mutex<Script>,
}

impl Scripted {
    fn new(shards: u128, script: Script) -> Arc<Self> {
        Arc::new(Self {
            map: ShardMap::even(shards),
            calls: Mutex::new(Vec::new()),
            script: Mutex::new(script),
        })
    }

    /// Event ids (each test event's data starts with its id) in the
    /// entries that were stored, with how often.
    fn stored(&self) -> HashMap<String, usize> {
        let calls = self.calls.lock().expect("lock");
        let mut out = HashMap::new();
        for (_, entries) in calls.iter() {
            for e in entries {
                // The script marked refused entries by emptying their key.
                if e.partition_key.is_empty() {
                    continue;
                }
                match deaggregate(&e.data).expect("consistent") {
                    Deaggregated::Records(rs) => {
                        for r in rs {
                            *out.entry(id_of(&r.data)).or_default() += 1;
                        }
                    }
                    Deaggregated::Plain => *out.entry(id_of(&e.data)).or_default() += 1,
                }
            }
        }
        out
    }
}

impl RecordStream for Arc<Scripted> {
    async fn put_records(&self, entries: Vec<Entry>) -> Result<Vec<EntryResult>, CallError> {
        let mut calls = self.calls.lock().expect("lock");
        let n = calls.len();
        let answer = (self.script.lock().expect("lock"))(n, &entries);
        let mut kept = entries;
        if let Ok(results) = &answer {
            for (e, r) in kept.iter_mut().zip(results) {
                if r.error_code.is_some() {
                    e.partition_key.clear();
                }
            }
            if results.len() != kept.len() {
                kept.iter_mut().for_each(|e| e.partition_key.clear());
            }
        } else {
            kept.iter_mut().for_each(|e| e.partition_key.clear());
        }
        calls.push((Instant::now(), kept));
        answer
    }

    async fn shard_map(&self) -> anyhow::Result<ShardMap> {
        Ok(self.map.clone())
    }
}

fn settings(linger_ms: u64) -> DeliverySettings {
    DeliverySettings {
        stream: "test".into(),
        queue_events: 100_000,
        queue_bytes: 1 << 30,
        linger: Duration::from_millis(linger_ms),
        max_inflight: 4,
        aggregate: true,
        max_aggregate_bytes: 51_200,
        shard_records_per_sec: 1_000,
        shard_bytes_per_sec: 1 << 20,
        memory_max_age: Duration::from_secs(2),
    }
}

/// A test event: its data is its id, padded with `e` to 200-299 bytes.
fn event(i: usize) -> Outgoing {
    let id = format!("0190-{i:032}");
    let mut data = id.clone().into_bytes();
    data.resize(200 + i % 100, b'e');
    Outgoing {
        partition_key: id,
        data: Bytes::from(data),
    }
}

/// The id a test event's data starts with.
fn id_of(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == b'e').unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// Queues an event and waits until it is stored.
async fn store(sink: &EventSink, ev: Outgoing) {
    sink.send(ev).await.expect("stored");
}

/// Queues `n` events, closes, runs the engine to its end.
async fn deliver(stream: Arc<Scripted>, s: DeliverySettings, n: usize) -> DeliveryReport {
    let (sink, engine) = channel(s, None).expect("channel");
    for i in 0..n {
        store(&sink, event(i)).await;
    }
    sink.close();
    engine.run(stream, CancellationToken::new()).await
}

fn assert_each_once(stream: &Scripted, n: usize) {
    let stored = stream.stored();
    assert_eq!(stored.len(), n, "events stored");
    assert!(
        stored.values().all(|&c| c == 1),
        "an event was stored twice"
    );
}

#[tokio::test(start_paused = true)]
async fn partial_failures_resend_only_the_failed_entries() {
    let stream = Scripted::new(
        4,
        Box::new(|call, entries| {
            Ok(entries
                .iter()
                .enumerate()
                .map(|(i, _)| EntryResult {
                    error_code: ((call + i) % 2 == 0 && call < 6).then(|| "InternalFailure".into()),
                    shard_id: None,
                })
                .collect())
        }),
    );
    let report = deliver(stream.clone(), settings(20), 3_000).await;
    assert_eq!(report.delivered, 3_000);
    assert!(report.is_clean());
    assert_each_once(&stream, 3_000);
}

#[tokio::test(start_paused = true)]
async fn answers_that_do_not_add_up_are_resent() {
    let stream = Scripted::new(
        2,
        Box::new(|call, entries| {
            if call == 0 {
                // One result short: nothing of this call may count as stored.
                Ok(vec![
                    EntryResult::default();
                    entries.len().saturating_sub(1)
                ])
            } else if call == 1 {
                Err(CallError {
                    failure: CallFailure::Transient,
                    message: "connection reset".into(),
                })
            } else {
                Ok(vec![EntryResult::default(); entries.len()])
            }
        }),
    );
    let report = deliver(stream.clone(), settings(5), 2_000).await;
    assert_eq!(report.delivered, 2_000);
    assert_each_once(&stream, 2_000);
}

#[tokio::test(start_paused = true)]
async fn a_throttled_shard_is_paused_and_the_others_go_on() {
    let throttled_until = Arc::new(Mutex::new(None::<Instant>));
    let seen = throttled_until.clone();
    let stream = Scripted::new(
        2,
        Box::new(move |call, entries| {
            Ok(entries
                .iter()
                .map(|e| {
                    let shard0 = e.explicit_hash_key.as_deref() == Some("0");
                    let throttle = shard0 && call < 3;
                    if throttle {
                        *seen.lock().expect("lock") = Some(Instant::now());
                    }
                    EntryResult {
                        error_code: throttle.then(|| retry::THROTTLED.into()),
                        shard_id: None,
                    }
                })
                .collect())
        }),
    );
    let report = deliver(stream.clone(), settings(5), 5_000).await;
    assert_eq!(report.delivered, 5_000);
    assert_each_once(&stream, 5_000);
    let last_throttle = throttled_until
        .lock()
        .expect("lock")
        .expect("was throttled");
    // After its last refusal, shard 0 got nothing for at least the first pause.
    let calls = stream.calls.lock().expect("lock");
    for (at, entries) in calls.iter() {
        if *at > last_throttle && *at < last_throttle + Duration::from_millis(100) {
            assert!(
                entries
                    .iter()
                    .all(|e| e.explicit_hash_key.as_deref() != Some("0")),
                "a paused shard was sent to"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn each_shard_is_held_to_its_budget() {
    let stream = Scripted::new(
        2,
        Box::new(|_, entries| Ok(vec![EntryResult::default(); entries.len()])),
    );
    let mut s = settings(0);
    s.shard_records_per_sec = 5;
    s.max_aggregate_bytes = 1_024;
    let started = Instant::now();
    let report = deliver(stream.clone(), s, 200).await;
    assert_eq!(report.delivered, 200);
    let calls = stream.calls.lock().expect("lock");
    let records: usize = calls.iter().map(|(_, e)| e.len()).sum();
    let elapsed = calls.last().expect("calls").0 - started;
    // Two shards at 5 records/s, each bucket starting full with 5.
    let allowed = 2.0 * (5.0 + 5.0 * elapsed.as_secs_f64());
    assert!(
        records as f64 <= allowed + 0.01,
        "{records} records in {elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn events_wait_their_linger_unless_a_call_fills() {
    let stream = Scripted::new(
        1,
        Box::new(|_, entries| Ok(vec![EntryResult::default(); entries.len()])),
    );
    let (sink, engine) = channel(settings(100), None).expect("channel");
    let started = Instant::now();
    let give_up = CancellationToken::new();
    let s2 = stream.clone();
    let runner = tokio::spawn(engine.run(s2, give_up));
    for i in 0..10 {
        store(&sink, event(i)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        stream.calls.lock().expect("lock").is_empty(),
        "sent before its linger"
    );
    tokio::time::sleep(Duration::from_millis(60)).await;
    {
        let calls = stream.calls.lock().expect("lock");
        assert_eq!(calls.len(), 1);
        assert!(calls[0].0 - started >= Duration::from_millis(100));
    }
    // A few full aggregates wait for their linger, to share a call.
    for i in 10..1_000 {
        store(&sink, event(i)).await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        stream.calls.lock().expect("lock").len(),
        1,
        "a call went out with a few aggregates before their linger"
    );
    // Enough full aggregates to fill a call: it leaves at once, in one piece.
    for i in 1_000..7_000 {
        store(&sink, event(i)).await;
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    {
        let calls = stream.calls.lock().expect("lock");
        assert!(calls.len() > 1, "a full call waited for its linger");
        let fill = 1024 * 1024 / 51_200;
        assert!(
            calls[1].1.len() >= fill,
            "a call of {} records, not {fill}",
            calls[1].1.len()
        );
    }
    sink.close();
    let report = runner.await.expect("engine");
    assert_eq!(report.delivered, 7_000);
    assert_each_once(&stream, 7_000);
}

fn spool_in(dir: &std::path::Path, max: u64, segment: u64) -> Arc<crate::spool::Spool> {
    let (spool, _) = crate::spool::Spool::open(dir, max, segment).expect("spool");
    Arc::new(spool)
}

#[tokio::test(start_paused = true)]
async fn a_drained_spool_gives_its_bytes_back_while_running() {
    let dir = tempfile::tempdir().expect("dir");
    let spool = spool_in(dir.path(), 1 << 20, 1 << 19);
    let events: Vec<Outgoing> = (0..100).map(event).collect();
    spool.append_all(&events).expect("spooled");
    assert!(spool.bytes() > 0);
    let stream = Scripted::new(
        2,
        Box::new(|_, entries| Ok(vec![EntryResult::default(); entries.len()])),
    );
    let (sink, engine) = channel(settings(5), Some(spool.clone())).expect("channel");
    let runner = tokio::spawn(engine.run(stream.clone(), CancellationToken::new()));
    for _ in 0..200 {
        if stream.stored().len() == 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stream.stored().len(), 100, "spooled events delivered");
    assert_eq!(spool.pending(), 0);
    assert_eq!(
        spool.bytes(),
        0,
        "a delivered spool still holds its bytes while the engine runs"
    );
    sink.close();
    assert_eq!(runner.await.expect("engine").delivered, 100);
}

#[tokio::test(start_paused = true)]
async fn a_full_spool_falls_back_to_memory() {
    let dir = tempfile::tempdir().expect("dir");
    let spool = spool_in(dir.path(), 65_536, 32_768);
    // Before the engine has reached Kinesis, events go to the spool first.
    let (sink, _engine) = channel(settings(5), Some(spool.clone())).expect("channel");
    let mut i = 0;
    while spool.append_all(&[event(i)]).is_ok() {
        i += 1;
    }
    assert!(
        matches!(sink.try_send(event(i)), Ok(Accepted::Memory)),
        "refused with room in memory"
    );
}
