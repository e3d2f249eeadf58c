//! Generated requests on the real tracker process, sized up to and past
//! every limit it has: the request target (8 KiB), the head (16 KiB), the
//! body (256 KiB), events per batch (500), parameters per event (32), their
//! names (64 bytes) and values (2 KiB), the largest event (64 KiB encoded),
//! and arbitrary bytes as a body. Each
//! gets exactly the answer its sizes call for, nothing is answered 5xx, and
//! the process serves on afterwards.

mod support;

use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use support::{Tracker, load_programs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_URI: usize = 8192;
const MAX_HEAD: usize = 16_384;
const MAX_BODY: usize = 262_144;
const MAX_EVENTS: usize = 500;
const MAX_EVENT_BYTES: usize = adtrack_proto::event::MAX_EVENT_BYTES;

/// Sizes near a bound: just under, at, just over, or anywhere up to twice it.
fn near(bound: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(bound - 1),
        Just(bound),
        Just(bound + 1),
        (bound - 16)..(bound + 16),
        0..(2 * bound),
    ]
}

#[derive(Debug, Clone)]
enum Case {
    /// `GET /event/...` whose request target is this long.
    Uri(usize),
    /// A pixel hit whose head carries a header making it about this long.
    Head(usize),
    /// A batch body of exactly this many bytes (one event, long page).
    Body(usize),
    /// A batch of this many small events.
    Events(usize),
    /// One event: parameters, name length, value length.
    Params(usize, usize, usize),
    /// Arbitrary bytes as a batch body.
    Bytes(Vec<u8>),
}

fn case() -> impl Strategy<Value = Case> {
    prop_oneof![
        near(MAX_URI).prop_map(Case::Uri),
        near(MAX_HEAD).prop_map(Case::Head),
        near(MAX_BODY).prop_map(|n| Case::Body(n.max(64))),
        near(MAX_EVENTS).prop_map(Case::Events),
        (30usize..=34, 62usize..=66, 2046usize..=2050).prop_map(|(n, k, v)| Case::Params(n, k, v)),
        proptest::collection::vec(any::<u8>(), 0..(MAX_BODY + 4096)).prop_map(Case::Bytes),
    ]
}

fn post(body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST /v1/events HTTP/1.1\r\nhost: t\r\nconnection: close\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// The request for a case and the statuses it may get.
fn request(case: &Case) -> (Vec<u8>, &'static [&'static str]) {
    match case {
        Case::Uri(len) => {
            let prefix = "/event/212312?";
            let mut target = prefix.to_owned();
            let mut i = 0;
            while target.len() < *len {
                let room = len - target.len();
                let value = room.saturating_sub(5).min(2000);
                target.push_str(&format!("p{i}={}&", "v".repeat(value)));
                i += 1;
            }
            target.truncate((*len).max(prefix.len()));
            let trimmed = target.trim_end_matches(['&', '=']).to_owned();
            let req = format!("GET {trimmed} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n");
            // A cut can leave a name without value or an odd pair: 400 at most.
            let ok: &[&str] = if trimmed.len() > MAX_URI {
                &["414"]
            } else {
                &["200", "400"]
            };
            (req.into_bytes(), ok)
        }
        Case::Head(len) => {
            let base =
                "GET /v1/pixel/212312 HTTP/1.1\r\nhost: t\r\nconnection: close\r\nx-pad: \r\n\r\n";
            let pad = len.saturating_sub(base.len());
            let req = format!(
                "GET /v1/pixel/212312 HTTP/1.1\r\nhost: t\r\nconnection: close\r\nx-pad: {}\r\n\r\n",
                "h".repeat(pad)
            );
            // hyper's bound covers its buffer of the head, so the statuses
            // flip within a few bytes of the bound; far from it they are fixed.
            let ok: &[&str] = if req.len() + 64 < MAX_HEAD {
                &["200"]
            } else if req.len() > MAX_HEAD + 64 {
                &["431"]
            } else {
                &["200", "431"]
            };
            (req.into_bytes(), ok)
        }
        Case::Body(len) => {
            let head = r#"[{"programId":"212312","page":""#;
            let tail = r#""}]"#;
            let page = len.saturating_sub(head.len() + tail.len());
            let body = format!("{head}{}{tail}", "a".repeat(page));
            let ok: &[&str] = if body.len() > MAX_BODY {
                &["413"]
            } else {
                &["200"]
            };
            (post(body.as_bytes()), ok)
        }
        Case::Events(n) => {
            let one = r#"{"programId":"212312","type":"click"}"#;
            let body = format!("[{}]", vec![one; *n].join(","));
            let ok: &[&str] = match n {
                0 => &["400"],
                n if *n > MAX_EVENTS => &["413"],
                _ => &["200"],
            };
            (post(body.as_bytes()), ok)
        }
        Case::Params(n, k, v) => {
            let params: serde_json::Map<String, serde_json::Value> = (0..*n)
                .map(|i| (format!("{i:0k$}"), "v".repeat(*v).into()))
                .collect();
            let body = serde_json::json!([{ "programId": "212312", "params": params }]);
            (post(body.to_string().as_bytes()), &["200"])
        }
        Case::Bytes(bytes) => {
            let ok: &[&str] = if bytes.len() > MAX_BODY {
                &["413"]
            } else {
                &["200", "400"]
            };
            (post(bytes), ok)
        }
    }
}

/// Writes a request while reading the answer (the server may answer and
/// close before the body is all sent); the answer's status.
async fn exchange(port: u16, req: Vec<u8>) -> (String, String) {
    let s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&req).await;
        wr
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut out)).await;
    let _ = writer.await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).unwrap_or("").to_owned();
    (status, text)
}

/// For a batch answered 200: how many events were accepted and rejected.
fn batch_counts(answer: &str) -> Option<(u64, u64)> {
    let body = answer.split("\r\n\r\n").nth(1)?;
    let j: serde_json::Value = serde_json::from_str(body).ok()?;
    Some((j["accepted"].as_u64()?, j["rejected"].as_u64()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_size_up_to_and_past_each_limit_gets_its_answer() {
    let stack = adtrack_testkit::Stack::start(1).expect("stack");
    load_programs(&stack).await;
    let mut t = Tracker::start(&stack, &[]).await;
    let mut runner = TestRunner::new(Config {
        rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
        ..Config::default()
    });
    let strategy = case();
    for i in 0..120 {
        let case = strategy.new_tree(&mut runner).expect("a case").current();
        let (req, ok) = request(&case);
        let (status, answer) = exchange(t.port, req).await;
        let short = |c: &Case| format!("{c:?}").chars().take(120).collect::<String>();
        assert!(
            ok.contains(&status.as_str()),
            "case {i} {}: answered {status:?}, expected one of {ok:?}: {}",
            short(&case),
            answer.chars().take(300).collect::<String>()
        );
        if let Case::Params(n, k, v) = case
            && status == "200"
        {
            // Within every per-field bound, the event may still be over the
            // largest event (64 KiB encoded): each parameter takes its name,
            // its value and about 8 bytes of framing; the rest of the event
            // well under 1 KiB.
            let within = n <= 32 && k <= 64 && v <= 2048;
            let encoded = n * (k + v + 8);
            let wants: &[(u64, u64)] = if !within || encoded > MAX_EVENT_BYTES {
                &[(0, 1)]
            } else if encoded + 1024 < MAX_EVENT_BYTES {
                &[(1, 0)]
            } else {
                &[(1, 0), (0, 1)]
            };
            let got = batch_counts(&answer);
            assert!(
                got.is_some_and(|g| wants.contains(&g)),
                "{n} params, names {k}, values {v}: {got:?}, expected one of {wants:?}: {answer}"
            );
        }
    }
    let http = adtrack_testkit::Http::new();
    let live = http.get(&t.url("/health/live")).await.expect("live");
    assert_eq!(live.status, 200, "the tracker serves on");
    assert!(t.proc.wait_exit(Duration::ZERO).is_none(), "still running");
}
