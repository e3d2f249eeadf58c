//! `load`: one open-loop, fixed-rate run of the request mix against the
//! tracker; with `e2e` set, followed by the end-to-end accounting. Also the
//! flags every mode that drives the mix shares.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use serde::Serialize;

use super::seed::seed;
use crate::accounting::{E2eCounts, account};
use crate::http::{addr_of, get_text};
use crate::load::{self, RunSpec};
use crate::mix::{self, MixSpec};
use crate::stack::target;
use crate::{procstat, report, servers};

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Tracker URL (default: TRACKER_URL from the stack file).
    #[arg(long)]
    pub target: Option<String>,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Route weights.
    #[arg(long, default_value = "pixel=70,event=15,click=10,beacon=5")]
    pub mix: String,
    /// Program id weights.
    #[arg(long, default_value = "valid=90,unknown=5,invalid=3,malformed=2")]
    pub ids: String,
    /// Valid program ids are drawn from `bench-0` .. `bench-{programs-1}`.
    #[arg(long, default_value_t = 100_000)]
    pub programs: u32,
}

#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    #[command(flatten)]
    common: Common,
    /// Requests per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
}

#[derive(Serialize)]
struct LoadReport {
    mode: &'static str,
    target: String,
    mix: String,
    ids: String,
    run: load::RunResult,
    tracker_peak_rss_kib: Option<u64>,
    tracker_cpu_us_per_request: Option<f64>,
    e2e: Option<E2eCounts>,
}

pub async fn run(stack_env: &Path, out: &Path, a: LoadArgs) -> Result<()> {
    run_load(stack_env, out, a, false).await
}

/// The run behind both `load` and `e2e`.
pub(super) async fn run_load(stack_env: &Path, out: &Path, a: LoadArgs, e2e: bool) -> Result<()> {
    let env = servers::read_stack_env(stack_env)?;
    let url = target(&a.common.target, &env)?;
    let addr = addr_of(&url)?;
    seed(&env, a.common.programs).await?;
    let mix = MixSpec::parse(&a.common.mix, &a.common.ids, a.common.programs)?;
    let plan = Arc::new(mix::plan(&mix, 100_000));
    let pid: Option<u32> = env.get("TRACKER_PID").and_then(|p| p.parse().ok());
    let sampler = pid.map(procstat::Sampler::start);
    let admin = env.get("TRACKER_ADMIN_URL").cloned();
    let before = match &admin {
        Some(a) => get_text(&format!("{a}/metrics")).await.unwrap_or_default(),
        None => String::new(),
    };
    let spec = RunSpec {
        addr,
        rate: a.rate,
        duration: Duration::from_secs(a.duration),
        connections: a.common.connections,
        timeout: Duration::from_secs(10),
    };
    let run = load::run(&spec, plan, e2e).await;
    let (rss, cpu) = match sampler {
        Some(s) => {
            let (rss, cpu) = s.finish().await;
            (Some(rss), Some(cpu as f64 / run.completed.max(1) as f64))
        }
        None => (None, None),
    };
    let label = if e2e { "e2e" } else { "load" };
    report::print_run(label, &run);
    if let Some(rss) = rss {
        println!(
            "{:<18} tracker peak RSS {:.1} MiB, CPU {:.1} us/request",
            "",
            rss as f64 / 1024.0,
            cpu.unwrap_or(0.0)
        );
    }
    let counts = if e2e {
        Some(account(&env, &run, &before).await?)
    } else {
        None
    };
    let name = format!("{label}-{}", a.rate);
    let report = LoadReport {
        mode: label,
        target: url,
        mix: a.common.mix,
        ids: a.common.ids,
        run,
        tracker_peak_rss_kib: rss,
        tracker_cpu_us_per_request: cpu,
        e2e: counts,
    };
    let json = report::write_json(out, &name, &report)?;
    let svg = out.join(format!("{name}.svg"));
    report::timeline_chart(
        &svg,
        &format!("adtrack {label}: latency at {}/s", a.rate),
        &report.run.timeline,
    )?;
    println!("wrote {} and {}", json.display(), svg.display());
    if let Some(c) = &report.e2e
        && (c.lost > 0 || c.duplicated_in_stream > 0)
    {
        bail!(
            "{} event(s) lost, {} duplicated",
            c.lost,
            c.duplicated_in_stream
        );
    }
    Ok(())
}
