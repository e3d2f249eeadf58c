//! `adtrack-bench`: fixed-rate load with honest latency, the highest rate
//! under a p99 target, a side-by-side with nginx, end-to-end accounting
//! through the whole local stack, start-up and update-visibility timings.

mod load;
mod mix;
mod procstat;
mod report;
mod servers;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use plotters::style::{BLUE, RED};
use serde::Serialize;

use crate::load::{Percentiles, RunSpec};
use crate::mix::MixSpec;

/// Load and end-to-end harness for adtrack. Start the local stack first
/// (`./dev/run --detach`); its addresses are read from `dev/.stack.env`.
#[derive(Parser, Debug)]
#[command(name = "adtrack-bench", version)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
    /// Where JSON results and SVG charts are written.
    #[arg(long, global = true, default_value = "bench/results")]
    out: PathBuf,
    /// The stack's settings, written by `./dev/run --detach`.
    #[arg(long, global = true, default_value = "dev/.stack.env")]
    stack: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// One open-loop, fixed-rate run of the request mix against the tracker.
    Load(LoadArgs),
    /// Step the rate up; report the highest rate whose p99 stays under target.
    Max(MaxArgs),
    /// The tracker against nginx `empty_gif` on the pixel route, alternated.
    Compare(CompareArgs),
    /// Load through the whole stack, then account for every event.
    E2e(LoadArgs),
    /// Write N programs (`bench-0` ..) to Redis with the updater's store.
    Seed(SeedArgs),
    /// Time from start to ready, and RSS, with N programs cached.
    Startup(SeedArgs),
    /// Core-data update to visible in the tracker, p50 and p99.
    UpdateLatency(UpdateArgs),
    /// Consumer throughput next to the DynamoDB stand-in's own
    /// BatchWriteItem ceiling, measured the same way.
    Consumer(ConsumerArgs),
}

#[derive(Args, Debug, Clone)]
struct ConsumerArgs {
    /// Events to write.
    #[arg(long, default_value_t = 30_000)]
    events: usize,
    /// BatchWriteItem calls in flight (the consumer's CONSUMER_WRITE_CONCURRENCY).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Consumer binary (default: next to this one).
    #[arg(long)]
    consumer_bin: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Tracker URL (default: TRACKER_URL from the stack file).
    #[arg(long)]
    target: Option<String>,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Route weights.
    #[arg(long, default_value = "pixel=70,event=15,click=10,beacon=5")]
    mix: String,
    /// Program id weights.
    #[arg(long, default_value = "valid=90,unknown=5,invalid=3,malformed=2")]
    ids: String,
    /// Valid program ids are drawn from `bench-0` .. `bench-{programs-1}`.
    #[arg(long, default_value_t = 100_000)]
    programs: u32,
}

#[derive(Args, Debug, Clone)]
struct LoadArgs {
    #[command(flatten)]
    common: Common,
    /// Requests per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
}

#[derive(Args, Debug, Clone)]
struct MaxArgs {
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

#[derive(Args, Debug, Clone)]
struct CompareArgs {
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

#[derive(Args, Debug, Clone)]
struct SeedArgs {
    #[arg(long, default_value_t = 100_000)]
    programs: u32,
    /// Tracker binary (default: next to this one).
    #[arg(long)]
    tracker_bin: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct UpdateArgs {
    #[arg(long, default_value_t = 200)]
    samples: usize,
    /// Tracker URL (default: TRACKER_URL from the stack file).
    #[arg(long)]
    target: Option<String>,
}

/// One GET on a fresh connection: status and body.
async fn get(url: &str) -> Result<(u16, String)> {
    use http_body_util::BodyExt;
    let uri: hyper::Uri = url.parse()?;
    let addr = format!(
        "{}:{}",
        uri.host().unwrap_or("127.0.0.1"),
        uri.port_u16().unwrap_or(80)
    );
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(uri.path())
        .header("host", "bench")
        .body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Status of a GET (used while waiting for servers).
pub async fn http_get_status(url: &str) -> Result<u16> {
    Ok(get(url).await?.0)
}

async fn get_text(url: &str) -> Result<String> {
    Ok(get(url).await?.1)
}

fn metric(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let n = series.split('{').next()?;
            (n == name).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

fn addr_of(url: &str) -> Result<SocketAddr> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let host = uri.host().context("URL without host")?;
    let port = uri.port_u16().unwrap_or(80);
    format!("{host}:{port}")
        .parse()
        .with_context(|| format!("{url}: use a numeric address"))
}

fn target(common_target: &Option<String>, env: &HashMap<String, String>) -> Result<String> {
    match common_target {
        Some(t) => Ok(t.clone()),
        None => env
            .get("TRACKER_URL")
            .cloned()
            .context("no --target and no TRACKER_URL in the stack file"),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.mode.clone_mode() {
        Mode::Load(a) => load_mode(&cli, a, false).await,
        Mode::E2e(a) => load_mode(&cli, a, true).await,
        Mode::Max(a) => max_mode(&cli, a).await,
        Mode::Compare(a) => compare_mode(&cli, a).await,
        Mode::Seed(a) => {
            let env = servers::read_stack_env(&cli.stack)?;
            seed(&env, a.programs).await
        }
        Mode::Startup(a) => startup_mode(&cli, a).await,
        Mode::UpdateLatency(a) => update_latency_mode(&cli, a).await,
        Mode::Consumer(a) => consumer_mode(&cli, a).await,
    }
}

impl Mode {
    fn clone_mode(&self) -> Mode {
        match self {
            Mode::Load(a) => Mode::Load(a.clone()),
            Mode::Max(a) => Mode::Max(a.clone()),
            Mode::Compare(a) => Mode::Compare(a.clone()),
            Mode::E2e(a) => Mode::E2e(a.clone()),
            Mode::Seed(a) => Mode::Seed(a.clone()),
            Mode::Startup(a) => Mode::Startup(a.clone()),
            Mode::UpdateLatency(a) => Mode::UpdateLatency(a.clone()),
            Mode::Consumer(a) => Mode::Consumer(a.clone()),
        }
    }
}

/// Writes `bench-0` .. `bench-{n-1}` (allowing redirects to
/// shop.example.com) and `bench-disabled`, unless already there.
async fn seed(env: &HashMap<String, String>, n: u32) -> Result<()> {
    use adtrack_proto::program::{Program, ProgramId};
    use adtrack_proto::redis_layout::StoredProgram;
    let url = env
        .get("REDIS_URL")
        .context("no REDIS_URL in the stack file")?;
    let mut store = adtrack_updater::ProgramStore::connect(url).await?;
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
            "allowedRedirectHosts": ["shop.example.com"]
        }))
    };
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        batch.push(make(format!("bench-{i}"), true).map_err(|e| anyhow::anyhow!("{e}"))?);
        if batch.len() == 10_000 {
            store.load(&batch).await?;
            batch.clear();
        }
    }
    batch.push(make("bench-disabled".into(), false).map_err(|e| anyhow::anyhow!("{e}"))?);
    store.load(&batch).await?;
    println!(
        "seed: {n} programs written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
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

#[derive(Serialize, Default)]
struct E2eCounts {
    requests_answered: u64,
    events_answered: usize,
    events_accepted: f64,
    events_delivered: f64,
    kinesis_records: f64,
    put_records_calls: f64,
    events_per_record: f64,
    put_records_calls_per_100k_events: f64,
    items_in_dynamodb: usize,
    dead_letters: usize,
    lost: usize,
    duplicated_in_stream: usize,
}

async fn load_mode(cli: &Cli, a: LoadArgs, e2e: bool) -> Result<()> {
    let env = servers::read_stack_env(&cli.stack)?;
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
    let json = report::write_json(&cli.out, &name, &report)?;
    let svg = cli.out.join(format!("{name}.svg"));
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

/// After an e2e run: where did every answered event go?
async fn account(
    env: &HashMap<String, String>,
    run: &load::RunResult,
    before: &str,
) -> Result<E2eCounts> {
    let admin = env
        .get("TRACKER_ADMIN_URL")
        .context("no TRACKER_ADMIN_URL")?;
    let ids: HashSet<&String> = run.event_ids.iter().collect();
    let ddb = dynamodb(env)?;
    let table = env
        .get("EVENTS_TABLE")
        .cloned()
        .unwrap_or_else(|| "adtrack-events".into());
    // Wait until the tracker delivered everything and the consumer wrote it.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut found;
    loop {
        found = scan_ids(&ddb, &table).await?;
        let missing = ids.iter().filter(|id| !found.contains(**id)).count();
        if missing == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = get_text(&format!("{admin}/metrics")).await?;
    let d = |name: &str| metric(&after, name) - metric(before, name);
    let mut c = E2eCounts {
        requests_answered: run.completed,
        events_answered: ids.len(),
        events_accepted: d("adtrack_events_accepted_total"),
        events_delivered: d("adtrack_events_delivered_total"),
        kinesis_records: d("adtrack_kinesis_records_total"),
        put_records_calls: d("adtrack_kinesis_put_records_calls_total"),
        items_in_dynamodb: ids.iter().filter(|id| found.contains(**id)).count(),
        ..E2eCounts::default()
    };
    c.lost = ids.len() - c.items_in_dynamodb;
    c.events_per_record = c.events_delivered / c.kinesis_records.max(1.0);
    c.put_records_calls_per_100k_events =
        c.put_records_calls / c.events_delivered.max(1.0) * 100_000.0;
    let dlq = env
        .get("DEAD_LETTER_TABLE")
        .cloned()
        .unwrap_or_else(|| "adtrack-dead-letters".into());
    c.dead_letters = ddb
        .scan()
        .table_name(dlq)
        .send()
        .await
        .map(|o| o.count as usize)
        .unwrap_or(0);
    // Duplicates at the stream level (the table's key makes them one item).
    c.duplicated_in_stream = stream_duplicates(env, &ids).await.unwrap_or(0);
    println!(
        "e2e accounting: {} requests answered, {} events answered, {} accepted, {} delivered in {} Kinesis records ({:.1} events/record) by {} PutRecords calls ({:.0} per 100k events), {} items in DynamoDB, {} dead letters, {} lost, {} duplicated in the stream",
        c.requests_answered,
        c.events_answered,
        c.events_accepted,
        c.events_delivered,
        c.kinesis_records,
        c.events_per_record,
        c.put_records_calls,
        c.put_records_calls_per_100k_events,
        c.items_in_dynamodb,
        c.dead_letters,
        c.lost,
        c.duplicated_in_stream
    );
    Ok(c)
}

fn aws_parts(
    env: &HashMap<String, String>,
) -> (aws_config::Region, aws_sdk_dynamodb::config::Credentials) {
    (
        aws_config::Region::new(
            env.get("AWS_REGION")
                .cloned()
                .unwrap_or_else(|| "us-east-1".into()),
        ),
        aws_sdk_dynamodb::config::Credentials::new(
            env.get("AWS_ACCESS_KEY_ID")
                .cloned()
                .unwrap_or_else(|| "local".into()),
            env.get("AWS_SECRET_ACCESS_KEY")
                .cloned()
                .unwrap_or_else(|| "local".into()),
            None,
            None,
            "stack",
        ),
    )
}

fn dynamodb(env: &HashMap<String, String>) -> Result<aws_sdk_dynamodb::Client> {
    let (region, creds) = aws_parts(env);
    let conf = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .endpoint_url(
            env.get("AWS_ENDPOINT_URL_DYNAMODB")
                .context("no AWS_ENDPOINT_URL_DYNAMODB")?,
        )
        .region(region)
        .credentials_provider(creds)
        .build();
    Ok(aws_sdk_dynamodb::Client::from_conf(conf))
}

async fn scan_ids(ddb: &aws_sdk_dynamodb::Client, table: &str) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    let mut start = None;
    loop {
        let page = ddb
            .scan()
            .table_name(table)
            .projection_expression("eventId")
            .set_exclusive_start_key(start)
            .send()
            .await?;
        for item in page.items.unwrap_or_default() {
            if let Some(id) = item.get("eventId").and_then(|v| v.as_s().ok()) {
                out.insert(id.clone());
            }
        }
        start = page.last_evaluated_key;
        if start.is_none() {
            return Ok(out);
        }
    }
}

/// A Kinesis client for the stack's stand-in, and the events stream's name.
fn kinesis(env: &HashMap<String, String>) -> Result<(aws_sdk_kinesis::Client, String)> {
    let (region, creds) = aws_parts(env);
    let conf = aws_sdk_kinesis::Config::builder()
        .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
        .endpoint_url(
            env.get("AWS_ENDPOINT_URL_KINESIS")
                .context("no AWS_ENDPOINT_URL_KINESIS")?,
        )
        .region(region)
        .credentials_provider(creds)
        .build();
    let stream = env
        .get("EVENTS_STREAM")
        .cloned()
        .unwrap_or_else(|| "adtrack-events".into());
    Ok((aws_sdk_kinesis::Client::from_conf(conf), stream))
}

/// The stream `bench compare` provisions for the tracker.
const COMPARE_STREAM: &str = "adtrack-bench-compare";

/// Creates `name` with `shards` shards unless it exists; waits until active.
async fn provision_stream(
    env: &HashMap<String, String>,
    name: &str,
    shards: i32,
) -> Result<String> {
    let (client, _) = kinesis(env)?;
    if client
        .describe_stream_summary()
        .stream_name(name)
        .send()
        .await
        .is_err()
    {
        client
            .create_stream()
            .stream_name(name)
            .shard_count(shards)
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "creating stream {name}: {}",
                    aws_sdk_kinesis::error::DisplayErrorContext(&e)
                )
            })?;
    }
    for _ in 0..100 {
        let active = client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .ok()
            .and_then(|o| o.stream_description_summary)
            .is_some_and(|d| d.stream_status == aws_sdk_kinesis::types::StreamStatus::Active);
        if active {
            return Ok(name.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("stream {name} did not become active")
}

async fn stream_duplicates(env: &HashMap<String, String>, ids: &HashSet<&String>) -> Result<usize> {
    use adtrack_proto::kpl::{Deaggregated, deaggregate};
    use aws_sdk_kinesis::types::ShardIteratorType;
    let (client, stream) = kinesis(env)?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    for shard in client
        .list_shards()
        .stream_name(&stream)
        .send()
        .await?
        .shards
        .unwrap_or_default()
    {
        let mut it = client
            .get_shard_iterator()
            .stream_name(&stream)
            .shard_id(shard.shard_id())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await?
            .shard_iterator;
        while let Some(i) = it {
            let page = client
                .get_records()
                .shard_iterator(i)
                .limit(10_000)
                .send()
                .await?;
            if page.records.is_empty() {
                break;
            }
            for r in &page.records {
                let keys: Vec<String> = match deaggregate(r.data().as_ref()) {
                    Ok(Deaggregated::Records(users)) => {
                        users.into_iter().map(|u| u.partition_key).collect()
                    }
                    _ => vec![r.partition_key.clone().unwrap_or_default()],
                };
                for k in keys {
                    if ids.contains(&k) {
                        *seen.entry(k).or_default() += 1;
                    }
                }
            }
            it = page.next_shard_iterator;
        }
    }
    Ok(seen.values().map(|n| n.saturating_sub(1)).sum())
}

#[derive(Serialize)]
struct MaxReport {
    p99_target_ms: f64,
    highest_rate_within_target: u64,
    steps: Vec<load::RunResult>,
}

async fn max_mode(cli: &Cli, a: MaxArgs) -> Result<()> {
    let env = servers::read_stack_env(&cli.stack)?;
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
    let svg = cli.out.join("max.svg");
    std::fs::create_dir_all(&cli.out)?;
    report::line_chart(
        &svg,
        "adtrack: p99 by requested rate",
        "requests per second",
        "p99 (ms)",
        &[("p99", points, RED), ("target", target_line, BLUE)],
    )?;
    let json = report::write_json(
        &cli.out,
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

#[derive(Serialize, Default, Clone)]
struct Side {
    rps: f64,
    cpu_us_per_request: f64,
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
        p99_us: run.latency_us.p99,
        latency: run.latency_us,
    }
}

async fn compare_mode(cli: &Cli, a: CompareArgs) -> Result<()> {
    let env = servers::read_stack_env(&cli.stack)?;
    seed(&env, a.programs).await?;
    let pin = servers::pinning();
    let pinned = match pin {
        Some((load_core, srv)) => {
            servers::pin_self(load_core);
            format!("load generator on core {load_core}, servers on core {srv} (taskset)")
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
            "round {}: tracker {:>8.0} req/s ({:.1} us CPU/req, p99 {} ms at {}/s) | nginx {:>8.0} req/s ({:.1} us CPU/req, p99 {} ms) | ratio {:.3} rps, {:.2} p99",
            round + 1,
            t.rps,
            t.cpu_us_per_request,
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
    let svg = cli.out.join("compare.svg");
    std::fs::create_dir_all(&cli.out)?;
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
    let json = report::write_json(&cli.out, "compare", &report)?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}

#[derive(Serialize)]
struct StartupReport {
    programs: u32,
    start_to_ready_ms: f64,
    rss_after_ready_mib: f64,
}

async fn startup_mode(cli: &Cli, a: SeedArgs) -> Result<()> {
    let env = servers::read_stack_env(&cli.stack)?;
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
    report::write_json(&cli.out, "startup", &r)?;
    Ok(())
}

#[derive(Serialize)]
struct UpdateReport {
    samples: usize,
    visible_us: Percentiles,
}

async fn update_latency_mode(cli: &Cli, a: UpdateArgs) -> Result<()> {
    use adtrack_proto::program::Program;
    let env = servers::read_stack_env(&cli.stack)?;
    let url = target(&a.target, &env)?;
    let addr = addr_of(&url)?;
    let redis = env.get("REDIS_URL").context("no REDIS_URL")?;
    let mut store = adtrack_updater::ProgramStore::connect(redis).await?;
    let program = |valid: bool| {
        Program::from_json(&serde_json::json!({
            "programId": "bench-latency", "programName": "latency", "checksum": "c",
            "customerId": 1, "customerName": "c", "valid": valid
        }))
        .map_err(|e| anyhow::anyhow!("{e}"))
    };
    store.put(&program(true)?).await?;
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
        store.put(&program(valid)?).await?;
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
    println!(
        "update-latency: {} updates; visible in the tracker after p50 {} ms, p99 {} ms, max {} ms (updater write + pub/sub + one HTTP round trip)",
        a.samples,
        report::ms(p.p50),
        report::ms(p.p99),
        report::ms(p.max)
    );
    report::write_json(
        &cli.out,
        "update-latency",
        &UpdateReport {
            samples: a.samples,
            visible_us: p,
        },
    )?;
    Ok(())
}

#[derive(Serialize)]
struct ConsumerReport {
    events: usize,
    ceiling_items_per_sec: f64,
    consumer_events_per_sec: f64,
    ratio: f64,
}

fn bench_event(id: &str) -> Vec<u8> {
    use prost::Message;
    adtrack_proto::v1::TrackingEvent {
        message_id: id.to_owned(),
        programid: "bench-1".into(),
        program_name: "bench".into(),
        customer_name: "Bench Inc.".into(),
        customer_id: 7,
        checksum: "c".into(),
        user_agent: mix::USER_AGENTS[0].into(),
        client_ip: "203.0.113.0".into(),
        is_valid: true,
        validation: 1,
        event_type: 1,
        source: "pixel".into(),
        timestamp_ms: 1_795_000_000_000,
        ..Default::default()
    }
    .encode_to_vec()
}

/// Ceiling: the same items written straight with BatchWriteItem (25 per
/// call, `concurrency` in flight). Consumer: the same number of events put
/// in the stream, then the consumer started and timed until all are items.
async fn consumer_mode(cli: &Cli, a: ConsumerArgs) -> Result<()> {
    use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
    use futures_util::StreamExt;
    let env = servers::read_stack_env(&cli.stack)?;
    let ddb = dynamodb(&env)?;
    let table = env
        .get("EVENTS_TABLE")
        .cloned()
        .unwrap_or_else(|| "adtrack-events".into());
    let run = uuid::Uuid::now_v7().simple().to_string();
    // The ceiling, with items shaped like the consumer's.
    let items: Vec<WriteRequest> = (0..a.events)
        .map(|i| {
            let mut item = HashMap::new();
            item.insert(
                "eventId".to_owned(),
                AttributeValue::S(format!("ceiling-{run}-{i}")),
            );
            item.insert("programId".to_owned(), AttributeValue::S("bench-1".into()));
            item.insert(
                "programBucket".to_owned(),
                AttributeValue::S(format!("bench-1#{}", i % 16)),
            );
            item.insert("ts".to_owned(), AttributeValue::N("1795000000000".into()));
            item.insert(
                "userAgent".to_owned(),
                AttributeValue::S(mix::USER_AGENTS[0].into()),
            );
            item.insert(
                "customerName".to_owned(),
                AttributeValue::S("Bench Inc.".into()),
            );
            item.insert(
                "expiresAt".to_owned(),
                AttributeValue::N("1802776000".into()),
            );
            WriteRequest::builder()
                .put_request(
                    PutRequest::builder()
                        .set_item(Some(item))
                        .build()
                        .expect("item"),
                )
                .build()
        })
        .collect();
    let started = Instant::now();
    let chunks: Vec<Vec<WriteRequest>> = items.chunks(25).map(<[WriteRequest]>::to_vec).collect();
    futures_util::stream::iter(chunks.into_iter().map(|chunk| {
        let (ddb, table) = (ddb.clone(), table.clone());
        async move {
            let mut pending = chunk;
            while !pending.is_empty() {
                match ddb
                    .batch_write_item()
                    .request_items(&table, pending.clone())
                    .send()
                    .await
                {
                    Ok(out) => {
                        pending = out
                            .unprocessed_items
                            .and_then(|mut m| m.remove(&table))
                            .unwrap_or_default();
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    }))
    .buffer_unordered(a.concurrency)
    .collect::<Vec<_>>()
    .await;
    let ceiling = a.events as f64 / started.elapsed().as_secs_f64();

    // The consumer: fill the stream first, then time the consumer alone.
    let (kinesis, stream) = kinesis(&env)?;
    let ids: Vec<String> = (0..a.events)
        .map(|i| format!("consumer-{run}-{i}"))
        .collect();
    let mut agg =
        adtrack_proto::kpl::Aggregator::new(adtrack_proto::kpl::DEFAULT_MAX_AGGREGATE_BYTES);
    let mut records: Vec<(Vec<u8>, String)> = Vec::new();
    for id in &ids {
        let rec = adtrack_proto::kpl::UserRecord {
            partition_key: id.clone(),
            explicit_hash_key: None,
            data: bytes::Bytes::from(bench_event(id)),
        };
        if let Err(rec) = agg.push(rec) {
            records.push((agg.finish().to_vec(), id.clone()));
            agg.push(rec)
                .map_err(|_| anyhow::anyhow!("event too big"))?;
        }
    }
    if !agg.is_empty() {
        records.push((agg.finish().to_vec(), "last".into()));
    }
    for chunk in records.chunks(100) {
        let entries = chunk
            .iter()
            .map(|(d, pk)| {
                aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                    .data(aws_sdk_kinesis::primitives::Blob::new(d.clone()))
                    .partition_key(pk)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        kinesis
            .put_records()
            .stream_name(&stream)
            .set_records(Some(entries))
            .send()
            .await?;
    }
    let bin = a
        .consumer_bin
        .clone()
        .unwrap_or_else(|| servers::sibling_binary("consumer"));
    let port = servers::free_port()?;
    let mut cmd = std::process::Command::new(&bin);
    for (k, v) in &env {
        cmd.env(k, v);
    }
    cmd.env("CONSUMER_ADMIN_ADDR", format!("127.0.0.1:{port}"))
        .env("CONSUMER_WRITE_CONCURRENCY", a.concurrency.to_string())
        .env("CONSUMER_POLL_INTERVAL_MS", "200")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    // Watch the consumer's own counter (a table scan would load the stand-in).
    let deadline = Instant::now() + Duration::from_secs(600);
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    loop {
        let written = get_text(&metrics_url)
            .await
            .map(|m| metric(&m, "adtrack_consumer_items_written_total"))
            .unwrap_or(0.0);
        if written as usize >= a.events {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the consumer did not write every event within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let consumer = a.events as f64 / started.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    let found = scan_ids(&ddb, &table).await?;
    let missing = ids.iter().filter(|id| !found.contains(*id)).count();
    anyhow::ensure!(missing == 0, "{missing} events missing from the table");
    let r = ConsumerReport {
        events: a.events,
        ceiling_items_per_sec: ceiling,
        consumer_events_per_sec: consumer,
        ratio: consumer / ceiling.max(1.0),
    };
    println!(
        "consumer: {} events; stand-in BatchWriteItem ceiling {:.0} items/s ({} calls in flight); consumer {:.0} events/s from its start (start-up and lease taking included); ratio {:.2}",
        r.events, r.ceiling_items_per_sec, a.concurrency, r.consumer_events_per_sec, r.ratio
    );
    report::write_json(&cli.out, "consumer", &r)?;
    Ok(())
}
