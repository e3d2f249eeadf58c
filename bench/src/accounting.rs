//! End-to-end accounting after an e2e run: every answered event followed
//! into DynamoDB, the tracker's counters, the dead letters and the stream.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::http::get_text;
use crate::load;
use crate::metrics::metric;
use crate::stack::{dynamodb, kinesis, scan_ids};

#[derive(Serialize, Default)]
pub struct E2eCounts {
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
    pub lost: usize,
    pub duplicated_in_stream: usize,
}

/// After an e2e run: where did every answered event go?
pub async fn account(
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

async fn stream_duplicates(env: &HashMap<String, String>, ids: &HashSet<&String>) -> Result<usize> {
    use adtrack_proto::kpl::{Deaggregated, deaggregate};
    use adtrack_proto::v1::TrackingEvent;
    use aws_sdk_kinesis::types::ShardIteratorType;
    use prost::Message;
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
                // Events are counted by their own id (message_id): user
                // records of an aggregate share the record's partition key.
                let event_id = |data: &[u8]| {
                    TrackingEvent::decode(data)
                        .map(|e| e.message_id)
                        .unwrap_or_default()
                };
                let keys: Vec<String> = match deaggregate(r.data().as_ref()) {
                    Ok(Deaggregated::Records(users)) => {
                        users.iter().map(|u| event_id(&u.data)).collect()
                    }
                    _ => vec![event_id(r.data().as_ref())],
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
