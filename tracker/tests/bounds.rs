//! Every request bound on the real process, each answered with its status
//! and counted: 414, 431, 413, 408 (slow headers, slow body), 503 (too many
//! connections), 400 (malformed requests); idle keep-alive connections
//! outliving the header timeout; and connections that make no progress
//! (silent, never reading, endless request line) losing their slot.

mod support;

use std::time::Duration;

use adtrack_testkit::{Http, Stack, metric_sum};
use support::{Tracker, load_programs, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn setup(extra: &[(&str, &str)]) -> (Stack, Tracker) {
    let stack = Stack::start(1).expect("stack");
    load_programs(&stack).await;
    let t = Tracker::start(&stack, extra).await;
    (stack, t)
}

/// Sends raw bytes and reads until the server closes or 5 s pass.
async fn raw(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(bytes).await.expect("write");
    read_all(&mut s).await
}

async fn read_all<R: AsyncReadExt + Unpin>(s: &mut R) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(resp: &str) -> &str {
    resp.split(' ').nth(1).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bound_has_its_status() {
    let (_stack, t) = setup(&[
        ("TRACKER_MAX_URI_BYTES", "256"),
        ("TRACKER_MAX_HEADER_BYTES", "2048"),
        ("TRACKER_MAX_BODY_BYTES", "1024"),
        ("TRACKER_HEADER_TIMEOUT_SECS", "1"),
        ("TRACKER_BODY_TIMEOUT_SECS", "1"),
        ("TRACKER_IDLE_TIMEOUT_SECS", "30"),
    ])
    .await;
    let http = Http::new();

    // 414: request target too long.
    let r = http
        .get(&t.url(&format!("/v1/pixel/212312?x={}", "a".repeat(300))))
        .await
        .expect("get");
    assert_eq!(r.status, 414);
    // 431: head too large (read raw: the server closes after answering).
    let big = "b".repeat(3000);
    let resp = raw(
        t.port,
        format!("GET /v1/pixel/1 HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status(&resp), "431", "{resp}");
    // 413: body too large, declared or streamed.
    let r = http
        .request("POST", &t.url("/v1/events"), &[], &vec![b' '; 2000])
        .await
        .expect("post");
    assert_eq!(r.status, 413);
    let resp = raw(
        t.port,
        format!("POST /v1/events HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n", " ".repeat(0x800)).as_bytes(),
    )
    .await;
    assert_eq!(status(&resp), "413", "{resp}");
    // 408: headers started but never finished.
    let resp = raw(t.port, b"GET /v1/pixel/212312 HTTP/1.1\r\nhost: x\r\n").await;
    assert_eq!(status(&resp), "408", "{resp}");
    // 408: body announced but not sent.
    let resp = raw(
        t.port,
        b"POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"progr",
    )
    .await;
    assert_eq!(status(&resp), "408", "{resp}");
    // 400: malformed request line, bad percent-encoding, duplicate parameters.
    let resp = raw(t.port, b"GARBAGE\r\n\r\n").await;
    assert_eq!(status(&resp), "400", "{resp}");
    for q in ["a=%zz", "a=%ff%fe", "a=1&a=2", "=x"] {
        let r = http
            .get(&t.url(&format!("/event/212312?{q}")))
            .await
            .expect("get");
        assert_eq!(r.status, 400, "{q}");
    }

    // An idle keep-alive connection outlives the header timeout.
    let mut s = TcpStream::connect(("127.0.0.1", t.port))
        .await
        .expect("connect");
    s.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let resp = read_all(&mut s).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");

    let m = t.metrics().await;
    for bound in [
        "uri_bytes",
        "header_bytes",
        "body_bytes",
        "header_timeout",
        "body_timeout",
        "malformed_request",
    ] {
        assert!(
            metric_sum(
                &m,
                "adtrack_bounds_breached_total",
                &[&format!("bound=\"{bound}\"")]
            ) >= 1.0,
            "{bound} counted"
        );
    }
    for status in ["408", "413", "414", "431", "400"] {
        assert!(
            metric_sum(
                &m,
                "adtrack_http_requests_total",
                &[&format!("status=\"{status}\"")]
            ) >= 1.0,
            "{status} counted"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_get_503() {
    let (_stack, t) = setup(&[("TRACKER_MAX_CONNECTIONS", "2")]).await;
    let _a = TcpStream::connect(("127.0.0.1", t.port)).await.expect("a");
    let _b = TcpStream::connect(("127.0.0.1", t.port)).await.expect("b");
    let port = t.port;
    wait_until(
        "a third connection is refused with 503",
        Duration::from_secs(10),
        || async move {
            let resp = raw(port, b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n").await;
            status(&resp) == "503" && resp.to_ascii_lowercase().contains("retry-after")
        },
    )
    .await;
    let m = t.metrics().await;
    assert!(
        metric_sum(
            &m,
            "adtrack_bounds_breached_total",
            &["bound=\"connections\""]
        ) >= 1.0
    );
}

/// Sends `bytes` from a task of its own (ignoring write errors: the server
/// may close first) and reads what comes back until the server closes.
async fn raw_unread(port: u16, bytes: Vec<u8>) -> String {
    let s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        wr
    });
    let out = read_all(&mut rd).await;
    writer.abort();
    out
}

/// Connections that hold a slot without making progress lose it: a 100 KB
/// request target is answered 414 as it arrives (not 431 once the head is
/// over its bound), a connection that never sends a request is closed
/// after the header timeout (not the idle timeout), and one that never
/// reads its responses is closed after the write timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_make_no_progress_lose_their_slot() {
    let (_stack, t) = setup(&[
        ("TRACKER_HEADER_TIMEOUT_SECS", "1"),
        ("TRACKER_WRITE_TIMEOUT_SECS", "1"),
        ("TRACKER_IDLE_TIMEOUT_SECS", "600"),
    ])
    .await;

    let long = format!(
        "GET /v1/pixel/212312?x={} HTTP/1.1\r\nhost: x\r\n\r\n",
        "a".repeat(100_000)
    );
    let resp = raw_unread(t.port, long.into_bytes()).await;
    assert_eq!(status(&resp), "414", "{resp}");

    // Silent: nothing sent. Closed long before the 600 s idle timeout.
    let mut silent = TcpStream::connect(("127.0.0.1", t.port))
        .await
        .expect("connect");
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(60), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent connection kept its slot: {closed:?}"
    );

    // Never reads: pipelined requests whose answers fill the socket buffers.
    let requests = b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n".repeat(300_000);
    let stuck = TcpStream::connect(("127.0.0.1", t.port))
        .await
        .expect("connect");
    let (_rd, mut wr) = stuck.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&requests).await;
    });
    wait_until(
        "a client that never reads is cut off",
        Duration::from_secs(60),
        || async {
            let m = t.metrics().await;
            metric_sum(
                &m,
                "adtrack_bounds_breached_total",
                &["bound=\"write_timeout\""],
            ) >= 1.0
        },
    )
    .await;
    writer.abort();

    let m = t.metrics().await;
    assert!(
        metric_sum(
            &m,
            "adtrack_bounds_breached_total",
            &["bound=\"silent_connection\""]
        ) >= 1.0,
        "silent connection counted"
    );
    assert!(
        metric_sum(
            &m,
            "adtrack_http_requests_total",
            &["route=\"none\"", "status=\"414\""]
        ) >= 1.0,
        "414 counted"
    );
}
