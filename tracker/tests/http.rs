//! The tracker process against real Redis and the Kinesis stand-in: routes,
//! replies, bad input, and core-data pushes seen without a restart.

use adtrack_proto::program::{Program, ProgramId};
use adtrack_testkit::{Http, Stack, metric_sum};

mod support;

use support::{Tracker, load_programs, wait_status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_replies_and_pushed_updates() {
    let stack = Stack::start(1).expect("stack");
    let store = load_programs(&stack).await;
    let t = Tracker::start(&stack, &[]).await;
    let http = Http::new();

    // The reference design's JSON reply, field for field.
    let r = http
        .request(
            "GET",
            &format!("{}/event/212312", t.base),
            &[("user-agent", "Mozilla/5.0 test")],
            b"",
        )
        .await
        .expect("event");
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["programId"], "212312");
    assert_eq!(j["programName"], "program1");
    assert_eq!(j["checksum"], "123");
    assert_eq!(j["customerId"], 9123);
    assert_eq!(j["customerName"], "Customer1");
    assert_eq!(j["userAgent"], "Mozilla/5.0 test");
    assert_eq!(j["valid"], true);
    let id = j["messageId"].as_str().expect("messageId");
    assert_eq!(uuid_version(id), Some(7));

    // Unknown, disabled, malformed.
    let r = http
        .get(&format!("{}/event/999999", t.base))
        .await
        .expect("get");
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (404, Some("unknown_program"))
    );
    let r = http
        .get(&format!("{}/event/212315", t.base))
        .await
        .expect("get");
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (404, Some("inactive_program"))
    );
    for bad in ["bad%20id", "x%zz", &"9".repeat(65)] {
        let r = http
            .get(&format!("{}/event/{bad}", t.base))
            .await
            .expect("get");
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.json()["reason"].as_str().is_some_and(|s| !s.is_empty()));
    }
    let r = http
        .get(&format!("{}/event/212312?a=%zz", t.base))
        .await
        .expect("get");
    assert_eq!(r.status, 400);
    assert_eq!(
        status_of(&http, &format!("{}/cache/purge", t.base)).await,
        404
    );
    let r = http
        .request("POST", &format!("{}/event/212312", t.base), &[], b"")
        .await
        .expect("post");
    assert_eq!(r.status, 405);

    // Pixel: the GIF always, an event id only when an event was shipped.
    for (id, shipped) in [("212312", true), ("999999", false), ("bad%20id", false)] {
        let r = http
            .get(&format!("{}/v1/pixel/{id}", t.base))
            .await
            .expect("pixel");
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 43);
        assert!(r.body.starts_with(b"GIF89a"));
        assert_eq!(r.header("content-type").as_deref(), Some("image/gif"));
        assert_eq!(
            r.header("cache-control").as_deref(),
            Some("no-cache, no-store, must-revalidate")
        );
        assert_eq!(r.header("x-event-id").is_some(), shipped, "{id}");
    }
    let r = http
        .request("HEAD", &format!("{}/v1/pixel/212312", t.base), &[], b"")
        .await
        .expect("head");
    assert_eq!((r.status, r.body.len()), (200, 0));

    // Pushes: disable, delete, and create a program seen as unknown a moment ago.
    let mut p1 = Program::from_json(&serde_json::json!({
        "programId":"212312","programName":"program1","checksum":"123","customerId":"9123",
        "customerName":"Customer1","valid":false
    }))
    .expect("program");
    store.put(&p1).await.expect("put");
    let url = format!("{}/event/212312", t.base);
    wait_status(&http, &url, 404).await;
    p1.valid = true;
    store.put(&p1).await.expect("put");
    wait_status(&http, &url, 200).await;

    store
        .delete(&ProgramId::parse("212313").expect("id"), 0)
        .await
        .expect("delete");
    wait_status(&http, &format!("{}/event/212313", t.base), 404).await;

    assert_eq!(
        status_of(&http, &format!("{}/event/brand-new", t.base)).await,
        404
    );
    let fresh = Program::from_json(&serde_json::json!({
        "programId":"brand-new","programName":"n","checksum":"1","customerId":1,"customerName":"c"
    }))
    .expect("program");
    store.put(&fresh).await.expect("put");
    wait_status(&http, &format!("{}/event/brand-new", t.base), 200).await;

    let metrics = http
        .get(&format!("{}/metrics", t.admin))
        .await
        .expect("metrics")
        .text();
    assert!(
        metric_sum(
            &metrics,
            "adtrack_pubsub_changes_total",
            &["result=\"applied\""]
        ) >= 4.0
    );
    assert!(metric_sum(&metrics, "adtrack_hits_total", &["outcome=\"valid\""]) >= 3.0);
    assert!(
        metric_sum(
            &metrics,
            "adtrack_http_requests_total",
            &["route=\"event\"", "status=\"400\""]
        ) >= 4.0
    );
}

fn uuid_version(s: &str) -> Option<u8> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    (hex.len() == 32)
        .then(|| u8::from_str_radix(&hex[12..13], 16).ok())
        .flatten()
}

async fn status_of(http: &Http, url: &str) -> u16 {
    http.get(url).await.expect("request").status
}
