//! `adtrack-bench`: fixed-rate load with honest latency, the highest rate
//! under a p99 target, a side-by-side with nginx, end-to-end accounting
//! through the whole local stack, start-up and update-visibility timings.

mod accounting;
mod http;
mod load;
mod metrics;
mod mix;
mod modes;
mod procstat;
mod report;
mod servers;
mod stack;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::modes::compare::CompareArgs;
use crate::modes::consumer::ConsumerArgs;
use crate::modes::load::LoadArgs;
use crate::modes::max::MaxArgs;
use crate::modes::seed::SeedArgs;
use crate::modes::update_latency::UpdateArgs;

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (stack, out) = (&cli.stack, &cli.out);
    match cli.mode.clone_mode() {
        Mode::Load(a) => modes::load::run(stack, out, a).await,
        Mode::E2e(a) => modes::e2e::run(stack, out, a).await,
        Mode::Max(a) => modes::max::run(stack, out, a).await,
        Mode::Compare(a) => modes::compare::run(stack, out, a).await,
        Mode::Seed(a) => modes::seed::run(stack, a).await,
        Mode::Startup(a) => modes::startup::run(stack, out, a).await,
        Mode::UpdateLatency(a) => modes::update_latency::run(stack, out, a).await,
        Mode::Consumer(a) => modes::consumer::run(stack, out, a).await,
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
