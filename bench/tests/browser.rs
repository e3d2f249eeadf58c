//! A publisher's page in a real headless Chromium (Debian's `chromium`):
//! the tag (`/v1/tag.js`) with a call queued before it loads and one made
//! after, a pixel, and a `navigator.sendBeacon` call carrying a field the
//! tracker does not know; every event lands in DynamoDB with the browser's
//! user agent.

mod support;

use std::time::Duration;

use adtrack_testkit::{EVENTS_TABLE, Proc, Stack, attr_s, dynamodb_client, scan_table, wait_until};
use support::start_pipeline;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The publisher's page; `TRACKER` stands for the tracker's address.
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>A publisher's page</title>
<script>(window.adtrackq = window.adtrackq || []).push(["click", {"button": "buy"}]);</script>
<script async src="TRACKER/v1/tag.js" data-program="summer-sale" data-gdpr="1" data-gdpr-consent="CONSENTSTRING"></script>
<script>
  window.addEventListener("load", function () {
    navigator.sendBeacon("TRACKER/v1/events",
      JSON.stringify({ programId: "212312", type: "custom", src: "newsletter" }));
    setTimeout(function () { window.adtrack.track("viewable", { slot: "top" }); }, 50);
  });
</script></head>
<body><p>Hello.</p><img src="TRACKER/v1/pixel/212313?campaign=browser" width="1" height="1"></body></html>
"#;

/// Serves `page` to every request on a free loopback port.
async fn serve_page(page: String) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let page = page.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    page.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(page.as_bytes()).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tag_and_a_beacon_in_a_real_browser_land_in_dynamodb() {
    let stack = Stack::start(2).expect("stack");
    let (port, _tracker, _consumer) = start_pipeline(&stack).await;
    let tracker = format!("http://127.0.0.1:{port}");
    let page_port = serve_page(PAGE.replace("TRACKER", &tracker)).await;
    let page_url = format!("http://127.0.0.1:{page_port}/shop");
    let profile = tempfile::tempdir().expect("profile dir");
    let chromium = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(&page_url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromium (Debian's package; ./dev/test installs it)");
    let mut chromium = Proc::new(chromium);

    let ddb = dynamodb_client(&stack.dynamodb.url());
    wait_until(
        "the page's five events in DynamoDB",
        Duration::from_secs(90),
        || async {
            scan_table(&ddb, EVENTS_TABLE)
                .await
                .unwrap_or_default()
                .len()
                >= 5
        },
    )
    .await;
    chromium.kill();
    let items = scan_table(&ddb, EVENTS_TABLE).await.expect("scan");
    let find = |program: &str, kind: &str| {
        items
            .iter()
            .find(|i| attr_s(i, "programId") == program && attr_s(i, "eventType") == kind)
            .unwrap_or_else(|| panic!("no {kind} of {program} in {items:?}"))
    };
    let extra =
        |item: &std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>,
         k: &str| {
            item.get("extra")
                .and_then(|v| v.as_m().ok())
                .and_then(|m| m.get(k))
                .and_then(|v| v.as_s().ok())
                .cloned()
                .unwrap_or_default()
        };
    let impression = find("summer-sale", "impression");
    assert_eq!(attr_s(impression, "pageUrl"), page_url);
    assert_eq!(attr_s(impression, "source"), "batch");
    assert_eq!(extra(impression, "gdpr_consent"), "CONSENTSTRING");
    let queued = find("summer-sale", "click");
    assert_eq!(
        extra(queued, "button"),
        "buy",
        "a call queued before the tag loaded"
    );
    let later = find("summer-sale", "viewable");
    assert_eq!(extra(later, "slot"), "top");
    let beacon = find("212312", "custom");
    assert_eq!(
        extra(beacon, "src"),
        "newsletter",
        "the unknown field is kept"
    );
    let pixel = find("212313", "impression");
    assert_eq!(extra(pixel, "campaign"), "browser");
    for item in &items {
        let ua = attr_s(item, "userAgent");
        assert!(ua.contains("Chrome/"), "the browser's user agent: {ua:?}");
    }
    assert_eq!(items.len(), 5, "nothing else: {items:?}");
}
