//! Conversions end to end on real parts: a click, its signed postback, the
//! same postback again, refused postbacks and one naming an unknown click
//! go through the tracker and the consumer; the conversions table holds one
//! attributed and one unattributed item, the refused ones are nowhere, a
//! replay of the stream adds nothing, and a click read after its
//! conversion (a lagging shard) is still matched.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use adtrack_proto::postback::signed_query;
use adtrack_proto::v1::{EventType, TrackingEvent, ValidationOutcome};
use adtrack_testkit::{
    CONVERSIONS_TABLE, EVENTS_STREAM, EVENTS_TABLE, Http, Stack, attr_s, dynamodb_client,
    kinesis_client, metric_sum, scan_table, wait_until,
};
use aws_sdk_dynamodb::types::AttributeValue;
use prost::Message;
use support::{forget_checkpoints, metrics, start, start_pipeline};

/// `summer-sale`'s secret in `dev/programs.json`.
const SECRET: &[u8] = b"dev-postback-secret-summer-sale";

type Item = HashMap<String, AttributeValue>;

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The conversions table's conversion items (not the markers), by id.
async fn conversions(ddb: &aws_sdk_dynamodb::Client) -> HashMap<String, Item> {
    scan_table(ddb, CONVERSIONS_TABLE)
        .await
        .expect("scan")
        .into_iter()
        .filter(|i| i.contains_key("programId"))
        .map(|i| (attr_s(&i, "conversionId"), i))
        .collect()
}

fn attributed(item: &Item) -> Option<bool> {
    item.get("attributed")
        .and_then(|v| v.as_bool().ok())
        .copied()
}

fn duplicates(item: &Item) -> usize {
    item.get("duplicateEventIds")
        .and_then(|v| v.as_ss().ok())
        .map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_click_and_its_postback_make_one_attributed_conversion_exactly_once() {
    let stack = Stack::start(2).expect("stack");
    let (port, tracker, consumer) = start_pipeline(&stack).await;
    let http = Http::new();
    let ddb = dynamodb_client(&stack.dynamodb.url());
    let base = format!("http://127.0.0.1:{port}");
    let postback = |query: &str| format!("{base}/v1/postback/summer-sale?{query}");

    let r = http
        .get(&format!(
            "{base}/v1/click/summer-sale?url=https%3A%2F%2Fshop.example.com%2Fdeal&utm_campaign=winter"
        ))
        .await
        .expect("click");
    assert_eq!(r.status, 302);
    let click_id = r.header("x-event-id").expect("click id");
    assert!(
        r.header("location")
            .is_some_and(|l| l.ends_with(&format!("adtrack_click_id={click_id}")))
    );

    let ts = now_secs();
    let paid = signed_query(
        SECRET,
        &format!("click_id={click_id}&txid=T-1&value=49.90&currency=EUR&ts={ts}"),
    );
    let mut accepted = 0;
    for (query, want) in [
        (paid.clone(), 200),
        // The same postback again: answered, absorbed downstream.
        (paid.clone(), 200),
        (
            format!(
                "click_id={click_id}&txid=T-9&ts={ts}&sig={}",
                "ab".repeat(32)
            ),
            401,
        ),
        (
            signed_query(
                SECRET,
                &format!("click_id={click_id}&txid=T-8&ts={}", ts - 3600),
            ),
            401,
        ),
        (
            signed_query(
                SECRET,
                &format!("click_id=0190aaaa-0000-7000-8000-000000000000&txid=T-2&value=5&ts={ts}"),
            ),
            200,
        ),
    ] {
        let r = http.get(&postback(&query)).await.expect("postback");
        assert_eq!(r.status, want, "{query}: {}", r.text());
        accepted += usize::from(want == 200);
    }

    wait_until(
        "both conversions and the duplicate recorded",
        Duration::from_secs(60),
        || async {
            let c = conversions(&ddb).await;
            c.len() == 2
                && c.get("summer-sale#T-1").is_some_and(|i| duplicates(i) == 1)
                && c.contains_key("summer-sale#T-2")
        },
    )
    .await;
    let c = conversions(&ddb).await;
    let won = &c["summer-sale#T-1"];
    assert_eq!(attributed(won), Some(true), "{won:?}");
    assert_eq!(attr_s(won, "clickEventId"), click_id);
    assert_eq!(attr_s(won, "currency"), "EUR");
    // DynamoDB keeps numbers normalised.
    assert_eq!(won["value"], AttributeValue::N("49.9".into()));
    assert!(won.contains_key("secondsToConvert") && won.contains_key("clickTs"));
    assert_eq!(
        won["clickParams"]
            .as_m()
            .ok()
            .and_then(|m| m.get("utm_campaign"))
            .and_then(|v| v.as_s().ok())
            .map(String::as_str),
        Some("winter"),
        "the click's campaign parameters"
    );
    let lost = &c["summer-sale#T-2"];
    assert_eq!(attributed(lost), Some(false));
    assert_eq!(attr_s(lost, "reason"), "click_not_found");
    // The refused postbacks (T-8, T-9) are nowhere: not in the events
    // table, not among the conversions.
    let events = scan_table(&ddb, EVENTS_TABLE).await.expect("scan");
    let conversion_events = events
        .iter()
        .filter(|e| attr_s(e, "eventType") == "conversion")
        .count();
    assert_eq!(
        conversion_events, accepted,
        "one event per accepted postback"
    );
    assert_eq!(events.len(), accepted + 1, "and the click");

    // A replay of the whole stream adds nothing.
    let before = scan_table(&ddb, CONVERSIONS_TABLE).await.expect("scan");
    let mut consumer = consumer;
    consumer.proc.signal(15);
    assert!(consumer.proc.wait_exit(Duration::from_secs(20)).is_some());
    assert!(forget_checkpoints(&ddb).await >= 1);
    let replay = start(
        &stack,
        "consumer",
        &[("CONSUMER_POLL_INTERVAL_MS", "200".into())],
    );
    wait_until(
        "the replay read every event",
        Duration::from_secs(60),
        // Each postback read again: its own item's (replayed) or a
        // duplicate's.
        || async {
            let m = metrics(&http, &replay.admin).await;
            let seen = |result: &str| {
                metric_sum(
                    &m,
                    "adtrack_consumer_conversions_total",
                    &[&format!("result=\"{result}\"")],
                ) as usize
            };
            seen("replayed") + seen("duplicate") >= accepted
        },
    )
    .await;
    let mut after = scan_table(&ddb, CONVERSIONS_TABLE).await.expect("scan");
    let key = |i: &Item| attr_s(i, "conversionId");
    let strip = |items: &mut Vec<Item>| {
        items.sort_by_key(key);
        for i in items.iter_mut() {
            // The replay may refresh a marker's deadline; nothing else.
            i.remove("awaitUntil");
            i.remove("expiresAt");
        }
    };
    let mut before = before;
    strip(&mut before);
    strip(&mut after);
    assert_eq!(before, after, "a replay changes no conversion");

    // A click read after its conversion: the conversion first, the click
    // later, as a lagging shard would deliver them.
    let late_click = adtrack_proto::event::new_event_id();
    let kinesis = kinesis_client(&stack.kinesis.url());
    let put = |ev: TrackingEvent| {
        let kinesis = kinesis.clone();
        async move {
            kinesis
                .put_record()
                .stream_name(EVENTS_STREAM)
                .partition_key(ev.message_id.clone())
                .data(aws_sdk_kinesis::primitives::Blob::new(ev.encode_to_vec()))
                .send()
                .await
                .expect("put record");
        }
    };
    let now_ms = (now_secs() * 1000) as i64;
    // A valid event of summer-sale, as the tracker ships one.
    let valid = |id: String, kind: EventType, source: &str, ts: i64| TrackingEvent {
        message_id: id,
        programid: "summer-sale".into(),
        customer_id: 42,
        is_valid: true,
        event_type: kind as i32,
        validation: ValidationOutcome::Valid as i32,
        source: source.into(),
        timestamp_ms: ts,
        ..TrackingEvent::default()
    };
    put(TrackingEvent {
        click_id: late_click.clone(),
        transaction_id: "T-3".into(),
        attribution_window_days: 30,
        ..valid(
            adtrack_proto::event::new_event_id(),
            EventType::Conversion,
            "postback",
            now_ms,
        )
    })
    .await;
    wait_until(
        "the early conversion waits for its click",
        Duration::from_secs(60),
        || async {
            conversions(&ddb)
                .await
                .get("summer-sale#T-3")
                .is_some_and(|i| attr_s(i, "reason") == "click_not_found")
        },
    )
    .await;
    put(TrackingEvent {
        extra: [("utm_source".to_owned(), "news".to_owned())].into(),
        ..valid(
            late_click.clone(),
            EventType::Click,
            "click",
            now_ms - 30_000,
        )
    })
    .await;
    wait_until(
        "the late click is matched",
        Duration::from_secs(60),
        || async {
            conversions(&ddb)
                .await
                .get("summer-sale#T-3")
                .is_some_and(|i| attributed(i) == Some(true))
        },
    )
    .await;
    let matched = &conversions(&ddb).await["summer-sale#T-3"];
    assert_eq!(attr_s(matched, "clickEventId"), late_click);
    assert_eq!(matched["secondsToConvert"], AttributeValue::N("30".into()));
    assert!(!matched.contains_key("reason"));
    let markers = scan_table(&ddb, CONVERSIONS_TABLE)
        .await
        .expect("scan")
        .into_iter()
        .filter(|i| attr_s(i, "conversionId") == format!("~awaiting#{late_click}"))
        .count();
    assert_eq!(markers, 0, "a matched click's marker is removed");
    drop(tracker);
}
