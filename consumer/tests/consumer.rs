//! The consumer on the real Kinesis and DynamoDB stand-ins: poison records
//! dead-lettered while the batch proceeds, a poller killed mid-batch, a
//! DynamoDB outage, a Kinesis outage, two pollers sharing and taking over shards, and the
//! Lambda handler's partial batch response, in process and from the real
//! `bootstrap` binary through the Lambda runtime API.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use adtrack_consumer::batch::Tables;
use adtrack_proto::kpl::{Aggregator, UserRecord};
use adtrack_proto::v1::TrackingEvent;
use adtrack_testkit::{
    CHECKPOINT_TABLE, DEAD_LETTER_TABLE, EVENTS_STREAM, EVENTS_TABLE, Http, Intercept,
    LambdaRuntime, Patch, Proc, Stack, attr_s, binary, dynamodb_client, free_port,
    intercepting_proxy, kinesis_client, lambda_kinesis_event_json, scan_table, wait_until,
};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bytes::Bytes;
use prost::Message;

fn event(id: &str) -> Vec<u8> {
    TrackingEvent {
        message_id: id.to_owned(),
        programid: "212312".into(),
        program_name: "program1".into(),
        customer_id: 9123,
        is_valid: true,
        validation: 1,
        event_type: 1,
        timestamp_ms: 1_795_000_000_000,
        ..Default::default()
    }
    .encode_to_vec()
}

/// Puts records (data, partition key) in order; returns their sequence numbers.
async fn put(stack: &Stack, records: Vec<(Vec<u8>, String)>) -> Vec<String> {
    let client = kinesis_client(&stack.kinesis.url());
    let mut seqs = Vec::new();
    for chunk in records.chunks(500) {
        let entries: Vec<PutRecordsRequestEntry> = chunk
            .iter()
            .map(|(d, pk)| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(d.clone()))
                    .partition_key(pk)
                    .build()
                    .expect("entry")
            })
            .collect();
        let out = client
            .put_records()
            .stream_name(EVENTS_STREAM)
            .set_records(Some(entries))
            .send()
            .await
            .expect("put");
        assert_eq!(out.failed_record_count, Some(0));
        seqs.extend(
            out.records
                .into_iter()
                .map(|r| r.sequence_number.unwrap_or_default()),
        );
    }
    seqs
}

/// `n` events as plain and aggregated records, ids `{prefix}-{i}`.
fn mixed(prefix: &str, n: usize) -> Vec<(Vec<u8>, String)> {
    let mut out = Vec::new();
    let mut agg = Aggregator::new(4096);
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        if i % 3 == 0 {
            out.push((event(&id), id));
        } else {
            let rec = UserRecord {
                partition_key: id.clone(),
                explicit_hash_key: None,
                data: Bytes::from(event(&id)),
            };
            if let Err(rec) = agg.push(rec) {
                out.push((agg.finish().to_vec(), id.clone()));
                agg.push(rec).expect("fits");
            }
        }
    }
    if !agg.is_empty() {
        out.push((agg.finish().to_vec(), format!("{prefix}-agg-last")));
    }
    out
}

struct Poller {
    proc: Proc,
    admin: String,
}

impl Drop for Poller {
    /// What it exposed by the end, for dev/check_metrics.py.
    fn drop(&mut self) {
        adtrack_testkit::log_exposed_metrics("consumer", &self.admin);
    }
}

fn start_poller(stack: &Stack, extra: &[(&str, &str)]) -> Poller {
    let port = free_port();
    let mut cmd = adtrack_testkit::command(&binary("consumer"));
    cmd.envs(stack.env())
        .env("CONSUMER_ADMIN_ADDR", format!("127.0.0.1:{port}"))
        .env("CONSUMER_POLL_INTERVAL_MS", "200")
        .env("LOG_FORMAT", "text")
        .env("RUST_LOG", "warn");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Poller {
        proc: Proc::new(cmd.spawn().expect("spawn consumer")),
        admin: format!("http://127.0.0.1:{port}"),
    }
}

async fn event_ids(stack: &Stack) -> Vec<String> {
    let client = dynamodb_client(&stack.dynamodb.url());
    scan_table(&client, EVENTS_TABLE)
        .await
        .unwrap_or_default()
        .iter()
        .map(|i| attr_s(i, "eventId"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_record_is_dead_lettered_and_the_batch_proceeds() {
    let stack = Stack::start(1).expect("stack");
    let mut records = mixed("good-a", 40);
    records.push((b"\xff\xff not a tracking event".to_vec(), "poison".into()));
    records.push((event(""), "no-id".into()));
    records.extend(mixed("good-b", 40));
    let seqs = put(&stack, records).await;
    let _poller = start_poller(&stack, &[]);
    wait_until("good events written", Duration::from_secs(60), || async {
        event_ids(&stack).await.len() >= 80
    })
    .await;
    let ids: HashSet<String> = event_ids(&stack).await.into_iter().collect();
    assert_eq!(ids.len(), 80);
    let ddb = dynamodb_client(&stack.dynamodb.url());
    wait_until(
        "checkpoint past the poison record",
        Duration::from_secs(30),
        || async {
            scan_table(&ddb, CHECKPOINT_TABLE)
                .await
                .unwrap_or_default()
                .iter()
                .any(|c| attr_s(c, "sequenceNumber") == *seqs.last().expect("seq"))
        },
    )
    .await;
    let dead = scan_table(&ddb, DEAD_LETTER_TABLE).await.expect("scan");
    assert_eq!(
        dead.len(),
        2,
        "the undecodable record and the event without id"
    );
    let poison = dead
        .iter()
        .find(|d| attr_s(d, "reason").starts_with("not a TrackingEvent"))
        .expect("poison dead letter");
    assert_eq!(
        poison["data"].as_b().expect("raw bytes").as_ref(),
        b"\xff\xff not a tracking event"
    );
    assert!(seqs.contains(&attr_s(poison, "sequenceNumber")));
    assert!(attr_s(poison, "shardId").starts_with("shardId-"));
}

/// A DynamoDB proxy that writes the first `pass` events, then leaves every
/// later one unprocessed: a poller behind it stays mid-batch for certain.
async fn stalling_proxy(upstream: String, pass: u64) -> u16 {
    let passed = Arc::new(AtomicU64::new(0));
    intercepting_proxy(upstream, move |target, body| {
        if !target.ends_with(".BatchWriteItem") || passed.load(Ordering::Relaxed) < pass {
            if target.ends_with(".BatchWriteItem") {
                let j: serde_json::Value = serde_json::from_slice(body).expect("json");
                let n: usize = j["RequestItems"].as_object().map_or(0, |t| {
                    t.values().map(|r| r.as_array().map_or(0, Vec::len)).sum()
                });
                passed.fetch_add(n as u64, Ordering::Relaxed);
            }
            return Intercept::pass(body);
        }
        let j: serde_json::Value = serde_json::from_slice(body).expect("json");
        let answer = serde_json::json!({ "UnprocessedItems": j["RequestItems"] });
        Intercept::answer(&answer)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_batch_then_restarted_writes_each_event_once() {
    let stack = Stack::start(2).expect("stack");
    let records = mixed("k", 3000);
    put(&stack, records).await;
    let sent: HashSet<String> = (0..3000).map(|i| format!("k-{i}")).collect();
    let port = stalling_proxy(stack.dynamodb.url(), 300).await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut first = start_poller(
        &stack,
        &[
            ("CONSUMER_MAX_RECORDS", "50"),
            ("AWS_ENDPOINT_URL_DYNAMODB", endpoint.as_str()),
        ],
    );
    wait_until("some events written", Duration::from_secs(60), || async {
        event_ids(&stack).await.len() >= 300
    })
    .await;
    // The proxy holds everything after the first 300: the poller is inside
    // a batch it cannot finish when it is killed.
    first.proc.kill();
    let written_before = event_ids(&stack).await.len();
    assert!(written_before < 3000);
    let _second = start_poller(&stack, &[("CONSUMER_LEASE_SECS", "2")]);
    wait_until("every event written", Duration::from_secs(120), || async {
        event_ids(&stack).await.len() >= 3000
    })
    .await;
    let landed: HashSet<String> = event_ids(&stack).await.into_iter().collect();
    println!(
        "kill test: {written_before} items before SIGKILL, {} after restart",
        landed.len()
    );
    assert_eq!(landed, sent, "exactly the events sent, each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_outage_is_waited_out() {
    let mut stack = Stack::start(1).expect("stack");
    put(&stack, mixed("before", 200)).await;
    let _poller = start_poller(&stack, &[]);
    wait_until("first events", Duration::from_secs(60), || async {
        event_ids(&stack).await.len() >= 200
    })
    .await;
    stack.dynamodb.stop();
    put(&stack, mixed("during", 300)).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    stack.dynamodb.restart().expect("dynamodb back");
    wait_until(
        "events from the outage",
        Duration::from_secs(90),
        || async { event_ids(&stack).await.len() >= 500 },
    )
    .await;
    assert_eq!(event_ids(&stack).await.len(), 500);
}

/// Kinesis gone for a while: the poller counts its failed reads (what the
/// consumer-read-errors alarm watches), keeps its place, and goes on once
/// the stream is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_outage_is_counted_and_waited_out() {
    let mut stack = Stack::start(1).expect("stack");
    put(&stack, mixed("before-k", 100)).await;
    let poller = start_poller(&stack, &[]);
    wait_until("first events", Duration::from_secs(60), || async {
        event_ids(&stack).await.len() >= 100
    })
    .await;
    stack.kinesis.stop();
    let http = Http::new();
    wait_until("failed reads counted", Duration::from_secs(60), || async {
        let text = http
            .get(&format!("{}/metrics", poller.admin))
            .await
            .map(|r| r.text())
            .unwrap_or_default();
        adtrack_testkit::metric_sum(&text, "adtrack_consumer_read_errors_total", &[]) > 0.0
    })
    .await;
    stack.kinesis.restart().expect("kinesis back");
    put(&stack, mixed("after-k", 100)).await;
    wait_until(
        "events put after the outage",
        Duration::from_secs(90),
        || async { event_ids(&stack).await.len() >= 200 },
    )
    .await;
    assert_eq!(event_ids(&stack).await.len(), 200, "each event once");
}

async fn lease_owners(stack: &Stack) -> HashMap<String, String> {
    let ddb = dynamodb_client(&stack.dynamodb.url());
    scan_table(&ddb, CHECKPOINT_TABLE)
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| !attr_s(r, "shardKey").contains("/worker/"))
        .filter_map(|r| {
            let owner = attr_s(r, "leaseOwner");
            (!owner.is_empty()).then(|| (attr_s(r, "shardKey"), owner))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pollers_share_shards_and_take_over_from_a_dead_one() {
    let stack = Stack::start(2).expect("stack");
    let lease = [("CONSUMER_LEASE_SECS", "3")];
    let mut a = start_poller(&stack, &lease);
    let b = start_poller(&stack, &lease);
    wait_until(
        "each poller holds one shard",
        Duration::from_secs(60),
        || async {
            let owners = lease_owners(&stack).await;
            let distinct: HashSet<&String> = owners.values().collect();
            owners.len() == 2 && distinct.len() == 2
        },
    )
    .await;
    put(&stack, mixed("shared", 400)).await;
    wait_until("events written", Duration::from_secs(60), || async {
        event_ids(&stack).await.len() >= 400
    })
    .await;
    let http = Http::new();
    let a_metrics = http
        .get(&format!("{}/metrics", a.admin))
        .await
        .expect("metrics")
        .text();
    adtrack_testkit::log_metric_names("consumer", &a_metrics);
    assert!(adtrack_testkit::metric_value(&a_metrics, "adtrack_consumer_leases_held") >= 1.0);

    a.proc.kill();
    wait_until(
        "the survivor holds both shards",
        Duration::from_secs(60),
        || async {
            let owners = lease_owners(&stack).await;
            let distinct: HashSet<&String> = owners.values().collect();
            owners.len() == 2 && distinct.len() == 1
        },
    )
    .await;
    put(&stack, mixed("after", 400)).await;
    wait_until(
        "events after the takeover",
        Duration::from_secs(60),
        || async { event_ids(&stack).await.len() >= 800 },
    )
    .await;
    assert_eq!(event_ids(&stack).await.len(), 800);
    drop(b);
}

/// A DynamoDB proxy that leaves items whose event id starts with
/// `poison-write-` unprocessed, forever.
async fn unprocessing_proxy(upstream: String, refused: Arc<AtomicU64>) -> u16 {
    intercepting_proxy(upstream, move |target, body| {
        if !target.ends_with(".BatchWriteItem") {
            return Intercept::pass(body);
        }
        let mut j: serde_json::Value = serde_json::from_slice(body).expect("json");
        let tables = j["RequestItems"].as_object().cloned().unwrap_or_default();
        let mut keep = serde_json::Map::new();
        let mut held = serde_json::Map::new();
        for (table, reqs) in tables {
            let (bad, good): (Vec<_>, Vec<_>) = reqs
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .partition(|r| {
                    r["PutRequest"]["Item"]["eventId"]["S"]
                        .as_str()
                        .is_some_and(|id| id.starts_with("poison-write-"))
                });
            if !bad.is_empty() {
                refused.fetch_add(bad.len() as u64, Ordering::Relaxed);
                held.insert(table.clone(), serde_json::Value::Array(bad));
            }
            if !good.is_empty() {
                keep.insert(table, serde_json::Value::Array(good));
            }
        }
        let forward = (!keep.is_empty()).then(|| {
            j["RequestItems"] = serde_json::Value::Object(keep);
            serde_json::to_vec(&j).expect("json")
        });
        // The held items come back as unprocessed, every time.
        let patch = (!held.is_empty()).then(|| {
            Box::new(move |resp: Vec<u8>| {
                let mut j: serde_json::Value = serde_json::from_slice(&resp).expect("json");
                j["UnprocessedItems"] = serde_json::Value::Object(held);
                serde_json::to_vec(&j).expect("json")
            }) as Patch
        });
        Intercept {
            forward,
            answer: br#"{"UnprocessedItems":{}}"#.to_vec(),
            status: 200,
            patch,
        }
    })
    .await
}

fn kinesis_event(records: &[(&str, Vec<u8>)]) -> adtrack_reader::lambda::KinesisBatch {
    let records: Vec<(&str, &[u8])> = records.iter().map(|(s, d)| (*s, d.as_slice())).collect();
    adtrack_testkit::lambda_kinesis_event("adtrack-events", &records)
}

fn lambda_tables() -> Tables {
    Tables {
        events: EVENTS_TABLE.into(),
        dead_letters: DEAD_LETTER_TABLE.into(),
        conversions: adtrack_testkit::CONVERSIONS_TABLE.into(),
        click_wait_secs: 300,
        ttl_days: 30,
        write_concurrency: 4,
        max_attempts: 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_reports_the_first_record_not_written() {
    let stack = Stack::start(1).expect("stack");
    let refused = Arc::new(AtomicU64::new(0));
    let port = unprocessing_proxy(stack.dynamodb.url(), refused.clone()).await;
    // Calling as the Lambda does, so its calls count as the Lambda's.
    let client = adtrack_testkit::dynamodb_client_as(
        &format!("http://127.0.0.1:{port}"),
        "adtrack-consumer-lambda",
    );
    let mut agg = Aggregator::new(51_200);
    for i in 0..5 {
        agg.push(UserRecord {
            partition_key: format!("agg-{i}"),
            explicit_hash_key: None,
            data: Bytes::from(event(&format!("agg-{i}"))),
        })
        .expect("fits");
    }
    let batch = kinesis_event(&[
        ("100", event("ok-1")),
        ("101", agg.finish().to_vec()),
        ("102", b"poison".to_vec()),
        ("103", event("poison-write-1")),
        ("104", event("ok-2")),
    ]);
    let response = adtrack_consumer::lambda::handle(&client, &lambda_tables(), batch).await;
    let failures: Vec<Option<String>> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect();
    assert_eq!(
        failures,
        vec![Some("103".to_owned())],
        "retry from the record not written"
    );
    assert!(
        refused.load(Ordering::Relaxed) >= 3,
        "the write was retried"
    );
    let ids: HashSet<String> = event_ids(&stack).await.into_iter().collect();
    for id in ["ok-1", "agg-0", "agg-4"] {
        assert!(ids.contains(id), "{id} written before the failure");
    }
    assert!(!ids.contains("poison-write-1"));
    let ddb = dynamodb_client(&stack.dynamodb.url());
    let dead = scan_table(&ddb, DEAD_LETTER_TABLE).await.expect("scan");
    assert_eq!(dead.len(), 1);
    assert_eq!(attr_s(&dead[0], "sequenceNumber"), "102");
    assert_eq!(attr_s(&dead[0], "shardId"), "shardId-000000000000");

    // All good: no failures reported.
    let ok = kinesis_event(&[("200", event("ok-3")), ("201", event("ok-4"))]);
    let response = adtrack_consumer::lambda::handle(&client, &lambda_tables(), ok).await;
    assert!(response.batch_item_failures.is_empty());
}

/// A valid event of program 212312 of this type (2 click, 3 conversion)
/// and source.
fn valid_event(id: &str, event_type: i32, source: &str, ts: i64) -> TrackingEvent {
    TrackingEvent {
        message_id: id.to_owned(),
        programid: "212312".into(),
        customer_id: 9123,
        is_valid: true,
        validation: 1,
        event_type,
        source: source.into(),
        timestamp_ms: ts,
        ..Default::default()
    }
}

/// A postback conversion naming a click.
fn conversion(id: &str, txid: &str, click_id: &str, ts: i64) -> Vec<u8> {
    TrackingEvent {
        click_id: click_id.to_owned(),
        transaction_id: txid.to_owned(),
        conversion_value: "10".into(),
        currency: "USD".into(),
        attribution_window_days: 30,
        ..valid_event(id, 3, "postback", ts)
    }
    .encode_to_vec()
}

/// A click redirect with a campaign parameter.
fn click(id: &str, ts: i64) -> Vec<u8> {
    TrackingEvent {
        extra: [("utm_source".to_owned(), "mail".to_owned())].into(),
        ..valid_event(id, 2, "click", ts)
    }
    .encode_to_vec()
}

/// The Lambda front-end records conversions as the poller does: a
/// conversion read before its click waits for it and is matched when the
/// click arrives, a duplicate postback is counted on the first one's item,
/// and a batch delivered again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lambda_matches_conversions_with_clicks_read_before_or_after() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let stack = Stack::start(1).expect("stack");
    let client =
        adtrack_testkit::dynamodb_client_as(&stack.dynamodb.url(), "adtrack-consumer-lambda");
    let ddb = dynamodb_client(&stack.dynamodb.url());
    let tables = lambda_tables();
    let conversions = || async {
        scan_table(&ddb, adtrack_testkit::CONVERSIONS_TABLE)
            .await
            .expect("scan")
            .into_iter()
            .map(|i| (attr_s(&i, "conversionId"), i))
            .collect::<HashMap<_, _>>()
    };
    let t = 1_795_000_000_000;
    // Another click of the program is already there.
    let other = kinesis_event(&[("9", click("click-2", t - 60_000))]);
    let r = adtrack_consumer::lambda::handle(&client, &tables, other).await;
    assert!(r.batch_item_failures.is_empty());
    // The conversion first, and another postback of its transaction naming
    // that other click.
    let first = kinesis_event(&[
        ("10", conversion("conv-1", "T-1", "click-1", t)),
        ("11", conversion("conv-1b", "T-1", "click-2", t + 5_000)),
    ]);
    let r = adtrack_consumer::lambda::handle(&client, &tables, first.clone()).await;
    assert!(r.batch_item_failures.is_empty());
    let c = conversions().await;
    let item = &c["212312#T-1"];
    assert_eq!(attr_s(item, "reason"), "click_not_found");
    assert_eq!(attr_s(item, "eventId"), "conv-1", "the first postback wins");
    assert_eq!(
        item["duplicateEventIds"],
        AttributeValue::Ss(vec!["conv-1b".into()])
    );
    assert!(c.contains_key("~awaiting#click-1"), "waiting for its click");
    // Delivered again: nothing changes (the duplicate's click does not take
    // over the first postback's conversion).
    let r = adtrack_consumer::lambda::handle(&client, &tables, first).await;
    assert!(r.batch_item_failures.is_empty());
    let again = conversions().await;
    assert_eq!(again["212312#T-1"], c["212312#T-1"]);

    // The click arrives: the waiting conversion is attributed, its marker gone.
    let late = kinesis_event(&[("12", click("click-1", t - 120_000))]);
    let r = adtrack_consumer::lambda::handle(&client, &tables, late).await;
    assert!(r.batch_item_failures.is_empty());
    let c = conversions().await;
    let item = &c["212312#T-1"];
    assert_eq!(item["attributed"], AttributeValue::Bool(true), "{item:?}");
    assert_eq!(attr_s(item, "clickEventId"), "click-1");
    assert_eq!(item["secondsToConvert"], AttributeValue::N("120".into()));
    assert!(!item.contains_key("reason"));
    assert!(!c.contains_key("~awaiting#click-1"));

    // A conversion whose click is already there is attributed at once; one
    // outside the window is not.
    let next = kinesis_event(&[
        ("13", conversion("conv-2", "T-2", "click-1", t + 60_000)),
        (
            "14",
            conversion("conv-3", "T-3", "click-1", t + 31 * 86_400_000),
        ),
    ]);
    let r = adtrack_consumer::lambda::handle(&client, &tables, next).await;
    assert!(r.batch_item_failures.is_empty());
    let c = conversions().await;
    assert_eq!(c["212312#T-2"]["attributed"], AttributeValue::Bool(true));
    assert_eq!(attr_s(&c["212312#T-3"], "reason"), "outside_window");
    assert_eq!(c.len(), 3, "one item per transaction, no marker left");
    // A page's own event of type click is no click to attribute to.
    let posted = valid_event("click-3", 2, "batch", t);
    let next = kinesis_event(&[
        ("15", posted.encode_to_vec()),
        ("16", conversion("conv-4", "T-4", "click-3", t + 60_000)),
    ]);
    let r = adtrack_consumer::lambda::handle(&client, &tables, next).await;
    assert!(r.batch_item_failures.is_empty());
    assert_eq!(
        attr_s(&conversions().await["212312#T-4"], "reason"),
        "click_not_found"
    );
}

/// A stopping consumer ends a long page at its next part (2,000 items)
/// instead of writing all of it: what it reports done is written, and the
/// rest is left to be read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_batch_ends_at_its_next_part() {
    let stack = Stack::start(1).expect("stack");
    let client = dynamodb_client(&stack.dynamodb.url());
    let records: Vec<adtrack_reader::Record> = (0..3_000)
        .map(|i| adtrack_reader::Record {
            shard_id: "shardId-000000000000".into(),
            sequence_number: format!("{i:05}"),
            data: Bytes::from(event(&format!("stop-{i}"))),
            arrival_ms: None,
        })
        .collect();
    let stop = tokio_util::sync::CancellationToken::new();
    stop.cancel();
    let outcome =
        adtrack_consumer::batch::process(&client, &lambda_tables(), &records, &stop).await;
    let done = outcome.first_failed.expect("stopped before the end");
    assert!(done >= 1_000 && done < records.len(), "{done}");
    let ids: HashSet<String> = event_ids(&stack).await.into_iter().collect();
    for i in 0..done {
        assert!(
            ids.contains(&format!("stop-{i}")),
            "record {i} reported done"
        );
    }
    assert!(ids.len() < records.len(), "the rest was not written");
}

/// The real `consumer-lambda` binary (deployed as `bootstrap`) as Lambda
/// runs it, through a runtime API emulator: the partial batch response on
/// the wire names the first record not written, a poison record is
/// dead-lettered, and each invocation's metrics reach stdout (the
/// function's log) as an embedded metric format document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_binary_answers_through_the_lambda_runtime_api() {
    let stack = Stack::start(1).expect("stack");
    let refused = Arc::new(AtomicU64::new(0));
    let port = unprocessing_proxy(stack.dynamodb.url(), refused.clone()).await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let lambda = LambdaRuntime::start(
        &binary("consumer-lambda"),
        &[
            ("AWS_ENDPOINT_URL_DYNAMODB", endpoint.as_str()),
            ("EVENTS_TABLE", EVENTS_TABLE),
            ("DEAD_LETTER_TABLE", DEAD_LETTER_TABLE),
        ],
    )
    .expect("the function under the runtime emulator");
    let records = [
        ("300", event("wire-1")),
        ("301", b"poison".to_vec()),
        ("302", event("poison-write-2")),
        ("303", event("wire-2")),
    ];
    let records: Vec<(&str, &[u8])> = records.iter().map(|(s, d)| (*s, d.as_slice())).collect();
    let (status, answer) = lambda
        .invoke(&lambda_kinesis_event_json(EVENTS_STREAM, &records))
        .await
        .expect("invoke");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": "302"}]}),
        "retry from the record not written; output: {}",
        lambda.output()
    );
    let ids: HashSet<String> = event_ids(&stack).await.into_iter().collect();
    assert!(ids.contains("wire-1"), "written before the failure");
    assert!(!ids.contains("poison-write-2"), "refused by the proxy");
    let ddb = dynamodb_client(&stack.dynamodb.url());
    let dead = scan_table(&ddb, DEAD_LETTER_TABLE).await.expect("scan");
    assert_eq!(dead.len(), 1);
    assert_eq!(attr_s(&dead[0], "sequenceNumber"), "301");

    let ok = [("400", event("wire-3"))];
    let ok: Vec<(&str, &[u8])> = ok.iter().map(|(s, d)| (*s, d.as_slice())).collect();
    let (status, answer) = lambda
        .invoke(&lambda_kinesis_event_json(EVENTS_STREAM, &ok))
        .await
        .expect("invoke");
    assert_eq!(status, 200);
    assert_eq!(answer, serde_json::json!({"batchItemFailures": []}));

    let output = lambda.output();
    let emf = lambda.emf_documents();
    for doc in &emf {
        assert_eq!(doc["Function"], "consumer-lambda", "{doc}");
        assert_eq!(doc["_aws"]["CloudWatchMetrics"][0]["Namespace"], "adtrack");
    }
    let invocations: HashSet<&str> = emf.iter().filter_map(|d| d["RequestId"].as_str()).collect();
    assert_eq!(invocations.len(), 2, "metrics of each invocation: {output}");
    let batches: Vec<&serde_json::Value> = emf
        .iter()
        .filter(|d| d.get("adtrack_consumer_lambda_batches_total").is_some())
        .map(|d| &d["result"])
        .collect();
    assert_eq!(batches, ["partial", "ok"], "{output}");
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn checkpoint_reaches(stack: &Stack, seq: &str) {
    let ddb = dynamodb_client(&stack.dynamodb.url());
    wait_until(
        "checkpoint past the poison",
        Duration::from_secs(60),
        || async {
            scan_table(&ddb, CHECKPOINT_TABLE)
                .await
                .unwrap_or_default()
                .iter()
                .any(|c| attr_s(c, "sequenceNumber") == seq)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_neither_stall_nor_bloat_the_consumer() {
    let stack = Stack::start(1).expect("stack");
    let mut records = Vec::new();
    // An aggregate with a valid magic and MD5 holding 8,000 empty user records.
    let mut agg = Aggregator::new(1 << 20);
    for _ in 0..8_000 {
        agg.push(UserRecord {
            partition_key: "empty".into(),
            explicit_hash_key: None,
            data: Bytes::new(),
        })
        .expect("fits");
    }
    records.push((agg.finish().to_vec(), "empty-records".into()));
    // An event whose id is 60,000 control characters, alone and aggregated.
    let long_id = "\u{1}".repeat(60_000);
    records.push((event(&long_id), "long-id".into()));
    let mut agg = Aggregator::new(1 << 20);
    for _ in 0..15 {
        agg.push(UserRecord {
            partition_key: "long-ids".into(),
            explicit_hash_key: None,
            data: Bytes::from(event(&long_id)),
        })
        .expect("fits");
    }
    records.push((agg.finish().to_vec(), "long-ids".into()));
    let sizes: Vec<usize> = records.iter().map(|(d, _)| d.len()).collect();
    // Then 300 valid events.
    records.extend(mixed("valid", 300));
    let seqs = put(&stack, records).await;
    let mut poller = start_poller(&stack, &[]);

    let sent: HashSet<String> = (0..300).map(|i| format!("valid-{i}")).collect();
    wait_until(
        "the 300 valid events written",
        Duration::from_secs(90),
        || async { event_ids(&stack).await.len() >= 300 },
    )
    .await;
    let landed: HashSet<String> = event_ids(&stack).await.into_iter().collect();
    assert_eq!(landed, sent, "exactly the valid events, each once");
    checkpoint_reaches(&stack, seqs.last().expect("seq")).await;

    let ddb = dynamodb_client(&stack.dynamodb.url());
    let dead = scan_table(&ddb, DEAD_LETTER_TABLE).await.expect("scan");
    assert_eq!(dead.len(), 3, "one dead letter per poison record");
    for d in &dead {
        let reason = attr_s(d, "reason");
        assert!(
            reason.len() <= 512,
            "a bounded reason: {} bytes",
            reason.len()
        );
        assert!(!reason.contains('\u{1}'), "the reason copies no input");
        assert!(d["data"].as_b().expect("raw bytes").as_ref().len() <= 300 * 1024);
        let n: usize = d["dataBytes"]
            .as_n()
            .expect("length")
            .parse()
            .expect("number");
        assert!(sizes.contains(&n), "the original length is kept");
        assert_eq!(attr_s(d, "dataMd5").len(), 32);
    }
    let empties = dead
        .iter()
        .find(|d| d["events"].as_n().ok().map(String::as_str) == Some("8000"))
        .expect("the aggregate of empty records");
    assert_eq!(empties["badEvents"].as_n().expect("count"), "8000");

    let peak = peak_rss_kib(poller.proc.pid());
    assert!(peak > 0 && peak < 128 * 1024, "peak RSS {peak} KiB");
    assert!(
        poller.proc.wait_exit(Duration::ZERO).is_none(),
        "the same process keeps running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_dynamodb_refuses_for_good_is_dead_lettered_not_retried() {
    let stack = Stack::start(1).expect("stack");
    // DynamoDB refuses any call carrying an event whose id starts with
    // `refused-` as invalid, as it does an item it cannot store.
    let port = intercepting_proxy(stack.dynamodb.url(), |target, body| {
        let refused = target.ends_with(".BatchWriteItem")
            && String::from_utf8_lossy(body).contains(r#""S":"refused-"#);
        if refused {
            Intercept::error(
                "ValidationException",
                "One or more parameter values were invalid",
            )
        } else {
            Intercept::pass(body)
        }
    })
    .await;
    let mut records = mixed("ok-a", 30);
    records.push((event("refused-1"), "refused-1".into()));
    records.push((event("refused-2"), "refused-2".into()));
    records.extend(mixed("ok-b", 30));
    let seqs = put(&stack, records).await;
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut poller = start_poller(&stack, &[("AWS_ENDPOINT_URL_DYNAMODB", endpoint.as_str())]);

    let sent: HashSet<String> = (0..30)
        .flat_map(|i| [format!("ok-a-{i}"), format!("ok-b-{i}")])
        .collect();
    wait_until(
        "every other event written",
        Duration::from_secs(60),
        || async { event_ids(&stack).await.len() >= 60 },
    )
    .await;
    let landed: HashSet<String> = event_ids(&stack).await.into_iter().collect();
    assert_eq!(landed, sent);
    checkpoint_reaches(&stack, seqs.last().expect("seq")).await;
    let ddb = dynamodb_client(&stack.dynamodb.url());
    let dead = scan_table(&ddb, DEAD_LETTER_TABLE).await.expect("scan");
    assert_eq!(dead.len(), 2, "one dead letter per refused event's record");
    assert!(
        dead.iter()
            .all(|d| attr_s(d, "reason").contains("ValidationException")),
        "{dead:?}"
    );
    assert!(poller.proc.wait_exit(Duration::ZERO).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_split_and_a_merge_latest_skips_nothing_in_the_children() {
    let stack = Stack::start(1).expect("stack");
    // Started at `latest` on an empty stream: the first shard starts at its tip.
    let _poller = start_poller(
        &stack,
        &[
            ("CONSUMER_START_POSITION", "latest"),
            ("CONSUMER_LEASE_SECS", "3"),
        ],
    );
    wait_until("the shard leased", Duration::from_secs(30), || async {
        !lease_owners(&stack).await.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    put(&stack, mixed("parent", 50)).await;
    wait_until("the parent's events", Duration::from_secs(60), || async {
        event_ids(&stack).await.len() >= 50
    })
    .await;

    // Split the shard; events go to the children at once, before the
    // poller has read the parent to its end and started them.
    adtrack_testkit::split_first_shard(&stack.kinesis.url()).await;
    put(&stack, mixed("child", 200)).await;
    // Merge the two children; the merged shard has two parents.
    adtrack_testkit::merge_split_children(&stack.kinesis.url()).await;
    put(&stack, mixed("merged", 100)).await;

    let sent: HashSet<String> = (0..50)
        .map(|i| format!("parent-{i}"))
        .chain((0..200).map(|i| format!("child-{i}")))
        .chain((0..100).map(|i| format!("merged-{i}")))
        .collect();
    wait_until(
        "every event after the reshards",
        Duration::from_secs(90),
        || async { event_ids(&stack).await.len() >= sent.len() },
    )
    .await;
    let landed: HashSet<String> = event_ids(&stack).await.into_iter().collect();
    assert_eq!(landed, sent, "every event of every shard, each once");
}
