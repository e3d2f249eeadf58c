//! `seed`: the bench programs (`bench-0` ..) written to Redis with the
//! updater's store; the other modes seed through here first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;

use crate::servers;

#[derive(Args, Debug, Clone)]
pub struct SeedArgs {
    #[arg(long, default_value_t = 100_000)]
    pub programs: u32,
    /// Tracker binary (default: next to this one).
    #[arg(long)]
    pub tracker_bin: Option<PathBuf>,
}

/// Writes `bench-0` .. `bench-{n-1}` (allowing redirects to
/// shop.example.com) and `bench-disabled`, unless already there.
pub async fn seed(env: &HashMap<String, String>, n: u32) -> Result<()> {
    use adtrack_proto::program::{Program, ProgramId};
    use adtrack_proto::redis_layout::StoredProgram;
    let url = env
        .get("REDIS_URL")
        .context("no REDIS_URL in the stack file")?;
    let store =
        adtrack_updater::RedisPrograms::connect(url, adtrack_updater::Counter::Create).await?;
    let last = ProgramId::parse(&format!("bench-{}", n.saturating_sub(1)))?;
    if matches!(store.get(&last).await?, StoredProgram::Present(_)) {
        println!("seed: {n} programs already in Redis");
        return Ok(());
    }
    let started = Instant::now();
    let make = |id: String, valid: bool| {
        Program::from_json(&serde_json::json!({
            "programId": id, "programName": "bench", "checksum": "c", "customerId": 7,
            "customerName": "Bench Inc.", "valid": valid,
            "allowedRedirectHosts": ["shop.example.com"],
            "postbackSecret": crate::mix::BENCH_POSTBACK_SECRET
        }))
    };
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        batch.push(make(format!("bench-{i}"), true).map_err(|e| anyhow::anyhow!("{e}"))?);
        if batch.len() == 10_000 {
            store.load_atomic(&batch).await?;
            batch.clear();
        }
    }
    batch.push(make("bench-disabled".into(), false).map_err(|e| anyhow::anyhow!("{e}"))?);
    store.load_atomic(&batch).await?;
    println!(
        "seed: {n} programs written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub async fn run(stack_env: &Path, a: SeedArgs) -> Result<()> {
    let env = servers::read_stack_env(stack_env)?;
    seed(&env, a.programs).await
}
