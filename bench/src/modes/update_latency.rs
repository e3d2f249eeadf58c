//! `update-latency`: a core-data update to visible in the tracker, p50 and
//! p99. `--via redis` (the default) writes the Redis copy as the updater
//! does; `--via stream` puts the program on the core-data stream (Kinesis
//! PutRecord, as any producer does) for `updater stream` to apply.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::http::{addr_of, http_get_status};
use crate::load::Percentiles;
use crate::stack::target;
use crate::{report, servers};

#[derive(Args, Debug, Clone)]
pub struct UpdateArgs {
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// How each update is made: `redis` (the updater's write and PUBLISH)
    /// or `stream` (a record on the core-data stream).
    #[arg(long, default_value = "redis", value_parser = ["redis", "stream"])]
    via: String,
    /// Tracker URL (default: TRACKER_URL from the stack file).
    #[arg(long)]
    target: Option<String>,
}

#[derive(Serialize)]
struct UpdateReport {
    samples: usize,
    via: String,
    visible_us: Percentiles,
}

pub async fn run(stack_env: &Path, out: &Path, a: UpdateArgs) -> Result<()> {
    use adtrack_proto::program::Program;
    let env = servers::read_stack_env(stack_env)?;
    let url = target(&a.target, &env)?;
    let addr = addr_of(&url)?;
    let redis = env.get("REDIS_URL").context("no REDIS_URL")?;
    let store =
        adtrack_updater::RedisPrograms::connect(redis, adtrack_updater::Counter::Create).await?;
    let program = |valid: bool| {
        Program::from_json(&serde_json::json!({
            "programId": "bench-latency", "programName": "latency", "checksum": "c",
            "customerId": 1, "customerName": "c", "valid": valid
        }))
        .map_err(|e| anyhow::anyhow!("{e}"))
    };
    let stream = match a.via.as_str() {
        "stream" => {
            let (client, _) = crate::stack::kinesis(&env)?;
            let name = env
                .get("CORE_DATA_STREAM")
                .cloned()
                .unwrap_or_else(|| "adtrack-core-data".into());
            Some((client, name))
        }
        _ => None,
    };
    let update = |valid: bool| {
        let (store, stream) = (&store, &stream);
        async move {
            let p = program(valid)?;
            match stream {
                Some((client, name)) => {
                    client
                        .put_record()
                        .stream_name(name)
                        .partition_key("bench-latency")
                        .data(aws_sdk_kinesis::primitives::Blob::new(
                            p.to_json().to_string(),
                        ))
                        .send()
                        .await
                        .context("putting a core-data record")?;
                }
                None => {
                    store.put(&p).await?;
                }
            }
            anyhow::Ok(())
        }
    };
    update(true).await?;
    let probe = format!("http://{addr}/event/bench-latency");
    let status = || http_get_status(&probe);
    // Wait for the initial state.
    let deadline = Instant::now() + Duration::from_secs(10);
    while status().await? != 200 {
        if Instant::now() > deadline {
            bail!("the tracker never saw bench-latency");
        }
    }
    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut valid = true;
    for _ in 0..a.samples {
        valid = !valid;
        let want = if valid { 200 } else { 404 };
        let started = Instant::now();
        update(valid).await?;
        loop {
            if status().await? == want {
                break;
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("an update was not visible within 10 s");
            }
        }
        let _ = h.record(started.elapsed().as_micros().max(1) as u64);
    }
    let p = Percentiles::of(&h);
    let path = match a.via.as_str() {
        "stream" => {
            "PutRecord + updater stream's read (programs table, Redis) + pub/sub + one HTTP round trip"
        }
        _ => "updater write + pub/sub + one HTTP round trip",
    };
    println!(
        "update-latency: {} updates via {}; visible in the tracker after p50 {} ms, p99 {} ms, max {} ms ({path})",
        a.samples,
        a.via,
        report::ms(p.p50),
        report::ms(p.p99),
        report::ms(p.max)
    );
    report::write_json(
        out,
        "update-latency",
        &UpdateReport {
            samples: a.samples,
            via: a.via.clone(),
            visible_us: p,
        },
    )?;
    Ok(())
}
