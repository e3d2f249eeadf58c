//! Delivery on the real tracker process and the real Kinesis stand-in:
//! a 30 s Kinesis outage under load, SIGTERM under load, entries failed by a
//! proxy (only those resent), and SIGKILL while events are being spooled.
//! Every event id the tracker answered for must end up in the stream.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use adtrack_proto::v1::TrackingEvent;
use adtrack_testkit::{Http, Intercept, Stack, intercepting_proxy, metric_sum, read_stream_events};
use prost::Message;
use support::{Tracker, load_programs, wait_until};

/// Steady load: `workers` clients each sending a hit every `pause`, keeping
/// the event ids the tracker answered for.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(base: &str, workers: usize, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..workers)
            .map(|w| {
                let (stop, base) = (stop.clone(), base.to_owned());
                tokio::spawn(async move {
                    let http = Http::new();
                    let mut ids = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Acquire) {
                        i += 1;
                        let url = format!("{base}/event/212312?worker={w}&n={i}");
                        if let Ok(r) = http.get(&url).await
                            && r.status == 200
                            && let Some(id) = r.json()["messageId"].as_str()
                        {
                            ids.push(id.to_owned());
                        }
                        tokio::time::sleep(pause).await;
                    }
                    ids
                })
            })
            .collect();
        Self { stop, tasks }
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Release);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("load task"));
        }
        all
    }
}

/// Events in the stream by id, with how many times each appears.
async fn stream_counts(stack: &Stack) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for e in read_stream_events(&stack.kinesis.url())
        .await
        .unwrap_or_default()
    {
        let ev = TrackingEvent::decode(e.data.as_slice()).expect("every delivered event decodes");
        assert_eq!(
            e.partition_key, e.record_partition_key,
            "user records share their Kinesis record's partition key"
        );
        *counts.entry(ev.message_id).or_insert(0) += 1;
    }
    counts
}

async fn wait_all_in_stream(
    stack: &Stack,
    ids: &[String],
    limit: Duration,
) -> HashMap<String, usize> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let counts = stream_counts(stack).await;
        let missing = ids.iter().filter(|id| !counts.contains_key(*id)).count();
        if missing == 0 {
            return counts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} of {} answered event ids never reached the stream",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_outage_of_30s_loses_nothing() {
    let mut stack = Stack::start(2).expect("stack");
    load_programs(&stack).await;
    let t = Tracker::start(&stack, &[]).await;
    let load = Load::start(&t.base, 4, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack.kinesis.stop();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = t.metrics().await;
    stack.kinesis.restart().expect("restart kinesis");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ids = load.finish().await;
    let counts = wait_all_in_stream(&stack, &ids, Duration::from_secs(120)).await;
    let duplicates: usize = ids.iter().map(|id| counts[id] - 1).sum();
    println!(
        "outage: {} events answered, {} found in the stream, {} duplicated, {} spooled during the outage",
        ids.len(),
        ids.iter().filter(|id| counts.contains_key(*id)).count(),
        duplicates,
        metric_sum(&during, "adtrack_events_spooled_total", &[])
    );
    assert!(
        metric_sum(&during, "adtrack_events_spooled_total", &[]) > 0.0,
        "the outage used the spool"
    );
    wait_until("spool emptied", Duration::from_secs(30), || async {
        metric_sum(&t.metrics().await, "adtrack_spool_events", &[]) == 0.0
    })
    .await;
    assert_eq!(
        metric_sum(&t.metrics().await, "adtrack_events_dropped_total", &[]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_delivers_every_accepted_event() {
    let stack = Stack::start(2).expect("stack");
    load_programs(&stack).await;
    let mut t = Tracker::start(&stack, &[]).await;
    let (ids, counts) = sigterm_under_load(&stack, &mut t, 6).await;
    let duplicates: usize = ids.iter().map(|id| counts[id] - 1).sum();
    println!(
        "sigterm: {} events answered, all in the stream, {duplicates} duplicated",
        ids.len()
    );
}

/// Confined to one CPU the tracker runs its requests on a single-threaded
/// runtime (no worker threads), and still delivers every answered event
/// and drains on SIGTERM; given two, it has a worker per CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_core_a_single_threaded_tracker_delivers_everything() {
    let stack = Stack::start(1).expect("stack");
    load_programs(&stack).await;
    let two = Tracker::start(&stack, &[]).await;
    let workers = |t: &Tracker| {
        t.thread_names()
            .iter()
            .filter(|n| n.starts_with("tokio-rt-worker"))
            .count()
    };
    assert_eq!(workers(&two), 2, "{:?}", two.thread_names());
    drop(two);

    let mut t = Tracker::start_on_one_core(&stack, &[]).await;
    assert_eq!(workers(&t), 0, "{:?}", t.thread_names());
    sigterm_under_load(&stack, &mut t, 4).await;
}

/// `workers` clients load the tracker for 2 s, then it gets SIGTERM: it
/// must exit 0 and every event it answered for be in the stream. The ids
/// answered and how often each is there.
async fn sigterm_under_load(
    stack: &Stack,
    t: &mut Tracker,
    workers: usize,
) -> (Vec<String>, HashMap<String, usize>) {
    let load = Load::start(&t.base, workers, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_secs(2)).await;
    t.proc.signal(15);
    let status = t.proc.wait_exit(Duration::from_secs(40)).expect("exits");
    let ids = load.finish().await;
    assert_eq!(status.code(), Some(0), "clean exit: everything delivered");
    assert!(ids.len() > 100, "load ran: {}", ids.len());
    let counts = wait_all_in_stream(stack, &ids, Duration::from_secs(10)).await;
    (ids, counts)
}

/// A proxy in front of the Kinesis stand-in that fails every other
/// PutRecords entry the first time it sees it, without forwarding it.
struct FailingProxy {
    port: u16,
    injected: Arc<AtomicU64>,
    resent: Arc<AtomicU64>,
    sent_twice_ok: Arc<AtomicU64>,
}

async fn failing_proxy(upstream: String) -> FailingProxy {
    let injected = Arc::new(AtomicU64::new(0));
    let resent = Arc::new(AtomicU64::new(0));
    let sent_twice_ok = Arc::new(AtomicU64::new(0));
    let failed_once: std::sync::Mutex<HashSet<String>> = Default::default();
    let delivered: std::sync::Mutex<HashSet<String>> = Default::default();
    let (inj, res, twice) = (injected.clone(), resent.clone(), sent_twice_ok.clone());
    let port = intercepting_proxy(upstream, move |target, body| {
        if !target.ends_with(".PutRecords") {
            return Intercept::pass(body);
        }
        let mut j: serde_json::Value = serde_json::from_slice(body).expect("json");
        let records = j["Records"].as_array().cloned().unwrap_or_default();
        let mut keep = Vec::new();
        let mut failed_at = Vec::new();
        for (i, r) in records.into_iter().enumerate() {
            let key = r["Data"].as_str().unwrap_or("").to_owned();
            let mut seen = failed_once.lock().expect("lock");
            if seen.contains(&key) {
                res.fetch_add(1, Ordering::Relaxed);
            }
            if i % 2 == 0 && seen.insert(key.clone()) {
                inj.fetch_add(1, Ordering::Relaxed);
                failed_at.push(i);
            } else {
                if !delivered.lock().expect("lock").insert(key) {
                    twice.fetch_add(1, Ordering::Relaxed);
                }
                keep.push(r);
            }
        }
        let forward = (!keep.is_empty()).then(|| {
            j["Records"] = serde_json::Value::Array(keep);
            serde_json::to_vec(&j).expect("json")
        });
        // Put the injected failures back at their positions in the answer.
        let patch = move |resp: Vec<u8>| {
            let mut j: serde_json::Value = serde_json::from_slice(&resp).expect("json");
            let mut results: Vec<serde_json::Value> = j["Records"].as_array().cloned().unwrap_or_default();
            for i in &failed_at {
                results.insert(
                    *i,
                    serde_json::json!({"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "injected by the test proxy"}),
                );
            }
            let failed = j["FailedRecordCount"].as_u64().unwrap_or(0) + failed_at.len() as u64;
            j["FailedRecordCount"] = failed.into();
            j["Records"] = serde_json::Value::Array(results);
            serde_json::to_vec(&j).expect("json")
        };
        Intercept {
            forward,
            answer: br#"{"FailedRecordCount":0,"Records":[]}"#.to_vec(),
            status: 200,
            patch: Some(Box::new(patch)),
        }
    })
    .await;
    FailingProxy {
        port,
        injected,
        resent,
        sent_twice_ok,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_failed_entries_are_resent() {
    let stack = Stack::start(2).expect("stack");
    load_programs(&stack).await;
    let proxy = failing_proxy(stack.kinesis.url()).await;
    let endpoint = format!("http://127.0.0.1:{}", proxy.port);
    let t = Tracker::start(
        &stack,
        &[
            ("AWS_ENDPOINT_URL_KINESIS", endpoint.as_str()),
            ("TRACKER_MAX_AGGREGATE_BYTES", "2048"),
            // Records wait out their backoff in memory here: moving them to
            // the spool would pack them into new records.
            ("TRACKER_MEMORY_MAX_AGE_MS", "60000"),
        ],
    )
    .await;
    let load = Load::start(&t.base, 4, Duration::from_millis(1));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ids = load.finish().await;
    let counts = wait_all_in_stream(&stack, &ids, Duration::from_secs(60)).await;
    let duplicates: usize = ids.iter().map(|id| counts[id] - 1).sum();
    let (injected, resent) = (
        proxy.injected.load(Ordering::Relaxed),
        proxy.resent.load(Ordering::Relaxed),
    );
    println!(
        "partial failures: {} events, {injected} entries failed, {resent} resent, {duplicates} duplicated",
        ids.len()
    );
    assert!(injected > 0);
    assert_eq!(resent, injected, "exactly the failed entries were resent");
    assert_eq!(
        proxy.sent_twice_ok.load(Ordering::Relaxed),
        0,
        "no delivered entry was sent again"
    );
    assert_eq!(duplicates, 0);
    let m = t.metrics().await;
    assert!(
        metric_sum(
            &m,
            "adtrack_kinesis_retries_total",
            &["cause=\"throttled\""]
        ) >= injected as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_spooling_loses_no_acknowledged_event() {
    use rand::Rng;
    let mut stack = Stack::start(1).expect("stack");
    load_programs(&stack).await;
    stack.kinesis.stop();
    let spool = tempfile::tempdir().expect("spool");
    let spool_dir = spool.path().display().to_string();
    let mut acknowledged = Vec::new();
    for round in 0..6 {
        let t = Tracker::spawn(
            &stack,
            &[
                ("TRACKER_SPOOL_DIR", spool_dir.as_str()),
                ("TRACKER_SPOOL_SEGMENT_BYTES", "8192"),
            ],
        );
        let http = Http::new();
        wait_until("tracker serving", Duration::from_secs(20), || async {
            http.get(&t.url("/health/live")).await.is_ok()
        })
        .await;
        let load = Load::start(&t.base, 4, Duration::from_millis(1));
        let ms = rand::rng().random_range(150..900);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let mut t = t;
        t.proc.kill(); // SIGKILL, mid-write
        let ids = load.finish().await;
        println!(
            "round {round}: killed after {ms} ms, {} events acknowledged",
            ids.len()
        );
        acknowledged.extend(ids);
    }
    stack.kinesis.restart().expect("kinesis back");
    let t = Tracker::start(&stack, &[("TRACKER_SPOOL_DIR", spool_dir.as_str())]).await;
    let counts = wait_all_in_stream(&stack, &acknowledged, Duration::from_secs(120)).await;
    let duplicates: usize = acknowledged.iter().map(|id| counts[id] - 1).sum();
    println!(
        "spool crash test: {} acknowledged, all delivered, {duplicates} duplicated",
        acknowledged.len()
    );
    assert!(acknowledged.len() > 100);
    wait_until("spool emptied", Duration::from_secs(30), || async {
        metric_sum(&t.metrics().await, "adtrack_spool_events", &[]) == 0.0
    })
    .await;
}

/// A proxy in front of the Kinesis stand-in that refuses every PutRecords
/// entry as throttled (the calls themselves succeed), counting the calls.
async fn throttling_proxy(upstream: String, calls: Arc<AtomicU64>) -> u16 {
    intercepting_proxy(upstream, move |target, body| {
        if !target.ends_with(".PutRecords") {
            return Intercept::pass(body);
        }
        calls.fetch_add(1, Ordering::Relaxed);
        let j: serde_json::Value = serde_json::from_slice(body).expect("json");
        let n = j["Records"].as_array().map_or(0, Vec::len);
        let refused = serde_json::json!({
            "ErrorCode": "ProvisionedThroughputExceededException",
            "ErrorMessage": "throttled by the test proxy",
        });
        let answer = serde_json::json!({
            "FailedRecordCount": n,
            "Records": vec![refused; n],
        });
        Intercept::answer(&answer)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_throttling_loses_nothing_older_than_the_memory_age_bound() {
    let stack = Stack::start(1).expect("stack");
    load_programs(&stack).await;
    let calls = Arc::new(AtomicU64::new(0));
    let port = throttling_proxy(stack.kinesis.url(), calls.clone()).await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let spool = tempfile::tempdir().expect("spool");
    let spool_dir = spool.path().display().to_string();
    let mut t = Tracker::start(
        &stack,
        &[
            ("AWS_ENDPOINT_URL_KINESIS", endpoint.as_str()),
            ("TRACKER_SPOOL_DIR", spool_dir.as_str()),
            ("TRACKER_MEMORY_MAX_AGE_MS", "500"),
        ],
    )
    .await;

    // Kinesis takes every call and refuses every entry: what memory held
    // past the age bound moves to the spool, so memory ends up holding
    // nothing a crash could lose.
    let load = Load::start(&t.base, 4, Duration::from_millis(1));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut acknowledged = load.finish().await;
    wait_until(
        "memory holds no acknowledged event",
        Duration::from_secs(30),
        || async { metric_sum(&t.metrics().await, "adtrack_queue_bytes", &[]) == 0.0 },
    )
    .await;
    let m = t.metrics().await;
    assert!(calls.load(Ordering::Relaxed) > 0, "Kinesis was called");
    assert!(
        metric_sum(&m, "adtrack_events_spooled_total", &["cause=\"aged\""]) > 0.0,
        "events held past the bound were moved to the spool"
    );
    assert_eq!(
        metric_sum(&m, "adtrack_kinesis_behind", &[]),
        1.0,
        "refused entries count as Kinesis not keeping up"
    );

    // From now on each event is on disk before it is answered: a SIGKILL
    // under load loses none of them.
    let load = Load::start(&t.base, 4, Duration::from_millis(1));
    tokio::time::sleep(Duration::from_millis(700)).await;
    t.proc.kill();
    acknowledged.extend(load.finish().await);
    drop(t);

    let _t = Tracker::start(&stack, &[("TRACKER_SPOOL_DIR", spool_dir.as_str())]).await;
    let counts = wait_all_in_stream(&stack, &acknowledged, Duration::from_secs(120)).await;
    let duplicates: usize = acknowledged.iter().map(|id| counts[id] - 1).sum();
    println!(
        "throttled then killed: {} acknowledged, all delivered, {duplicates} duplicated, {} throttled calls",
        acknowledged.len(),
        calls.load(Ordering::Relaxed)
    );
    assert!(acknowledged.len() > 100);
}

/// Until the delivery engine has listed the stream's shards every event
/// would go to the spool (and, while the spool holds any, new ones follow
/// them there): the tracker is not ready before that, even though the
/// stream answers other calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_engine_has_listed_the_shards() {
    let stack = Stack::start(1).expect("stack");
    load_programs(&stack).await;
    let refuse = Arc::new(AtomicBool::new(true));
    let refused = Arc::new(AtomicU64::new(0));
    let port = {
        let (refuse, refused) = (refuse.clone(), refused.clone());
        intercepting_proxy(stack.kinesis.url(), move |target, body| {
            if target.ends_with(".ListShards") && refuse.load(Ordering::Acquire) {
                refused.fetch_add(1, Ordering::Relaxed);
                return Intercept::error("LimitExceededException", "refused by the test proxy");
            }
            Intercept::pass(body)
        })
        .await
    };
    let endpoint = format!("http://127.0.0.1:{port}");
    let t = Tracker::spawn(&stack, &[("AWS_ENDPOINT_URL_KINESIS", endpoint.as_str())]);
    let http = Http::new();
    wait_until(
        "ListShards refused twice",
        Duration::from_secs(30),
        || async { refused.load(Ordering::Relaxed) >= 2 },
    )
    .await;
    let r = http
        .get(&format!("{}/health/ready", t.admin))
        .await
        .expect("ready");
    assert_eq!(r.status, 503, "ready before the engine has the shards");
    let reasons = r.json()["reasons"].to_string();
    assert!(reasons.contains("shards"), "{reasons}");

    refuse.store(false, Ordering::Release);
    t.wait_ready().await;
    let r = http.get(&t.url("/event/212312")).await.expect("hit");
    assert_eq!(r.status, 200);
    let m = t.metrics().await;
    // Present (the engine runs: its gauges exist) and 0 (not behind).
    assert!(
        m.lines().any(|l| l == "adtrack_kinesis_behind 0"),
        "a ready tracker delivers from memory: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_in_flight_cannot_take_the_flush_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = Stack::start(1).expect("stack");
    load_programs(&stack).await;
    // 6 s to drain: 3 s for requests in flight, the rest for flushing.
    let mut t = Tracker::start(
        &stack,
        &[
            ("TRACKER_DRAIN_DEADLINE_SECS", "6"),
            ("TRACKER_BODY_TIMEOUT_SECS", "60"),
        ],
    )
    .await;
    let load = Load::start(&t.base, 2, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acknowledged = load.finish().await;

    // A client that sends half its body, then stalls.
    let body = br#"[{"programId":"212312","type":"click"}]"#;
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", t.port))
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).await.expect("head");
    slow.write_all(&body[..10]).await.expect("part of the body");
    tokio::time::sleep(Duration::from_millis(200)).await;

    t.proc.signal(15);
    // Past the connections' share of the deadline, before its end, the
    // client finishes its request: the tracker has closed it unanswered
    // instead of taking an event it might not have time to deliver.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let _ = slow.write_all(&body[10..]).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "a request still in flight at its share of the deadline was answered: {answer}"
    );
    let status = t.proc.wait_exit(Duration::from_secs(30)).expect("exits");
    assert_eq!(status.code(), Some(0), "clean exit: everything delivered");
    assert!(!acknowledged.is_empty());
    wait_all_in_stream(&stack, &acknowledged, Duration::from_secs(10)).await;
}

/// Every event in the stream as a KCL consumer sees it: the user records
/// of an aggregate whose effective hash key (explicit, else the MD5 of the
/// partition key) lies outside the hash range of the shard that holds the
/// record are dropped, as KCL's deaggregation does after a reshard.
async fn kcl_event_counts(stack: &Stack) -> HashMap<String, usize> {
    use adtrack_proto::kpl::{Deaggregated, deaggregate, partition_hash};
    let client = adtrack_testkit::kinesis_client(&stack.kinesis.url());
    let shards = client
        .list_shards()
        .stream_name(adtrack_testkit::EVENTS_STREAM)
        .send()
        .await
        .expect("list shards")
        .shards
        .unwrap_or_default();
    let ranges: HashMap<String, (u128, u128)> = shards
        .iter()
        .map(|s| {
            let r = s.hash_key_range().expect("range");
            let start = r.starting_hash_key().parse().expect("start");
            (
                s.shard_id().to_owned(),
                (start, r.ending_hash_key().parse().expect("end")),
            )
        })
        .collect();
    let mut counts = HashMap::new();
    let records = adtrack_testkit::read_stream(&stack.kinesis.url())
        .await
        .unwrap_or_default();
    for r in records {
        let Some(&(start, end)) = ranges.get(&r.shard_id) else {
            panic!(
                "a record in {}, a shard ListShards does not name",
                r.shard_id
            );
        };
        let events = match deaggregate(&r.data).expect("aggregate") {
            Deaggregated::Plain => vec![r.data.clone()],
            Deaggregated::Records(users) => users
                .into_iter()
                .filter(|u| {
                    let hash = match &u.explicit_hash_key {
                        Some(k) => k.parse().expect("explicit hash key"),
                        None => partition_hash(&u.partition_key),
                    };
                    (start..=end).contains(&hash)
                })
                .map(|u| u.data.to_vec())
                .collect(),
        };
        for data in events {
            let ev = TrackingEvent::decode(data.as_slice()).expect("decodes");
            *counts.entry(ev.message_id).or_insert(0) += 1;
        }
    }
    counts
}

/// The stream is split and then merged under load: every answered event
/// reaches a KCL-style reader (which drops sub-records outside its shard's
/// hash range) exactly once, so no aggregate mixes two shards' events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_and_a_merge_under_load_lose_nothing_for_a_kcl_reader() {
    let stack = Stack::start(1).expect("stack");
    let _store = load_programs(&stack).await;
    let t = Tracker::start(&stack, &[]).await;
    let load = Load::start(&t.base, 8, Duration::from_millis(5));
    let client = adtrack_testkit::kinesis_client(&stack.kinesis.url());
    let kinesis_url = stack.kinesis.url();
    let active = || adtrack_testkit::wait_stream_active(&kinesis_url);
    let t = &t;
    let delivered = |n: f64| async move {
        wait_until("events delivered", Duration::from_secs(30), || async {
            metric_sum(&t.metrics().await, "adtrack_events_delivered_total", &[]) >= n
        })
        .await;
    };
    delivered(200.0).await;
    client
        .split_shard()
        .stream_name(adtrack_testkit::EVENTS_STREAM)
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key((1u128 << 127).to_string())
        .send()
        .await
        .expect("split");
    active().await;
    // Until events have landed in a child (a call started before the split
    // may still be counted as delivered after it).
    let in_shards = |names: &'static [&'static str]| {
        let url = kinesis_url.clone();
        async move {
            wait_until("records in the new shards", Duration::from_secs(60), || {
                let url = url.clone();
                async move {
                    adtrack_testkit::read_stream(&url)
                        .await
                        .is_ok_and(|rs| rs.iter().any(|r| names.contains(&r.shard_id.as_str())))
                }
            })
            .await;
        }
    };
    in_shards(&["shardId-000000000001", "shardId-000000000002"]).await;
    let at_split = metric_sum(&t.metrics().await, "adtrack_events_delivered_total", &[]);
    delivered(at_split + 400.0).await;
    client
        .merge_shards()
        .stream_name(adtrack_testkit::EVENTS_STREAM)
        .shard_to_merge("shardId-000000000001")
        .adjacent_shard_to_merge("shardId-000000000002")
        .send()
        .await
        .expect("merge");
    active().await;
    in_shards(&["shardId-000000000003"]).await;
    let at_merge = metric_sum(&t.metrics().await, "adtrack_events_delivered_total", &[]);
    delivered(at_merge + 400.0).await;
    let ids = load.finish().await;
    wait_all_in_stream(&stack, &ids, Duration::from_secs(60)).await;

    let seen = kcl_event_counts(&stack).await;
    let lost = ids.iter().filter(|id| !seen.contains_key(*id)).count();
    assert_eq!(
        lost,
        0,
        "{lost} of {} events dropped by the KCL filter",
        ids.len()
    );
    let twice = seen.values().filter(|n| **n > 1).count();
    assert_eq!(twice, 0, "events read twice");
    let answered: HashSet<&String> = ids.iter().collect();
    assert_eq!(answered.len(), ids.len(), "event ids are unique");
    // Events landed in the parent, both children and the merged shard.
    let shards: HashSet<String> = adtrack_testkit::read_stream(&stack.kinesis.url())
        .await
        .expect("read")
        .into_iter()
        .map(|r| r.shard_id)
        .collect();
    assert!(shards.len() >= 3, "records in {shards:?}");
}
