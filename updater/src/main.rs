//! `updater`: the operators' command line for program core data.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use adtrack_proto::customer::{Customer, parse_customer_id};
use adtrack_proto::program::{Program, ProgramId, parse_program_file};
use adtrack_updater::store_config::StoreArgs;
use adtrack_updater::stream::CoreData;
use adtrack_updater::stream_config::StreamArgs;
use adtrack_updater::{
    DeleteOutcome, Entry, ProgramTable, Programs, WriteOutcome, absent_from, plan_against,
};
use anyhow::{Context, Result, bail};
use aws_config::BehaviorVersion;
use clap::{Parser, Subcommand};

/// Program core data: the DynamoDB programs table is the source of truth,
/// Redis the trackers' copy. Every write goes to the table first, then to
/// Redis with its PUBLISH, so running trackers apply it without a restart.
///
/// AWS endpoints, region and credentials come from the standard AWS SDK
/// chain (`AWS_ENDPOINT_URL_DYNAMODB` points it at a local stand-in).
#[derive(Parser, Debug)]
#[command(name = "updater", version)]
struct Cli {
    #[command(flatten)]
    store: StoreArgs,
    /// Print what a write would do; write nothing.
    #[arg(long, global = true)]
    dry_run: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load programs from FILE ('-' for stdin): a JSON array such as the
    /// reference data.json, or JSON lines. Every record is checked first;
    /// on any error nothing is written. Only what differs from the table is
    /// written, so running a load again finishes an interrupted one.
    Load {
        file: String,
        /// Conditional table writes in flight at once.
        #[arg(long, default_value_t = adtrack_updater::LOAD_CONCURRENCY)]
        concurrency: usize,
    },
    /// Write one program given as a JSON object.
    Put { json: String },
    /// Delete a program (trackers stop accepting it at once).
    Delete { program_id: String },
    /// Print a program as the table holds it, with its version (its
    /// postback secret masked).
    Get { program_id: String },
    /// List the programs: id, version, state.
    List,
    /// Print every program as JSON lines, which `load` takes back unchanged
    /// (postback secrets included: keep the output as safe as the table).
    Export,
    /// Show what loading FILE would change.
    Diff { file: String },
    /// Delete every program absent from FILE.
    Prune {
        file: String,
        /// Really delete (without it, prune only lists what it would delete).
        #[arg(long)]
        yes: bool,
    },
    /// Apply the core-data stream: each record a program (the operators'
    /// JSON) or {"op":"delete","programId":"..."}, through the table and
    /// Redis like the other writes; bad records go to the dead-letter table.
    /// Runs until SIGTERM (locally; in AWS the updater Lambda reads the
    /// stream).
    Stream(StreamArgs),
    /// Customer records: the kill switch and the rate limits that apply to
    /// every program of a customer.
    #[command(subcommand)]
    Customer(CustomerCommand),
    /// Bring Redis back to the table's content and publish what changed.
    Sync {
        /// Keep syncing: at once when Redis lost its data, and fully every
        /// `--full-every-secs`.
        #[arg(long)]
        watch: bool,
        /// How often a watching sync checks Redis, in milliseconds.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
        check_every_ms: u64,
        /// How often a watching sync compares everything, in seconds.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        full_every_secs: u64,
        /// Also delete from Redis the programs the table does not hold
        /// (never while the table is empty).
        #[arg(long)]
        prune: bool,
    },
}

#[derive(Subcommand, Debug)]
enum CustomerCommand {
    /// Write one customer record given as a JSON object, such as
    /// {"customerId":9123,"enabled":false} or
    /// {"customerId":9123,"rateLimit":500,"rateBurst":2000}. Every tracker
    /// applies it as soon as the change reaches it.
    Put { json: String },
    /// Switch a customer off: every tracker stops accepting its programs.
    Disable { customer_id: String },
    /// Switch a customer back on (its other settings kept).
    Enable { customer_id: String },
    /// Print a customer record with its version.
    Get { customer_id: String },
    /// List the customer records: id, version, state, rate limit.
    List,
    /// Delete a customer record: the customer takes the defaults again
    /// (enabled, the trackers' default rate limit).
    Delete { customer_id: String },
}

/// mimalloc instead of the system allocator: a load allocates per request
/// (the SDK builds, signs and parses every call), and glibc's malloc and
/// free were a fifth of the updater's CPU in a profile of a 100,000-program
/// load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    adtrack_service::init_logging("text");
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("updater: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn read_file(file: &str) -> Result<String> {
    if file == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {file}"))
    }
}

/// The programs of a file, or every error in it (exit 2, nothing written).
fn parse_file(file: &str) -> Result<std::result::Result<Vec<Program>, ExitCode>> {
    let text = read_file(file)?;
    Ok(match parse_program_file(&text) {
        Ok(p) => Ok(p),
        Err(errors) => {
            for e in &errors {
                eprintln!("updater: {file}: {e}");
            }
            eprintln!(
                "updater: {} invalid record(s); nothing written",
                errors.len()
            );
            Err(ExitCode::from(2))
        }
    })
}

async fn aws() -> aws_config::SdkConfig {
    aws_as("adtrack-updater").await
}

/// The AWS configuration, calling as `app` (the user agent's app name, seen
/// in CloudTrail; `updater stream` calls as `adtrack-updater-stream`, since
/// it runs only locally, where the updater Lambda runs in AWS).
async fn aws_as(app: &'static str) -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .app_name(aws_config::AppName::new(app).expect("a valid app name"))
        .load()
        .await
}

async fn table(cli: &Cli) -> ProgramTable {
    cli.store.table(&aws().await)
}

async fn programs_with(cli: &Cli, aws: &aws_config::SdkConfig) -> Result<Programs> {
    cli.store.connect(aws).await
}

async fn programs(cli: &Cli) -> Result<Programs> {
    programs_with(cli, &aws().await).await
}

fn parse_id(s: &str) -> Result<ProgramId> {
    match ProgramId::parse(s) {
        Ok(id) => Ok(id),
        Err(e) => bail!("{s:?}: {e}"),
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Load { file, concurrency } => {
            let programs = match parse_file(file)? {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let mut store = self::programs(&cli).await?;
            store.load_concurrency = *concurrency;
            if cli.dry_run {
                let plan = store.plan(&programs).await?;
                print_plan(&plan);
                return Ok(ExitCode::SUCCESS);
            }
            let report = store.load(&programs).await?;
            for (id, v) in &report.plan.stale {
                eprintln!("updater: program {id} not written: the table holds newer version {v}");
            }
            println!(
                "loaded {} program(s): {} added, {} changed, {} unchanged, {} stale; {} written to Redis",
                programs.len(),
                report.plan.added.len(),
                report.plan.changed.len(),
                report.plan.unchanged,
                report.plan.stale.len() + report.lost_races,
                report.redis_written,
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Diff { file } => {
            let programs = match parse_file(file)? {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let stored = table(&cli).await.scan_all().await?;
            let plan = plan_against(&stored, &programs);
            print_plan(&plan);
            for id in absent_from(&stored, &programs) {
                println!("absent from the file (prune would delete): {id}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Prune { file, yes } => {
            let programs = match parse_file(file)? {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let store = self::programs(&cli).await?;
            let stored = store.table.scan_all().await?;
            let gone = absent_from(&stored, &programs);
            if gone.is_empty() {
                println!("nothing to prune: every program is in {file}");
                return Ok(ExitCode::SUCCESS);
            }
            if cli.dry_run || !yes {
                for id in &gone {
                    println!("would delete {id}");
                }
                if cli.dry_run {
                    return Ok(ExitCode::SUCCESS);
                }
                eprintln!(
                    "updater: {} program(s) absent from {file}; nothing deleted: run again with --yes",
                    gone.len()
                );
                return Ok(ExitCode::from(2));
            }
            for id in &gone {
                store.delete(id).await?;
                println!("deleted {id}");
            }
            println!("pruned {} program(s)", gone.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Put { json } => {
            let value: serde_json::Value =
                serde_json::from_str(json).context("the program is not valid JSON")?;
            let program = Program::from_json(&value).map_err(|e| anyhow::anyhow!("{e}"))?;
            let store = self::programs(&cli).await?;
            if cli.dry_run {
                let plan = store.plan(std::slice::from_ref(&program)).await?;
                print_plan(&plan);
                return Ok(ExitCode::SUCCESS);
            }
            let outcome = store.put(&program).await?;
            Ok(report_write("program", &program.program_id, outcome))
        }
        Command::Delete { program_id } => {
            let id = parse_id(program_id)?;
            let store = self::programs(&cli).await?;
            if cli.dry_run {
                match store.table.get(&id).await? {
                    Some(Entry::Present(p)) => {
                        println!("would delete {id} (version {})", p.version)
                    }
                    Some(Entry::Deleted { version }) => {
                        println!("{id} is already deleted (version {version})")
                    }
                    None => println!("no program {id}; would record its deletion"),
                }
                return Ok(ExitCode::SUCCESS);
            }
            let outcome = store.delete(&id).await?;
            Ok(report_delete("program", &id, outcome))
        }
        Command::Get { program_id } => {
            let id = parse_id(program_id)?;
            match table(&cli).await.get(&id).await? {
                Some(Entry::Present(p)) => {
                    // The postback secret is masked; `export` carries it.
                    println!("{}", p.to_masked_json());
                    Ok(ExitCode::SUCCESS)
                }
                Some(Entry::Deleted { version }) => {
                    eprintln!("updater: program {id} was deleted (version {version})");
                    Ok(ExitCode::from(4))
                }
                None => {
                    eprintln!("updater: no program {id}");
                    Ok(ExitCode::from(4))
                }
            }
        }
        Command::List => {
            let stored = table(&cli).await.scan_all().await?;
            let mut out = std::io::stdout().lock();
            let now = time::OffsetDateTime::now_utc();
            for (id, entry) in &stored {
                let state = match entry {
                    Entry::Present(p) if p.is_active_at(now) => "active",
                    Entry::Present(_) => "inactive",
                    Entry::Deleted { .. } => "deleted",
                };
                writeln!(out, "{id}\t{}\t{state}", entry.version())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export => {
            let stored = table(&cli).await.scan_all().await?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for entry in stored.values() {
                if let Entry::Present(p) = entry {
                    writeln!(out, "{}", p.to_json())?;
                }
            }
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stream(args) => {
            let aws = aws_as("adtrack-updater-stream").await;
            let dynamodb = aws_sdk_dynamodb::Client::new(&aws);
            let handler = CoreData {
                store: programs_with(&cli, &aws).await?,
                dynamodb: dynamodb.clone(),
                stream: args.core_data.core_data_stream.clone(),
                dead_letter_table: args.core_data.dead_letters.dead_letter_table.clone(),
                max_attempts: 0,
            };
            let reader = std::sync::Arc::new(adtrack_reader::Reader::new(
                aws_sdk_kinesis::Client::new(&aws),
                dynamodb,
                adtrack_reader::owner_name("updater"),
                args.settings(),
                handler,
            ));
            tracing::info!(stream = %args.core_data.core_data_stream, "applying the core-data stream");
            reader.run(adtrack_service::shutdown_on_signals()).await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Customer(command) => customer(&cli, command).await,
        Command::Sync {
            watch,
            check_every_ms,
            full_every_secs,
            prune,
        } => {
            let store = self::programs(&cli).await?;
            if !watch {
                if cli.dry_run {
                    bail!("sync has no dry run");
                }
                let report = store.sync(*prune).await?;
                println!("{}", sync_line(&report));
                return Ok(ExitCode::SUCCESS);
            }
            let shutdown = adtrack_service::shutdown_on_signals();
            adtrack_updater::watch(
                &store,
                *prune,
                Duration::from_millis(*check_every_ms),
                Duration::from_secs(*full_every_secs),
                &shutdown,
            )
            .await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn parse_customer(s: &str) -> Result<i32> {
    parse_customer_id(s).map_err(|e| anyhow::anyhow!("{e}"))
}

async fn customer(cli: &Cli, command: &CustomerCommand) -> Result<ExitCode> {
    let store = self::programs(cli).await?;
    let table = store.customer_table()?;
    let written =
        |customer: &Customer, outcome| report_write("customer", &customer.customer_id, outcome);
    match command {
        CustomerCommand::Put { json } => {
            let value: serde_json::Value =
                serde_json::from_str(json).context("the customer record is not valid JSON")?;
            let customer = Customer::from_json(&value).map_err(|e| anyhow::anyhow!("{e}"))?;
            if cli.dry_run {
                println!("would write {}", customer.to_json());
                return Ok(ExitCode::SUCCESS);
            }
            let outcome = store.put_customer(&customer).await?;
            Ok(written(&customer, outcome))
        }
        CustomerCommand::Disable { customer_id } | CustomerCommand::Enable { customer_id } => {
            let id = parse_customer(customer_id)?;
            let enabled = matches!(command, CustomerCommand::Enable { .. });
            let mut customer = match table.get(&id).await? {
                Some(Entry::Present(c)) => c,
                _ => Customer::default_for(id),
            };
            customer.enabled = enabled;
            // The next version: a concurrent change of the record wins or
            // loses as a whole, never half.
            customer.version = 0;
            if cli.dry_run {
                println!("would write {}", customer.to_json());
                return Ok(ExitCode::SUCCESS);
            }
            let outcome = store.put_customer(&customer).await?;
            Ok(written(&customer, outcome))
        }
        CustomerCommand::Get { customer_id } => {
            let id = parse_customer(customer_id)?;
            match table.get(&id).await? {
                Some(Entry::Present(c)) => {
                    println!("{}", c.to_json());
                    Ok(ExitCode::SUCCESS)
                }
                Some(Entry::Deleted { version }) => {
                    eprintln!(
                        "updater: customer {id}'s record was deleted (version {version}): it takes the defaults"
                    );
                    Ok(ExitCode::from(4))
                }
                None => {
                    eprintln!("updater: no record for customer {id}: it takes the defaults");
                    Ok(ExitCode::from(4))
                }
            }
        }
        CustomerCommand::List => {
            let stored = table.scan_all().await?;
            let mut out = std::io::stdout().lock();
            for (id, entry) in &stored {
                let (state, rate) = match entry {
                    Entry::Present(c) => (
                        if c.enabled { "enabled" } else { "disabled" },
                        c.rate_limit
                            .map_or_else(|| "default".to_owned(), |r| r.to_string()),
                    ),
                    Entry::Deleted { .. } => ("deleted", "default".to_owned()),
                };
                writeln!(out, "{id}\t{}\t{state}\t{rate}", entry.version())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        CustomerCommand::Delete { customer_id } => {
            let id = parse_customer(customer_id)?;
            if cli.dry_run {
                println!("would delete the record of customer {id}");
                return Ok(ExitCode::SUCCESS);
            }
            let outcome = store.delete_customer_at(id, 0).await?;
            Ok(report_delete("customer", &id, outcome))
        }
    }
}

/// What a write of a program or customer record did, said to the operator;
/// the exit code (3: the table holds a newer version).
fn report_write(kind: &str, id: &dyn std::fmt::Display, outcome: WriteOutcome) -> ExitCode {
    match outcome {
        WriteOutcome::Written(v) => {
            println!("{kind} {id} written, version {v}");
            ExitCode::SUCCESS
        }
        WriteOutcome::Stale(v) => {
            eprintln!("updater: {kind} {id} not written: the table holds newer version {v}");
            ExitCode::from(3)
        }
    }
}

/// What a delete did, said to the operator; the exit code (4: there was
/// nothing to delete).
fn report_delete(kind: &str, id: &dyn std::fmt::Display, outcome: DeleteOutcome) -> ExitCode {
    match outcome {
        DeleteOutcome::Deleted(v) => {
            println!("{kind} {id} deleted, version {v}");
            ExitCode::SUCCESS
        }
        DeleteOutcome::Tombstoned(v) => {
            eprintln!(
                "updater: no {kind} {id}; recorded its deletion (version {v}) so an older write cannot create it"
            );
            ExitCode::from(4)
        }
        DeleteOutcome::AlreadyDeleted(v) | DeleteOutcome::Stale(v) => {
            eprintln!("updater: {kind} {id} was already deleted (version {v})");
            ExitCode::from(4)
        }
    }
}

fn print_plan(plan: &adtrack_updater::LoadPlan) {
    for id in &plan.added {
        println!("add {id}");
    }
    for id in &plan.changed {
        println!("change {id}");
    }
    for (id, v) in &plan.stale {
        println!("stale {id} (the table holds version {v})");
    }
    println!(
        "{} to add, {} to change, {} unchanged, {} stale",
        plan.added.len(),
        plan.changed.len(),
        plan.unchanged,
        plan.stale.len()
    );
}

fn sync_line(r: &adtrack_updater::SyncReport) -> String {
    format!(
        "synced Redis with the table ({} item(s)): {} written, {} deleted, {} pruned, {} only in Redis, {} ahead; {} customer record(s), {} written{}",
        r.table_items,
        r.written,
        r.deleted,
        r.pruned,
        r.only_in_redis,
        r.ahead,
        r.customer_items,
        r.customers_written,
        if r.redis_was_incomplete {
            "; Redis had lost its data"
        } else {
            ""
        }
    )
}
