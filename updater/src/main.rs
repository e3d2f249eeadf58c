//! `updater`: the operators' command line for program core data.

use std::io::Read;
use std::process::ExitCode;

use adtrack_proto::program::{Program, ProgramId, parse_program_file};
use adtrack_proto::redis_layout::StoredProgram;
use adtrack_updater::{DeleteOutcome, ProgramStore, WriteOutcome};
use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Writes program core data to Redis and publishes each change, so running
/// trackers apply it without a restart.
#[derive(Parser, Debug)]
#[command(name = "updater", version)]
struct Cli {
    /// Redis holding the program core data.
    #[arg(
        long,
        env = "REDIS_URL",
        value_name = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load programs from FILE ('-' for stdin): a JSON array such as the
    /// reference data.json, or JSON lines. Every record is checked first;
    /// on any error nothing is written. The load is applied atomically.
    Load { file: String },
    /// Write one program given as a JSON object.
    Put { json: String },
    /// Delete a program (trackers stop accepting it at once).
    Delete { program_id: String },
    /// Print a program as stored, with its version.
    Get { program_id: String },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("updater: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Load { file } => {
            let text = if file == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading stdin")?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?
            };
            let programs = match parse_program_file(&text) {
                Ok(p) => p,
                Err(errors) => {
                    for e in &errors {
                        eprintln!("updater: {file}: {e}");
                    }
                    eprintln!(
                        "updater: {} invalid record(s); nothing written",
                        errors.len()
                    );
                    return Ok(ExitCode::from(2));
                }
            };
            let mut store = ProgramStore::connect(&cli.redis_url).await?;
            let outcomes = store.load(&programs).await?;
            let mut stale = 0;
            for (p, o) in programs.iter().zip(&outcomes) {
                if let WriteOutcome::Stale(v) = o {
                    stale += 1;
                    eprintln!(
                        "updater: program {} not written: Redis holds newer version {v}",
                        p.program_id
                    );
                }
            }
            println!(
                "loaded {} program(s): {} written, {} stale",
                programs.len(),
                programs.len() - stale,
                stale
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Put { json } => {
            let value: serde_json::Value =
                serde_json::from_str(&json).context("the program is not valid JSON")?;
            let program = Program::from_json(&value).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut store = ProgramStore::connect(&cli.redis_url).await?;
            match store.put(&program).await? {
                WriteOutcome::Written(v) => {
                    println!("program {} written, version {v}", program.program_id);
                    Ok(ExitCode::SUCCESS)
                }
                WriteOutcome::Stale(v) => {
                    eprintln!(
                        "updater: program {} not written: Redis holds newer version {v}",
                        program.program_id
                    );
                    Ok(ExitCode::from(3))
                }
            }
        }
        Command::Delete { program_id } => {
            let id = parse_id(&program_id)?;
            let mut store = ProgramStore::connect(&cli.redis_url).await?;
            match store.delete(&id).await? {
                DeleteOutcome::Deleted(v) => {
                    println!("program {id} deleted, version {v}");
                    Ok(ExitCode::SUCCESS)
                }
                DeleteOutcome::Tombstoned(v) => {
                    eprintln!(
                        "updater: no program {id}; recorded its deletion (version {v}) so an older write cannot create it"
                    );
                    Ok(ExitCode::from(4))
                }
                DeleteOutcome::AlreadyDeleted(v) => {
                    eprintln!("updater: program {id} was already deleted (version {v})");
                    Ok(ExitCode::from(4))
                }
            }
        }
        Command::Get { program_id } => {
            let id = parse_id(&program_id)?;
            let mut store = ProgramStore::connect(&cli.redis_url).await?;
            match store.get(&id).await? {
                StoredProgram::Present(p) => {
                    println!("{}", p.to_json());
                    Ok(ExitCode::SUCCESS)
                }
                StoredProgram::Deleted { version } => {
                    eprintln!("updater: program {id} was deleted (version {version})");
                    Ok(ExitCode::from(4))
                }
                StoredProgram::Absent => {
                    eprintln!("updater: no program {id}");
                    Ok(ExitCode::from(4))
                }
            }
        }
    }
}

fn parse_id(s: &str) -> Result<ProgramId> {
    match ProgramId::parse(s) {
        Ok(id) => Ok(id),
        Err(e) => bail!("{s:?}: {e}"),
    }
}
