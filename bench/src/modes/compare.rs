//! `compare`: the tracker against nginx `empty_gif` on the pixel route,
//! in alternating rounds of saturation and fixed-rate latency.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use plotters::style::{BLUE, RED};
use serde::Serialize;

use super::seed::seed;
use crate::load::{self, Percentiles, RunSpec};
use crate::metrics::metric;
use crate::mix::{self, MixSpec};
use crate::stack::provision_stream;
use crate::{procstat, report, servers};

#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// Rounds (each runs both servers, in alternating order).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds of saturation (closed loop) per server per round.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Connections for the saturation phase.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Fixed rate for the latency phase (requests per second).
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 10)]
    latency_duration: u64,
    #[arg(long, default_value_t = 100_000)]
    programs: u32,
    /// Tracker binary (default: next to this one).
    #[arg(long)]
    tracker_bin: Option<PathBuf>,
    /// Shards of the stream the tracker writes to (1 MiB/s each, as in AWS).
    #[arg(long, default_value_t = 40)]
    shards: i32,
}

/// The stream `bench compare` provisions for the tracker.
const COMPARE_STREAM: &str = "adtrack-bench-compare";

#[derive(Serialize, Default, Clone)]
struct Side {
    rps: f64,
    /// Server CPU (utime + stime) per request, counted until every event of
    /// the saturation phase has been shipped (the tracker's delivery work
    /// for those requests included).
    cpu_us_per_request: f64,
    /// Milliseconds the tracker needed after the saturation phase to ship
    /// what it still held (0 for nginx).
    drain_ms: f64,
    p99_us: u64,
    latency: Percentiles,
}

#[derive(Serialize)]
struct CompareReport {
    pinned: String,
    rounds: Vec<(Side, Side)>,
    rps_ratio: Summary,
    p99_ratio: Summary,
    tracker_cpu_us_per_request: Summary,
    nginx_cpu_us_per_request: Summary,
}

#[derive(Serialize)]
struct Summary {
    mean: f64,
    min: f64,
    max: f64,
}

fn summary(v: &[f64]) -> Summary {
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    Summary {
        mean,
        min: v.iter().copied().fold(f64::MAX, f64::min),
        max: v.iter().copied().fold(f64::MIN, f64::max),
    }
}

async fn measure(server: &servers::Server, plan: &Arc<Vec<mix::Planned>>, a: &CompareArgs) -> Side {
    let before = procstat::sample(server.pid()).unwrap_or_default();
    let (n, rps) = load::saturate(
        server.addr,
        plan.clone(),
        a.connections,
        Duration::from_secs(a.duration),
    )
    .await;
    // The tracker's shipping of these requests counts toward their CPU, and
    // the latency phase starts from an empty queue.
    let drained = std::time::Instant::now();
    if let Some(admin) = &server.admin
        && let Err(e) = wait_shipped(admin, Duration::from_secs(120)).await
    {
        eprintln!("compare: {e:#}");
    }
    let drain_ms = drained.elapsed().as_secs_f64() * 1e3;
    let after = procstat::sample(server.pid()).unwrap_or_default();
    let spec = RunSpec {
        addr: server.addr,
        rate: a.rate,
        duration: Duration::from_secs(a.latency_duration),
        connections: a.connections,
        timeout: Duration::from_secs(10),
    };
    let run = load::run(&spec, plan.clone(), false).await;
    Side {
        rps,
        cpu_us_per_request: after.cpu_us.saturating_sub(before.cpu_us) as f64 / n.max(1) as f64,
        drain_ms: if server.admin.is_some() {
            drain_ms
        } else {
            0.0
        },
        p99_us: run.latency_us.p99,
        latency: run.latency_us,
    }
}

/// Waits until the tracker has delivered every event it accepted.
async fn wait_shipped(admin: &str, limit: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let text = crate::http::get_text(&format!("{admin}/metrics")).await?;
        let accepted = metric(&text, "adtrack_events_accepted_total");
        let delivered = metric(&text, "adtrack_events_delivered_total");
        if delivered >= accepted {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "tracker still ships: {delivered} of {accepted} events delivered after {limit:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(stack_env: &Path, out: &Path, a: CompareArgs) -> Result<()> {
    let env = servers::read_stack_env(stack_env)?;
    seed(&env, a.programs).await?;
    let pin = servers::pinning();
    let pinned = match pin {
        Some((load_core, srv)) => {
            servers::pin_self(load_core);
            // As in AWS, where Kinesis and Redis are not on the task's core.
            let pinned = servers::pin_stack(&env, load_core);
            format!(
                "load generator and the local stack ({}, idle priority) on core {load_core}, servers on core {srv} (taskset)",
                pinned.join(", ")
            )
        }
        None => "not pinned (fewer than 2 cores or no taskset)".to_owned(),
    };
    println!("compare: {pinned}");
    let bin = a
        .tracker_bin
        .clone()
        .unwrap_or_else(|| servers::sibling_binary("tracker"));
    let server_core = pin.map(|p| p.1);
    // As a user starts it: defaults, one core, a stream provisioned for the
    // load (each shard takes 1 MiB/s, as in AWS).
    let stream = provision_stream(&env, COMPARE_STREAM, a.shards).await?;
    let tracker = servers::start_tracker(
        &bin,
        &env,
        server_core,
        &[("EVENTS_STREAM", stream.as_str())],
    )
    .await?;
    let nginx = servers::start_nginx(server_core).await?;
    let plan = Arc::new(mix::plan(&MixSpec::pixels_only(a.programs), 100_000));
    let mut rounds = Vec::new();
    for round in 0..a.rounds {
        let (t, n) = if round % 2 == 0 {
            let t = measure(&tracker, &plan, &a).await;
            (t, measure(&nginx, &plan, &a).await)
        } else {
            let n = measure(&nginx, &plan, &a).await;
            (measure(&tracker, &plan, &a).await, n)
        };
        println!(
            "round {}: tracker {:>8.0} req/s ({:.1} us CPU/req, shipped {:.0} ms after, p99 {} ms at {}/s) | nginx {:>8.0} req/s ({:.1} us CPU/req, p99 {} ms) | ratio {:.3} rps, {:.2} p99",
            round + 1,
            t.rps,
            t.cpu_us_per_request,
            t.drain_ms,
            report::ms(t.p99_us),
            a.rate,
            n.rps,
            n.cpu_us_per_request,
            report::ms(n.p99_us),
            t.rps / n.rps.max(1.0),
            t.p99_us as f64 / n.p99_us.max(1) as f64
        );
        rounds.push((t, n));
    }
    let rps: Vec<f64> = rounds.iter().map(|(t, n)| t.rps / n.rps.max(1.0)).collect();
    let p99: Vec<f64> = rounds
        .iter()
        .map(|(t, n)| t.p99_us as f64 / n.p99_us.max(1) as f64)
        .collect();
    let report = CompareReport {
        pinned,
        rps_ratio: summary(&rps),
        p99_ratio: summary(&p99),
        tracker_cpu_us_per_request: summary(
            &rounds
                .iter()
                .map(|r| r.0.cpu_us_per_request)
                .collect::<Vec<_>>(),
        ),
        nginx_cpu_us_per_request: summary(
            &rounds
                .iter()
                .map(|r| r.1.cpu_us_per_request)
                .collect::<Vec<_>>(),
        ),
        rounds,
    };
    println!(
        "compare: tracker/nginx requests/s {:.3} (min {:.3}, max {:.3}); p99 at {}/s {:.2}x (min {:.2}, max {:.2}); CPU per request tracker {:.1} us, nginx {:.1} us",
        report.rps_ratio.mean,
        report.rps_ratio.min,
        report.rps_ratio.max,
        a.rate,
        report.p99_ratio.mean,
        report.p99_ratio.min,
        report.p99_ratio.max,
        report.tracker_cpu_us_per_request.mean,
        report.nginx_cpu_us_per_request.mean
    );
    let svg = out.join("compare.svg");
    std::fs::create_dir_all(out)?;
    let series = |f: fn(&(Side, Side)) -> f64| -> Vec<(f64, f64)> {
        report
            .rounds
            .iter()
            .enumerate()
            .map(|(i, r)| ((i + 1) as f64, f(r)))
            .collect()
    };
    report::line_chart(
        &svg,
        "requests/s per round (saturation, pixel route)",
        "round",
        "requests per second",
        &[
            ("tracker", series(|r| r.0.rps), RED),
            ("nginx empty_gif", series(|r| r.1.rps), BLUE),
        ],
    )?;
    let json = report::write_json(out, "compare", &report)?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}
