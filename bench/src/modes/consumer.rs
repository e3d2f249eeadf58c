//! `consumer`: the consumer's throughput next to the DynamoDB stand-in's own
//! BatchWriteItem ceiling, measured the same way.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::http::get_text;
use crate::metrics::metric;
use crate::stack::{dynamodb, kinesis, provision_stream, scan_ids};
use crate::{mix, report, servers};

#[derive(Args, Debug, Clone)]
pub struct ConsumerArgs {
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

/// Creates `name` with the key schema, attributes and global secondary
/// indexes of `like`; returns its name once it is active.
async fn fresh_copy(ddb: &aws_sdk_dynamodb::Client, like: &str, name: &str) -> Result<String> {
    use aws_sdk_dynamodb::types::{GlobalSecondaryIndex, TableStatus};
    let desc = ddb
        .describe_table()
        .table_name(like)
        .send()
        .await
        .with_context(|| format!("describing {like}"))?
        .table
        .context("no table description")?;
    let indexes: Vec<GlobalSecondaryIndex> = desc
        .global_secondary_indexes()
        .iter()
        .filter_map(|g| {
            GlobalSecondaryIndex::builder()
                .set_index_name(g.index_name().map(str::to_owned))
                .set_key_schema(Some(g.key_schema().to_vec()))
                .set_projection(g.projection().cloned())
                .build()
                .ok()
        })
        .collect();
    ddb.create_table()
        .table_name(name)
        .set_key_schema(Some(desc.key_schema().to_vec()))
        .set_attribute_definitions(Some(desc.attribute_definitions().to_vec()))
        .set_global_secondary_indexes((!indexes.is_empty()).then_some(indexes))
        .billing_mode(aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
        .send()
        .await
        .with_context(|| format!("creating {name}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = ddb
            .describe_table()
            .table_name(name)
            .send()
            .await?
            .table
            .and_then(|t| t.table_status);
        if status == Some(TableStatus::Active) {
            return Ok(name.to_owned());
        }
        anyhow::ensure!(Instant::now() < deadline, "{name} did not become active");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ceiling: the same items written straight with BatchWriteItem (25 per
/// call, `concurrency` in flight) into a fresh table defined like the
/// events table. Consumer: the same number of events put
/// in the stream, then the consumer started and timed until all are items.
pub async fn run(stack_env: &Path, out: &Path, a: ConsumerArgs) -> Result<()> {
    use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
    use futures_util::StreamExt;
    use prost::Message;
    let env = servers::read_stack_env(stack_env)?;
    let ddb = dynamodb(&env)?;
    let table = env
        .get("EVENTS_TABLE")
        .cloned()
        .unwrap_or_else(|| "adtrack-events".into());
    let run = uuid::Uuid::now_v7().simple().to_string();
    // Each side writes into a fresh, empty table defined like the events
    // table (keys and indexes): the stand-in slows as a table grows, so
    // neither side may pay for the other's items or earlier runs'.
    let consumer_table = fresh_copy(&ddb, &table, &format!("bench-consumer-{run}")).await?;
    let table = fresh_copy(&ddb, &table, &format!("bench-ceiling-{run}")).await?;
    // The ceiling, with the very items the consumer writes for these events
    // (its own item builder, a Kinesis-like sequence number).
    let items: Vec<WriteRequest> = (0..a.events)
        .map(|i| {
            let id = format!("ceiling-{run}-{i}");
            let ev = adtrack_proto::v1::TrackingEvent::decode(&bench_event(&id)[..])
                .expect("bench event");
            let seq = format!("{:056}", i);
            let item = adtrack_consumer::item::to_item(ev, "shardId-000000000000", &seq, 90)
                .expect("item");
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
    let _ = ddb.delete_table().table_name(&table).send().await;
    let table = consumer_table;

    // The consumer: fill the stream first, then time the consumer alone.
    // A fresh stream of its own, so nothing an earlier run left unread is
    // counted (the consumer's checkpoints are keyed by stream and shard).
    let (kinesis, _) = kinesis(&env)?;
    let stream = provision_stream(&env, &format!("bench-consumer-{run}"), 2).await?;
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
    cmd.env("EVENTS_TABLE", &table)
        .env("EVENTS_STREAM", &stream);
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
    let _ = ddb.delete_table().table_name(&table).send().await;
    let _ = kinesis.delete_stream().stream_name(&stream).send().await;
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
    report::write_json(out, "consumer", &r)?;
    Ok(())
}
