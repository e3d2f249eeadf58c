//! `startup`: the tracker's time from start to ready, and its RSS, with N
//! programs cached.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

use super::seed::{SeedArgs, seed};
use crate::http::get_text;
use crate::{procstat, report, servers};

#[derive(Serialize)]
struct StartupReport {
    programs: u32,
    start_to_ready_ms: f64,
    rss_after_ready_mib: f64,
}

pub async fn run(stack_env: &Path, out: &Path, a: SeedArgs) -> Result<()> {
    let env = servers::read_stack_env(stack_env)?;
    seed(&env, a.programs).await?;
    let bin = a
        .tracker_bin
        .clone()
        .unwrap_or_else(|| servers::sibling_binary("tracker"));
    let tracker = servers::start_tracker(&bin, &env, None, servers::UNLIMITED_STREAM).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admin = tracker.admin.clone().unwrap_or_default();
    let stats = get_text(&format!("{admin}/cache/stats"))
        .await
        .unwrap_or_default();
    let rss = procstat::sample(tracker.pid())
        .map(|s| s.rss_kib)
        .unwrap_or(0) as f64
        / 1024.0;
    let r = StartupReport {
        programs: a.programs,
        start_to_ready_ms: tracker.ready_after.as_secs_f64() * 1000.0,
        rss_after_ready_mib: rss,
    };
    println!(
        "startup: {} programs in Redis; start to ready {:.0} ms; RSS after ready {:.1} MiB; cache {stats}",
        r.programs, r.start_to_ready_ms, r.rss_after_ready_mib
    );
    report::write_json(out, "startup", &r)?;
    Ok(())
}
