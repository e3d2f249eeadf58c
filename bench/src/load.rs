//! Open-loop, fixed-rate load over a pool of keep-alive connections.
//!
//! Request `i` is due at `start + i / rate`; its latency is measured from
//! that intended time, not from when a connection was free to send it, so a
//! server that stalls cannot hide the queue it causes (no coordinated
//! omission). Timers tick at millisecond granularity; every request due by a
//! tick is released at once, with its exact intended time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::Mutex;

use crate::mix::Planned;

/// One fixed-rate run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub addr: std::net::SocketAddr,
    pub rate: u64,
    pub duration: Duration,
    pub connections: usize,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub requested_rate: u64,
    pub achieved_rate: f64,
    pub sent: u64,
    pub completed: u64,
    pub duration_secs: f64,
    pub latency_us: Percentiles,
    /// Per second of the run: p50, p99, p99.9 in microseconds.
    pub timeline: Vec<(u64, Percentiles)>,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
    /// Event ids the server answered with (`X-Event-Id` or `messageId`).
    #[serde(skip)]
    pub event_ids: Vec<String>,
}

struct Shared {
    total: Histogram<u64>,
    per_second: Vec<Histogram<u64>>,
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    completed: u64,
    event_ids: Vec<String>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds")
}

/// Runs the plan at the fixed rate and returns the measurements.
pub async fn run(spec: &RunSpec, plan: Arc<Vec<Planned>>, keep_ids: bool) -> RunResult {
    let seconds = spec.duration.as_secs().max(1) as usize + 1;
    let shared = Arc::new(Mutex::new(Shared {
        total: histogram(),
        per_second: (0..seconds + 30).map(|_| histogram()).collect(),
        statuses: BTreeMap::new(),
        errors: BTreeMap::new(),
        completed: 0,
        event_ids: Vec::new(),
    }));
    let total = (spec.rate as f64 * spec.duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / spec.rate.max(1) as f64);
    let (tx, rx) = async_channel(total as usize);
    let start = Instant::now() + Duration::from_millis(20);
    let mut workers = Vec::new();
    for _ in 0..spec.connections {
        let (rx, shared, plan, spec) = (rx.clone(), shared.clone(), plan.clone(), spec.clone());
        workers.push(tokio::spawn(async move {
            worker(spec, rx, shared, plan, start, keep_ids).await;
        }));
    }
    drop(rx);
    // The generator, on its own OS thread: tokio's timers tick in whole
    // milliseconds, which would delay each release by up to a tick and
    // count that against the server. This thread sleeps until a request is
    // due (spinning on yields for the last 200 us) and releases it then.
    let generator = std::thread::spawn(move || {
        let mut i: u64 = 0;
        while i < total {
            let due = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if due > now {
                let wait = due - now;
                if wait > Duration::from_micros(200) {
                    std::thread::sleep(wait - Duration::from_micros(150));
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            if tx.blocking_send((i, due)).is_err() {
                break;
            }
            i += 1;
        }
    });
    let _ = tokio::task::spawn_blocking(move || generator.join()).await;
    for w in workers {
        let _ = w.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let s = shared.lock().await;
    let timeline = s
        .per_second
        .iter()
        .enumerate()
        .filter(|(_, h)| !h.is_empty())
        .map(|(sec, h)| (sec as u64, Percentiles::of(h)))
        .collect();
    RunResult {
        requested_rate: spec.rate,
        achieved_rate: s.completed as f64
            / spec
                .duration
                .as_secs_f64()
                .max(elapsed.min(spec.duration.as_secs_f64() * 1.5)),
        sent: total,
        completed: s.completed,
        duration_secs: elapsed,
        latency_us: Percentiles::of(&s.total),
        timeline,
        statuses: s.statuses.clone(),
        errors: s.errors.clone(),
        event_ids: s.event_ids.clone(),
    }
}

type Due = (u64, Instant);

fn async_channel(cap: usize) -> (tokio::sync::mpsc::Sender<Due>, SharedRx) {
    let (tx, rx) = tokio::sync::mpsc::channel(cap.clamp(1, 1 << 20));
    (tx, SharedRx(Arc::new(Mutex::new(rx))))
}

#[derive(Clone)]
struct SharedRx(Arc<Mutex<tokio::sync::mpsc::Receiver<Due>>>);

impl SharedRx {
    async fn recv(&self) -> Option<Due> {
        self.0.lock().await.recv().await
    }
}

async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<http1::SendRequest<Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn worker(
    spec: RunSpec,
    rx: SharedRx,
    shared: Arc<Mutex<Shared>>,
    plan: Arc<Vec<Planned>>,
    start: Instant,
    keep_ids: bool,
) {
    let mut sender: Option<http1::SendRequest<Full<Bytes>>> = None;
    while let Some((i, due)) = rx.recv().await {
        let p = &plan[(i as usize) % plan.len()];
        let outcome = async {
            if sender.as_ref().is_none_or(|s| s.is_closed()) {
                sender = Some(connect(spec.addr).await?);
            }
            let s = sender.as_mut().expect("connected");
            s.ready().await?;
            let resp = s.send_request(p.request()).await?;
            let status = resp.status().as_u16();
            let header_id = resp
                .headers()
                .get("x-event-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = resp.into_body().collect().await?.to_bytes();
            let id = header_id.or_else(|| {
                if !keep_ids || !p.json_reply {
                    return None;
                }
                serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|j| {
                        j["messageId"]
                            .as_str()
                            .or_else(|| j["results"][0]["eventId"].as_str())
                            .or_else(|| j["eventId"].as_str())
                            .map(str::to_owned)
                    })
            });
            anyhow::Ok((status, id))
        };
        let result = tokio::time::timeout(spec.timeout, outcome).await;
        let now = Instant::now();
        let latency = now.saturating_duration_since(due).as_micros() as u64;
        let sec = now.saturating_duration_since(start).as_secs() as usize;
        let mut s = shared.lock().await;
        match result {
            Ok(Ok((status, id))) => {
                s.completed += 1;
                let _ = s.total.record(latency.max(1));
                if let Some(h) = s.per_second.get_mut(sec) {
                    let _ = h.record(latency.max(1));
                }
                *s.statuses.entry(status).or_default() += 1;
                if keep_ids && let Some(id) = id {
                    s.event_ids.push(id);
                }
            }
            Ok(Err(e)) => {
                sender = None;
                let kind = if e.to_string().contains("onnect") {
                    "connect"
                } else {
                    "io"
                };
                *s.errors.entry(kind.to_owned()).or_default() += 1;
            }
            Err(_) => {
                sender = None;
                *s.errors.entry("timeout".to_owned()).or_default() += 1;
            }
        }
    }
}

/// Closed-loop saturation: `connections` clients send back to back for
/// `duration`; returns (completed requests, requests per second).
pub async fn saturate(
    addr: std::net::SocketAddr,
    plan: Arc<Vec<Planned>>,
    connections: usize,
    duration: Duration,
) -> (u64, f64) {
    let deadline = Instant::now() + duration;
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (plan, counter) = (plan.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            let mut sender: Option<http1::SendRequest<Full<Bytes>>> = None;
            while Instant::now() < deadline {
                if sender.as_ref().is_none_or(|s| s.is_closed()) {
                    match connect(addr).await {
                        Ok(s) => sender = Some(s),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let s = sender.as_mut().expect("connected");
                let p = &plan[i % plan.len()];
                i += connections;
                let ok = async {
                    s.ready().await?;
                    let resp = s.send_request(p.request()).await?;
                    resp.into_body().collect().await?;
                    anyhow::Ok(())
                }
                .await;
                match ok {
                    Ok(()) => {
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(_) => sender = None,
                }
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let n = counter.load(std::sync::atomic::Ordering::Relaxed);
    (
        n,
        n as f64 / started.elapsed().as_secs_f64().max(duration.as_secs_f64()),
    )
}
