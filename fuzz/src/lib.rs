//! The checks behind each fuzz target, shared by the targets (run by
//! `dev/fuzz` under libFuzzer) and by `tests/corpus.rs`, which replays the
//! committed corpora on every `cargo test`.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use adtrack_proto::v1::EventType;
use adtrack_tracker::conn_timeouts::{ConnPhase, Deadlines, TimedIo};
use adtrack_tracker::hit::{MAX_PARAM_NAME, MAX_PARAM_VALUE, MAX_PARAMS, Params};
use adtrack_tracker::routes::batch::parse_body;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Most events the batch target allows (the tracker's default).
pub const MAX_BATCH_EVENTS: u64 = 500;

/// A pixel's, event's or click's query string: parsed or refused, never a
/// panic, and what parses stays inside every bound.
pub fn query(data: &[u8]) {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(params) = Params::parse(Some(query)) {
        assert!(params.0.len() <= MAX_PARAMS);
        for (k, v) in &params.0 {
            assert!(!k.is_empty() && k.len() <= MAX_PARAM_NAME);
            assert!(v.len() <= MAX_PARAM_VALUE);
        }
        let _ = params.event_type(EventType::Impression);
    }
}

/// A `POST /v1/events` body (a JSON array, JSON lines, or a beacon's
/// text): refused whole or event by event, never a panic, never more
/// events than the bound.
pub fn batch_body(data: &[u8]) {
    if let Ok(events) = parse_body(data, MAX_BATCH_EVENTS) {
        assert!(!events.is_empty() && events.len() as u64 <= MAX_BATCH_EVENTS);
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// Raw bytes on a connection, through hyper's HTTP/1 server and the
/// tracker's connection wrapper (`TimedIo`, which answers over-long request
/// lines itself), configured as the tracker configures them: every input
/// ends with the connection closed, never a panic or a hang.
pub fn request_head(data: &[u8]) {
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let phase = Arc::new(ConnPhase::default());
        let io = TimedIo::new(
            server,
            phase.clone(),
            Deadlines {
                header: Duration::from_secs(10),
                idle: Duration::from_secs(75),
                write: Duration::from_secs(10),
                max_uri_bytes: 8192,
            },
        );
        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let phase = phase.clone();
            async move {
                phase.busy();
                // Read the body as the batch route does, within its bound.
                let _ = Limited::new(req.into_body(), 262_144).collect().await;
                phase.idle();
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
            }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .keep_alive(true)
            .max_header_size(16_384)
            .max_buf_size(16_384 + 8192)
            .serve_connection(io, svc);
        let feed = async move {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut answers = Vec::new();
            let _ = client.read_to_end(&mut answers).await;
        };
        let served = tokio::time::timeout(Duration::from_secs(5), async {
            let (_, ()) = tokio::join!(conn, feed);
        })
        .await;
        assert!(served.is_ok(), "the connection did not end");
    });
}
