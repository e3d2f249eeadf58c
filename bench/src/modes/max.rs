//! `max`: the rate stepped up until p99 passes its target; the highest rate
//! that stayed under it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use plotters::style::{BLUE, RED};
use serde::Serialize;

use super::load::Common;
use super::seed::seed;
use crate::http::addr_of;
use crate::load::{self, RunSpec};
use crate::mix::{self, MixSpec};
use crate::stack::target;
use crate::{report, servers};

#[derive(Args, Debug, Clone)]
pub struct MaxArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 5_000)]
    start: u64,
    #[arg(long, default_value_t = 5_000)]
    step: u64,
    #[arg(long, default_value_t = 60_000)]
    max: u64,
    /// p99 target in milliseconds.
    #[arg(long, default_value_t = 2.0)]
    p99_ms: f64,
    /// Seconds per step.
    #[arg(long, default_value_t = 5)]
    duration: u64,
}

#[derive(Serialize)]
struct MaxReport {
    p99_target_ms: f64,
    highest_rate_within_target: u64,
    steps: Vec<load::RunResult>,
}

pub async fn run(stack_env: &Path, out: &Path, a: MaxArgs) -> Result<()> {
    let env = servers::read_stack_env(stack_env)?;
    let url = target(&a.common.target, &env)?;
    let addr = addr_of(&url)?;
    seed(&env, a.common.programs).await?;
    let mix = MixSpec::parse(&a.common.mix, &a.common.ids, a.common.programs)?;
    let plan = Arc::new(mix::plan(&mix, 100_000));
    let mut steps = Vec::new();
    let mut best = 0;
    let mut rate = a.start;
    while rate <= a.max {
        let spec = RunSpec {
            addr,
            rate,
            duration: Duration::from_secs(a.duration),
            connections: a.common.connections,
            timeout: Duration::from_secs(10),
        };
        let run = load::run(&spec, plan.clone(), false).await;
        report::print_run(&format!("step {rate}/s"), &run);
        let ok = (run.latency_us.p99 as f64) / 1000.0 <= a.p99_ms
            && run.achieved_rate >= 0.95 * rate as f64
            && run.errors.is_empty();
        steps.push(run);
        if !ok {
            break;
        }
        best = rate;
        rate += a.step;
    }
    println!("max: highest rate with p99 <= {} ms: {best}/s", a.p99_ms);
    let points: Vec<(f64, f64)> = steps
        .iter()
        .map(|r| (r.requested_rate as f64, r.latency_us.p99 as f64 / 1000.0))
        .collect();
    let target_line: Vec<(f64, f64)> = points.iter().map(|p| (p.0, a.p99_ms)).collect();
    let svg = out.join("max.svg");
    std::fs::create_dir_all(out)?;
    report::line_chart(
        &svg,
        "adtrack: p99 by requested rate",
        "requests per second",
        "p99 (ms)",
        &[("p99", points, RED), ("target", target_line, BLUE)],
    )?;
    let json = report::write_json(
        out,
        "max",
        &MaxReport {
            p99_target_ms: a.p99_ms,
            highest_rate_within_target: best,
            steps,
        },
    )?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}
