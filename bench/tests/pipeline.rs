//! The whole pipeline, end to end, on real parts: redis-server, the Kinesis
//! and DynamoDB stand-ins, and the tracker, consumer and updater binaries.
//! Every valid hit must land in DynamoDB exactly once, nothing else may, the
//! tracker's counters must agree, and a replay must not duplicate.

use std::collections::HashSet;
use std::time::Duration;

mod support;

use adtrack_testkit::{
    EVENTS_TABLE, Http, Stack, attr_s, dynamodb_client, metric_sum, scan_table, wait_until,
};
use support::{forget_checkpoints, metrics, start, start_pipeline};

const HITS: usize = 5_000;
const VALID_IDS: [&str; 4] = ["212312", "212313", "212314", "summer-sale"];

#[derive(Debug, Default)]
struct Sent {
    event_ids: Vec<String>,
    unknown: usize,
    inactive: usize,
    malformed: usize,
}

/// Hit `i` of the mix: 60% valid (JSON and pixel), the rest unknown,
/// disabled or malformed.
fn hit(i: usize) -> (String, &'static str) {
    let valid = VALID_IDS[i % VALID_IDS.len()];
    match i % 20 {
        0..=7 => (
            format!("/event/{valid}?type=impression&campaign=c{}", i % 7),
            "valid",
        ),
        8..=11 => (
            format!("/v1/pixel/{valid}?type=click&page=https%3A%2F%2Fshop.example.com%2F"),
            "valid",
        ),
        12 | 13 => (format!("/event/unknown-{i}"), "unknown"),
        14 => (format!("/v1/pixel/unknown-{i}"), "unknown"),
        15 | 16 => ("/event/212315".to_owned(), "inactive"),
        17 | 18 => (format!("/event/bad%20id{i}"), "malformed"),
        _ => ("/v1/pixel/x%zz".to_owned(), "malformed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_valid_hit_lands_exactly_once_and_replay_does_not_duplicate() {
    let stack = Stack::start(2).expect("stack");
    let (port, tracker, consumer) = start_pipeline(&stack).await;
    let http = Http::new();

    // Send the mix over 16 keep-alive connections.
    let base = format!("http://127.0.0.1:{port}");
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (http, base) = (http.clone(), base.clone());
        tasks.spawn(async move {
            let mut sent = Sent::default();
            for i in (worker..HITS).step_by(16) {
                let (path, kind) = hit(i);
                let r = http
                    .request(
                        "GET",
                        &format!("{base}{path}"),
                        &[("user-agent", "Mozilla/5.0 (X11; Linux x86_64) e2e")],
                        b"",
                    )
                    .await
                    .expect("request");
                match (kind, path.starts_with("/event/")) {
                    ("valid", true) => {
                        assert_eq!(r.status, 200, "{path}: {}", r.text());
                        sent.event_ids.push(
                            r.json()["messageId"]
                                .as_str()
                                .expect("messageId")
                                .to_owned(),
                        );
                    }
                    ("valid", false) => {
                        assert_eq!(r.status, 200);
                        sent.event_ids
                            .push(r.header("x-event-id").expect("event id"));
                    }
                    (kind, is_json) => {
                        let want = match (kind, is_json) {
                            (_, false) => 200,
                            ("malformed", true) => 400,
                            _ => 404,
                        };
                        assert_eq!(r.status, want, "{path}");
                        assert!(
                            r.header("x-event-id").is_none(),
                            "{path} must not ship an event"
                        );
                        match kind {
                            "unknown" => sent.unknown += 1,
                            "inactive" => sent.inactive += 1,
                            _ => sent.malformed += 1,
                        }
                    }
                }
            }
            sent
        });
    }
    let mut sent = Sent::default();
    while let Some(part) = tasks.join_next().await {
        let part = part.expect("worker");
        sent.event_ids.extend(part.event_ids);
        sent.unknown += part.unknown;
        sent.inactive += part.inactive;
        sent.malformed += part.malformed;
    }
    let valid = sent.event_ids.len();
    let distinct: HashSet<&String> = sent.event_ids.iter().collect();
    assert_eq!(distinct.len(), valid, "event ids are unique");
    assert_eq!(valid + sent.unknown + sent.inactive + sent.malformed, HITS);

    // Every valid hit lands in DynamoDB, once.
    let ddb = dynamodb_client(&stack.dynamodb.url());
    wait_until(
        "all events in DynamoDB",
        Duration::from_secs(120),
        || async { scan_table(&ddb, EVENTS_TABLE).await.expect("scan").len() >= valid },
    )
    .await;
    let items = scan_table(&ddb, EVENTS_TABLE).await.expect("scan");
    let landed: HashSet<String> = items.iter().map(|i| attr_s(i, "eventId")).collect();
    assert_eq!(items.len(), valid, "one item per valid hit");
    assert_eq!(landed.len(), valid);
    assert!(
        distinct.iter().all(|id| landed.contains(*id)),
        "every answered event id landed"
    );
    assert!(
        items
            .iter()
            .all(|i| VALID_IDS.contains(&attr_s(i, "programId").as_str())
                && attr_s(i, "validation") == "valid"),
        "only valid programs' events land"
    );
    let clicks = items
        .iter()
        .filter(|i| attr_s(i, "source") == "pixel")
        .count();
    assert!(
        items
            .iter()
            .filter(|i| attr_s(i, "source") == "pixel")
            .all(|i| attr_s(i, "eventType") == "click")
    );
    assert_eq!(
        clicks,
        (0..HITS).filter(|i| (8..=11).contains(&(i % 20))).count()
    );

    // The tracker's counters agree with what the client saw.
    wait_until(
        "tracker delivered everything",
        Duration::from_secs(30),
        || async {
            metric_sum(
                &metrics(&http, &tracker.admin).await,
                "adtrack_events_delivered_total",
                &[],
            ) as usize
                == valid
        },
    )
    .await;
    let m = metrics(&http, &tracker.admin).await;
    let hits = |outcome: &str| {
        metric_sum(
            &m,
            "adtrack_hits_total",
            &[&format!("outcome=\"{outcome}\"")],
        ) as usize
    };
    assert_eq!(hits("valid"), valid);
    assert_eq!(hits("unknown"), sent.unknown);
    assert_eq!(hits("invalid"), sent.inactive);
    assert_eq!(hits("malformed"), sent.malformed);
    assert_eq!(
        metric_sum(&m, "adtrack_events_accepted_total", &[]) as usize,
        valid
    );
    assert_eq!(
        metric_sum(&m, "adtrack_events_dropped_total", &[]) as usize,
        0
    );
    assert_eq!(
        metric_sum(&m, "adtrack_http_requests_total", &[]) as usize,
        HITS
    );
    let puts = metric_sum(&m, "adtrack_kinesis_put_records_calls_total", &[]);
    println!(
        "e2e: {HITS} hits, {valid} events, {puts} PutRecords calls, {} items",
        items.len()
    );

    // Replay: restart the consumer with its checkpoints deleted.
    let mut consumer = consumer;
    consumer.proc.signal(15);
    assert!(
        consumer.proc.wait_exit(Duration::from_secs(20)).is_some(),
        "consumer stops on SIGTERM"
    );
    assert_eq!(
        forget_checkpoints(&ddb).await,
        2,
        "one checkpoint per shard"
    );
    let replay = start(
        &stack,
        "consumer",
        &[("CONSUMER_POLL_INTERVAL_MS", "200".into())],
    );
    wait_until(
        "replayed consumer rewrote every event",
        Duration::from_secs(120),
        || async {
            metric_sum(
                &metrics(&http, &replay.admin).await,
                "adtrack_consumer_items_written_total",
                &[],
            ) as usize
                >= valid
        },
    )
    .await;
    let after = scan_table(&ddb, EVENTS_TABLE).await.expect("scan");
    assert_eq!(after.len(), valid, "a replay overwrites, never duplicates");
    drop(tracker);
}

/// One batch of one event: 32 parameters, the last `last_len` bytes long,
/// the others 2 KiB; returns the event's result.
async fn post_wide_event(http: &Http, base: &str, last_len: usize) -> serde_json::Value {
    let mut params = serde_json::Map::new();
    for i in 0..32 {
        let len = if i == 31 { last_len } else { 2048 };
        params.insert(format!("p{i:02}"), "v".repeat(len).into());
    }
    let body = serde_json::json!([{
        "programId": "summer-sale",
        "type": "impression",
        "page": format!("https://shop.example.com/{}", "a".repeat(200)),
        "referrer": format!("https://news.example.com/{}", "r".repeat(200)),
        "params": params,
    }]);
    let r = http
        .request(
            "POST",
            &format!("{base}/v1/events"),
            &[("content-type", "application/json"), ("user-agent", "e2e")],
            body.to_string().as_bytes(),
        )
        .await
        .expect("post");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["results"][0].clone()
}

/// The size an `event_too_large` rejection names.
fn refused_size(result: &serde_json::Value) -> usize {
    assert_eq!(result["error"], "event_too_large", "{result}");
    let reason = result["reason"].as_str().expect("reason");
    reason
        .trim_start_matches("the event is ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in {reason:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_event_lands_and_one_byte_more_is_refused_up_front() {
    use adtrack_proto::event::MAX_EVENT_BYTES;
    let stack = Stack::start(1).expect("stack");
    let (port, tracker, _consumer) = start_pipeline(&stack).await;
    let http = Http::new();
    let base = format!("http://127.0.0.1:{port}");

    // 32 parameters of 2 KiB are within every per-field bound and together
    // more than the largest event: refused, with the size it came to.
    let over = refused_size(&post_wide_event(&http, &base, 2048).await);
    assert!(over > MAX_EVENT_BYTES, "{over}");
    // Shortening the last value to the exact bound is accepted; one byte
    // longer is refused before anything is acknowledged.
    let fits = 2048 - (over - MAX_EVENT_BYTES);
    assert!(fits > 128, "the value's length keeps its 2-byte varint");
    let largest = post_wide_event(&http, &base, fits).await;
    assert_eq!(largest["status"], "accepted", "{largest}");
    let event_id = largest["eventId"].as_str().expect("event id").to_owned();
    let one_more = post_wide_event(&http, &base, fits + 1).await;
    assert_eq!(refused_size(&one_more), MAX_EVENT_BYTES + 1);
    assert!(one_more.get("eventId").is_none());

    // The largest acceptable event lands whole in the events table.
    let ddb = dynamodb_client(&stack.dynamodb.url());
    wait_until(
        "the largest event in DynamoDB",
        Duration::from_secs(60),
        || async {
            scan_table(&ddb, EVENTS_TABLE)
                .await
                .expect("scan")
                .iter()
                .any(|i| attr_s(i, "eventId") == event_id)
        },
    )
    .await;
    let items = scan_table(&ddb, EVENTS_TABLE).await.expect("scan");
    assert_eq!(items.len(), 1, "only the event that fits was shipped");
    let extra = items[0]["extra"].as_m().expect("extra map");
    assert_eq!(extra.len(), 32);
    assert_eq!(extra["p31"].as_s().expect("p31").len(), fits);
    let m = metrics(&http, &tracker.admin).await;
    assert_eq!(
        metric_sum(
            &m,
            "adtrack_bounds_breached_total",
            &["bound=\"event_bytes\""]
        ),
        2.0
    );
}
