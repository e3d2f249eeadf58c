//! The rest of the public surface on the real process: click redirects and
//! their allow-list, batch and beacon POSTs, CORS, privacy signals, bots,
//! and the events they put in the stream.

mod support;

use adtrack_testkit::{Http, Stack};
use support::{Tracker, load_programs, stream_events};

async fn setup(extra: &[(&str, &str)]) -> (Stack, Tracker) {
    let stack = Stack::start(1).expect("stack");
    load_programs(&stack).await;
    let t = Tracker::start(&stack, extra).await;
    (stack, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn click_redirects_only_to_allowed_hosts() {
    let (stack, t) = setup(&[]).await;
    let http = Http::new();
    let click =
        |id: &str, url: &str| format!("{}/v1/click/{id}?url={}&campaign=x", t.base, percent(url));
    let r = http
        .get(&click(
            "summer-sale",
            "https://shop.example.com/deal?a=1#top",
        ))
        .await
        .expect("click");
    assert_eq!(r.status, 302);
    let event_id = r.header("x-event-id").expect("event id");
    // The click id rides along for the advertiser's postback; the
    // destination's own query and fragment are kept.
    assert_eq!(
        r.header("location"),
        Some(format!(
            "https://shop.example.com/deal?a=1&adtrack_click_id={event_id}#top"
        ))
    );
    let r = http
        .get(&click("summer-sale", "https://m.shop.example.com/"))
        .await
        .expect("click");
    assert_eq!(r.status, 302, "subdomains by wildcard");

    for bad in [
        "https://evil.example/",
        "https://shop.example.com.evil.example/",
        "https://shop.example.com@evil.example/",
        "//evil.example/",
        "javascript:alert(1)",
        "ftp://shop.example.com/",
        "not a url",
    ] {
        let r = http.get(&click("summer-sale", bad)).await.expect("click");
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(r.header("location").is_none());
    }
    let r = http
        .get(&format!("{}/v1/click/summer-sale", t.base))
        .await
        .expect("click");
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("missing_url"))
    );
    // A program with no allowed hosts redirects nowhere.
    let r = http
        .get(&click("212312", "https://shop.example.com/"))
        .await
        .expect("click");
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("redirect_not_allowed"))
    );
    let r = http
        .get(&click("999999", "https://shop.example.com/"))
        .await
        .expect("click");
    assert_eq!(r.status, 404);

    let found = stream_events(&stack, std::slice::from_ref(&event_id)).await;
    let e = &found[&event_id];
    assert_eq!(e.destination_url, "https://shop.example.com/deal?a=1#top");
    assert_eq!(e.event_type, 2, "click");
    assert_eq!(e.extra.get("campaign").map(String::as_str), Some("x"));
    assert_eq!(e.source, "click");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_and_beacon_posts_with_per_event_results() {
    let (stack, t) = setup(&[
        ("TRACKER_CORS_ORIGINS", "https://shop.example.com"),
        ("TRACKER_MAX_BATCH_EVENTS", "10"),
    ])
    .await;
    let http = Http::new();
    let url = t.url("/v1/events");
    let body = r#"[
        {"programId":"212312","type":"conversion","page":"https://shop.example.com/thanks","params":{"order":"o-1"}},
        {"programId":"999999"},
        {"programId":"bad id"},
        {"programId":"212315"},
        {"programId":"212313","colour":"red","size":42,"ok":true,"none":null},
        {"programId":"212313","type":"teleport"},
        {"programId":"212313","nested":{"a":1}},
        {"programId":"212313","order":"x","params":{"order":"y"}}
    ]"#;
    let r = http
        .request(
            "POST",
            &url,
            &[
                ("content-type", "application/json"),
                ("origin", "https://shop.example.com"),
            ],
            body.as_bytes(),
        )
        .await
        .expect("post");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("access-control-allow-origin").as_deref(),
        Some("https://shop.example.com")
    );
    let j = r.json();
    assert_eq!(
        (j["accepted"].as_u64(), j["rejected"].as_u64()),
        (Some(2), Some(6))
    );
    let results = j["results"].as_array().expect("results");
    let errors: Vec<&str> = results
        .iter()
        .map(|r| r["error"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        errors,
        vec![
            "",
            "unknown_program",
            "malformed_program_id",
            "inactive_program",
            "",
            "bad_query",
            "bad_body",
            "bad_body"
        ]
    );
    // Only what cannot be stored is refused, and the reply names the field.
    assert!(
        results[6]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("nested"))
    );
    assert!(
        results[7]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("order"))
    );
    let conversion_id = results[0]["eventId"].as_str().expect("id").to_owned();
    let extra_id = results[4]["eventId"].as_str().expect("id").to_owned();

    // sendBeacon: text/plain JSON lines, no preflight; a field the tracker
    // does not know is kept, not a reason to lose the event.
    let beacon = "{\"programId\":\"212313\",\"type\":\"viewable\"}\n{\"programId\":\"212314\",\"src\":\"newsletter\"}\n";
    let r = http
        .request(
            "POST",
            &url,
            &[("content-type", "text/plain;charset=UTF-8")],
            beacon.as_bytes(),
        )
        .await
        .expect("beacon");
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["accepted"], 2);
    let beacon_ids: Vec<String> = j["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| r["eventId"].as_str().expect("id").to_owned())
        .collect();

    // Preflight: allowed origin answered, others refused.
    let r = http
        .request(
            "OPTIONS",
            &url,
            &[
                ("origin", "https://shop.example.com"),
                ("access-control-request-method", "POST"),
            ],
            b"",
        )
        .await
        .expect("preflight");
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-methods").as_deref(),
        Some("POST")
    );
    let r = http
        .request("OPTIONS", &url, &[("origin", "https://evil.example")], b"")
        .await
        .expect("preflight");
    assert_eq!(r.status, 403);

    // Whole-body errors.
    for (body, want) in [("[{", 400), ("", 400), ("{\"programId\":\"1\"}\nnope", 400)] {
        let r = http
            .request("POST", &url, &[], body.as_bytes())
            .await
            .expect("post");
        assert_eq!(r.status, want, "{body:?}: {}", r.text());
    }
    let many: Vec<String> = (0..11)
        .map(|_| "{\"programId\":\"212312\"}".to_owned())
        .collect();
    let r = http
        .request("POST", &url, &[], many.join("\n").as_bytes())
        .await
        .expect("post");
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (413, Some("too_many_events"))
    );
    let r = http.get(&url).await.expect("get");
    assert_eq!(r.status, 405);

    let mut ids = beacon_ids.clone();
    ids.push(conversion_id.clone());
    ids.push(extra_id.clone());
    let found = stream_events(&stack, &ids).await;
    let conv = &found[&conversion_id];
    assert_eq!(conv.event_type, 3, "conversion");
    assert_eq!(conv.page_url, "https://shop.example.com/thanks");
    assert_eq!(conv.extra.get("order").map(String::as_str), Some("o-1"));
    assert_eq!(conv.source, "batch");
    assert_eq!(found[&beacon_ids[0]].event_type, 4, "viewable");
    assert_eq!(
        found[&beacon_ids[1]].extra.get("src").map(String::as_str),
        Some("newsletter")
    );
    let extra = &found[&extra_id].extra;
    for (k, v) in [("colour", "red"), ("size", "42"), ("ok", "true")] {
        assert_eq!(extra.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(!extra.contains_key("none"), "null carries nothing");
    assert_eq!(
        adtrack_testkit::metric_sum(&t.metrics().await, "adtrack_batch_extra_fields_total", &[]),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_signals_strip_identifiers_and_bots_are_flagged() {
    let (stack, t) = setup(&[("TRACKER_TRUSTED_PROXY_HOPS", "1")]).await;
    let http = Http::new();
    let chrome = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";
    let url = t.url("/v1/pixel/212312?uid=u-42&campaign=c");
    let plain = http
        .request(
            "GET",
            &url,
            &[
                ("user-agent", chrome),
                ("x-forwarded-for", "203.0.113.77, 198.51.100.23"),
            ],
            b"",
        )
        .await
        .expect("pixel")
        .header("x-event-id")
        .expect("id");
    let dnt = http
        .request(
            "GET",
            &url,
            &[
                ("user-agent", chrome),
                ("dnt", "1"),
                ("x-forwarded-for", "198.51.100.23"),
            ],
            b"",
        )
        .await
        .expect("pixel")
        .header("x-event-id")
        .expect("id");
    let gpc_bot = http
        .request(
            "GET",
            &url,
            &[
                (
                    "user-agent",
                    "Googlebot/2.1 (+http://www.google.com/bot.html)",
                ),
                ("sec-gpc", "1"),
            ],
            b"",
        )
        .await
        .expect("pixel")
        .header("x-event-id")
        .expect("id");
    let found = stream_events(&stack, &[plain.clone(), dnt.clone(), gpc_bot.clone()]).await;

    let p = &found[&plain];
    assert_eq!(
        p.client_ip, "198.51.100.0",
        "from the trusted hop, truncated to /24"
    );
    assert_eq!(p.user_agent, chrome);
    assert_eq!(p.extra.get("uid").map(String::as_str), Some("u-42"));
    assert!(!p.privacy_restricted && !p.is_bot);

    let d = &found[&dnt];
    assert!(d.privacy_restricted);
    assert!(d.client_ip.is_empty() && d.user_agent.is_empty());
    assert!(!d.extra.contains_key("uid"), "identifier params dropped");
    assert_eq!(d.extra.get("campaign").map(String::as_str), Some("c"));

    let b = &found[&gpc_bot];
    assert!(
        b.privacy_restricted && b.is_bot,
        "bots are flagged, even when stripped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_skip_ships_nothing() {
    let (_stack, t) = setup(&[("TRACKER_PRIVACY_SIGNALS", "skip")]).await;
    let http = Http::new();
    let r = http
        .request("GET", &t.url("/v1/pixel/212312"), &[("dnt", "1")], b"")
        .await
        .expect("pixel");
    assert_eq!(r.body.len(), 43);
    assert!(r.header("x-event-id").is_none());
    let m = t.metrics().await;
    assert_eq!(
        adtrack_testkit::metric_sum(
            &m,
            "adtrack_events_dropped_total",
            &["cause=\"privacy_opt_out\""]
        ),
        1.0
    );
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Another prefix for the public routes (paths ad blockers do not list):
/// the routes answer under it and without it; health has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_routes_answer_under_a_configured_prefix() {
    let (stack, t) = setup(&[("TRACKER_PATH_PREFIX", "/t/x")]).await;
    let http = Http::new();
    let prefixed = http
        .get(&t.url("/t/x/v1/pixel/212312?campaign=p"))
        .await
        .expect("pixel");
    assert_eq!(prefixed.status, 200);
    let id = prefixed.header("x-event-id").expect("an event");
    let plain = http.get(&t.url("/v1/pixel/212312")).await.expect("pixel");
    assert!(
        plain.header("x-event-id").is_some(),
        "the default paths still work"
    );
    let tag = http.get(&t.url("/t/x/v1/tag.js")).await.expect("tag");
    assert_eq!(tag.status, 200);
    for path in [
        "/t/x/health/live",
        "/t/v1/pixel/212312",
        "/t/xv1/pixel/212312",
    ] {
        let r = http.get(&t.url(path)).await.expect("get");
        assert_eq!(r.status, 404, "{path}");
    }
    let found = stream_events(&stack, &[id]).await;
    assert_eq!(
        found.values().next().map(|e| e.source.as_str()),
        Some("pixel")
    );
}

/// Consent strings on a hit: the state recorded on every event, and under
/// `TRACKER_CONSENT=enforce` the identifiers dropped without storage and
/// measurement consent where the GDPR applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_is_recorded_and_enforced() {
    // TCF v2 strings: purposes 1, 2, 3, 7 (storage and measurement), and
    // 1, 2, 3 only.
    const GRANTED: &str = "COvFyGBOvFyGBAbAAAENAPCAAOIAAAAAAAAAAEEUACCKAAA";
    const DENIED: &str = "COvFyGBOvFyGBAbAAAENAPCAAOAAAAAAAAAAAEEUACCKAAA";
    let (stack, t) = setup(&[("TRACKER_CONSENT", "enforce")]).await;
    let http = Http::new();
    let hit = |query: String| {
        let http = &http;
        let url = t.url(&format!("/v1/pixel/212312?uid=u-1&{query}"));
        async move {
            http.request(
                "GET",
                &url,
                &[("user-agent", "Mozilla/5.0 (X11) Firefox/133.0")],
                b"",
            )
            .await
            .expect("pixel")
            .header("x-event-id")
            .expect("an event")
        }
    };
    let granted = hit(format!("gdpr=1&gdpr_consent={GRANTED}")).await;
    let denied = hit(format!("gdpr=1&gdpr_consent={DENIED}")).await;
    let gpp_granted = hit(format!("gpp=DBABM~{GRANTED}&gpp_sid=2")).await;
    let none = hit("gdpr=0".into()).await;
    let unreadable = hit("gdpr=1&gdpr_consent=zz".into()).await;
    let found = stream_events(
        &stack,
        &[&granted, &denied, &gpp_granted, &none, &unreadable],
    )
    .await;
    use adtrack_proto::v1::ConsentState;
    for (id, state, kept) in [
        (&granted, ConsentState::Granted, true),
        (&gpp_granted, ConsentState::Granted, true),
        (&none, ConsentState::NotApplicable, true),
        (&denied, ConsentState::Denied, false),
        (&unreadable, ConsentState::Unreadable, false),
    ] {
        let e = &found[id];
        assert_eq!(e.consent, state as i32, "{state:?}");
        assert_eq!(!e.client_ip.is_empty(), kept, "client IP, {state:?}");
        assert_eq!(!e.user_agent.is_empty(), kept, "user agent, {state:?}");
        assert_eq!(
            e.extra.contains_key("uid"),
            kept,
            "identifier parameter, {state:?}"
        );
        assert_eq!(e.privacy_restricted, !kept);
    }
}

/// The first-party cookie (opt-in): made and set once, read back after,
/// on the events; never with DNT or without consent where it applies, and
/// never when the setting is off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_party_id_is_kept_only_where_allowed() {
    const DENIED: &str = "COvFyGBOvFyGBAbAAAENAPCAAOAAAAAAAAAAAEEUACCKAAA";
    let (stack, t) = setup(&[
        ("TRACKER_USER_COOKIE", "true"),
        ("TRACKER_USER_COOKIE_DOMAIN", "tracker.example.com"),
        ("TRACKER_USER_COOKIE_DAYS", "30"),
    ])
    .await;
    let http = Http::new();
    let pixel = |query: &'static str, headers: Vec<(&'static str, String)>| {
        let http = &http;
        let url = t.url(&format!("/v1/pixel/212312?{query}"));
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            http.request("GET", &url, &h, b"").await.expect("pixel")
        }
    };
    let first = pixel("a=1", vec![]).await;
    let set = first.header("set-cookie").expect("a cookie is set");
    let uid = set
        .strip_prefix("adtrack_uid=")
        .and_then(|s| s.split(';').next())
        .expect("adtrack_uid")
        .to_owned();
    assert_eq!(uid.len(), 32);
    for attr in [
        "Max-Age=2592000",
        "Secure",
        "HttpOnly",
        "SameSite=None",
        "Domain=tracker.example.com",
    ] {
        assert!(set.contains(attr), "{attr} in {set}");
    }
    let again = pixel("a=2", vec![("cookie", format!("x=1; adtrack_uid={uid}"))]).await;
    assert!(again.header("set-cookie").is_none(), "kept, not set again");
    let dnt = pixel("a=3", vec![("dnt", "1".into())]).await;
    assert!(dnt.header("set-cookie").is_none(), "not with DNT");
    let denied = pixel(
        "gdpr=1&gdpr_consent=COvFyGBOvFyGBAbAAAENAPCAAOAAAAAAAAAAAEEUACCKAAA",
        vec![],
    )
    .await;
    assert!(
        denied.header("set-cookie").is_none(),
        "not without consent: {DENIED}"
    );
    let ids: Vec<String> = [&first, &again, &dnt, &denied]
        .iter()
        .map(|r| r.header("x-event-id").expect("event"))
        .collect();
    let found = stream_events(&stack, &ids).await;
    assert_eq!(found[&ids[0]].user_id, uid);
    assert_eq!(found[&ids[1]].user_id, uid, "read back from the cookie");
    assert_eq!(found[&ids[2]].user_id, "");
    assert_eq!(found[&ids[3]].user_id, "");

    // Off by default.
    let (_stack, plain) = setup(&[]).await;
    let r = http
        .get(&plain.url("/v1/pixel/212312"))
        .await
        .expect("pixel");
    assert!(r.header("set-cookie").is_none());
}
