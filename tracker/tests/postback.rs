//! Signed postbacks on the real process: what is accepted, what is refused
//! and why, and the conversion event that reaches the stream; click
//! redirects that carry the click id under the program's own parameter.

mod support;

use adtrack_proto::postback::{sign, signed_query};
use adtrack_proto::program::Program;
use adtrack_testkit::{Http, Stack, metric_sum, read_stream_events};
use support::{Tracker, load_programs, stream_events};

/// The secret `dev/programs.json` gives `summer-sale`.
const SECRET: &[u8] = b"dev-postback-secret-summer-sale";

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_postbacks_are_taken_and_everything_else_refused() {
    let stack = Stack::start(1).expect("stack");
    let store = load_programs(&stack).await;
    // A program with its own click id parameter and window.
    let custom = Program::from_json(&serde_json::json!({
        "programId": "spring", "programName": "Spring", "checksum": "1",
        "customerId": 7, "customerName": "Shop", "allowedRedirectHosts": ["shop.example.com"],
        "postbackSecret": "spring-secret-0123456789", "attributionWindowDays": 7,
        "clickIdParam": "clickref"
    }))
    .expect("program");
    store.put(&custom).await.expect("put");
    let t = Tracker::start(&stack, &[]).await;
    let http = Http::new();
    let postback = |program: &str, query: &str| t.url(&format!("/v1/postback/{program}?{query}"));

    // A click on the custom program carries its id as `clickref`.
    let r = http
        .get(&t.url(
            "/v1/click/spring?url=https%3A%2F%2Fshop.example.com%2Fp%3Fsku%3D9&utm_campaign=s1",
        ))
        .await
        .expect("click");
    assert_eq!(r.status, 302);
    let click_id = r.header("x-event-id").expect("click id");
    assert_eq!(
        r.header("location"),
        Some(format!(
            "https://shop.example.com/p?sku=9&clickref={click_id}"
        ))
    );

    // Accepted: 200 with the conversion's event id, again for a repeat.
    let ts = now_secs();
    let q = format!("click_id={click_id}&txid=T-1001&value=49.90&currency=eur&ts={ts}&note=x");
    let good = postback("spring", &signed_query(b"spring-secret-0123456789", &q));
    let r = http.get(&good).await.expect("postback");
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["conversionId"], "spring#T-1001");
    let conversion_id = body["eventId"].as_str().expect("event id").to_owned();
    let r = http.get(&good).await.expect("again");
    assert_eq!(r.status, 200, "a repeated postback is answered again");
    let repeat_id = r.json()["eventId"].as_str().expect("id").to_owned();
    assert_ne!(
        repeat_id, conversion_id,
        "each postback is an event of its own"
    );

    // A browser's privacy signal does not apply to a server's postback.
    let q = format!("txid=T-1002&ts={ts}");
    let r = http
        .request(
            "GET",
            &postback("spring", &signed_query(b"spring-secret-0123456789", &q)),
            &[("dnt", "1")],
            b"",
        )
        .await
        .expect("postback");
    assert_eq!(r.status, 200);
    let with_dnt = r.json()["eventId"].as_str().expect("id").to_owned();

    // Refused, each with its code; none of them ships anything.
    let unsigned = format!("txid=T-1&ts={ts}");
    let cases: Vec<(String, u16, &str)> = vec![
        (postback("summer-sale", &unsigned), 401, "missing_signature"),
        (
            postback("summer-sale", &format!("{unsigned}&sig={}", "0".repeat(64))),
            401,
            "bad_signature",
        ),
        (
            // Signed with another program's secret.
            postback(
                "summer-sale",
                &signed_query(b"spring-secret-0123456789", &unsigned),
            ),
            401,
            "bad_signature",
        ),
        (
            // Tampered after signing.
            postback(
                "summer-sale",
                &signed_query(SECRET, &unsigned).replace("T-1", "T-2"),
            ),
            401,
            "bad_signature",
        ),
        (
            postback(
                "summer-sale",
                &signed_query(SECRET, &format!("txid=T-1&ts={}", ts - 301)),
            ),
            401,
            "expired_timestamp",
        ),
        (
            postback(
                "summer-sale",
                &signed_query(SECRET, &format!("txid=T-1&ts={}", now_secs() + 400)),
            ),
            401,
            "expired_timestamp",
        ),
        (
            postback("212312", &signed_query(SECRET, &unsigned)),
            403,
            "postbacks_disabled",
        ),
        (
            postback("999999", &signed_query(SECRET, &unsigned)),
            404,
            "unknown_program",
        ),
        (
            postback("212315", &signed_query(SECRET, &unsigned)),
            404,
            "inactive_program",
        ),
        (
            postback(
                "summer-sale",
                &signed_query(SECRET, &format!("txid=a%20b&ts={ts}")),
            ),
            400,
            "bad_parameter",
        ),
        (
            postback("summer-sale", &signed_query(SECRET, &format!("ts={ts}"))),
            400,
            "bad_parameter",
        ),
        (
            postback(
                "summer-sale",
                &signed_query(SECRET, "txid=T-1&ts=yesterday"),
            ),
            400,
            "bad_parameter",
        ),
        (
            postback(
                "summer-sale",
                &signed_query(SECRET, &format!("txid=T-1&value=1e3&ts={ts}")),
            ),
            400,
            "bad_parameter",
        ),
        (
            postback(
                "summer-sale",
                &signed_query(SECRET, &format!("txid=T-1&currency=EURO&ts={ts}")),
            ),
            400,
            "bad_parameter",
        ),
        (
            postback(
                "summer-sale",
                &signed_query(SECRET, &format!("txid=T-1&ts={ts}&ts=1")),
            ),
            400,
            "bad_query",
        ),
    ];
    for (url, status, code) in &cases {
        let r = http.get(url).await.expect("postback");
        assert_eq!(
            (r.status, r.json()["error"].as_str()),
            (*status, Some(*code)),
            "{url}: {}",
            r.text()
        );
        assert!(
            !r.text().contains("dev-postback-secret"),
            "no reply shows a secret"
        );
    }
    let r = http
        .request(
            "POST",
            &postback("summer-sale", &signed_query(SECRET, &unsigned)),
            &[],
            b"",
        )
        .await
        .expect("post");
    assert_eq!(r.status, 405);

    // The accepted postbacks are conversion events carrying what they said.
    let found = stream_events(&stack, &[&conversion_id, &repeat_id, &click_id, &with_dnt]).await;
    assert!(!found[&with_dnt].privacy_restricted);
    assert!(!found[&with_dnt].client_ip.is_empty());
    let ev = &found[&conversion_id];
    assert_eq!(ev.event_type, 3, "conversion");
    assert_eq!(ev.source, "postback");
    assert_eq!(ev.click_id, click_id);
    assert_eq!(ev.transaction_id, "T-1001");
    assert_eq!(ev.conversion_value, "49.90");
    assert_eq!(ev.currency, "EUR");
    assert_eq!(ev.attribution_window_days, 7);
    assert_eq!(ev.extra.get("note").map(String::as_str), Some("x"));
    for reserved in ["sig", "ts", "txid", "click_id", "value", "currency"] {
        assert!(
            !ev.extra.contains_key(reserved),
            "{reserved} is not an extra"
        );
    }
    let click = &found[&click_id];
    assert_eq!(
        click.extra.get("utm_campaign").map(String::as_str),
        Some("s1")
    );
    // Three conversions and one click: nothing from the refused ones.
    let all = read_stream_events(&stack.kinesis.url())
        .await
        .expect("stream");
    assert_eq!(all.len(), 4, "refused postbacks ship nothing");

    let metrics = t.metrics().await;
    for (reason, n) in [
        ("missing_signature", 1.0),
        ("bad_signature", 3.0),
        ("expired_timestamp", 2.0),
        ("postbacks_disabled", 1.0),
    ] {
        assert_eq!(
            metric_sum(
                &metrics,
                "adtrack_postbacks_refused_total",
                &[&format!("reason=\"{reason}\"")]
            ),
            n,
            "{reason}"
        );
    }
    assert!(!metrics.contains("dev-postback-secret") && !metrics.contains("spring-secret"));
    // The signature recipe the README gives.
    assert_eq!(
        sign(SECRET, "txid=1").len(),
        64,
        "lowercase hex of a SHA-256 HMAC"
    );
}
