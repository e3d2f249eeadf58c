//! The local stack a mode runs against, as `dev/.stack.env` describes it:
//! the tracker's URL, AWS clients for the Kinesis and DynamoDB stand-ins,
//! table scans and stream provisioning.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};

pub fn target(common_target: &Option<String>, env: &HashMap<String, String>) -> Result<String> {
    match common_target {
        Some(t) => Ok(t.clone()),
        None => env
            .get("TRACKER_URL")
            .cloned()
            .context("no --target and no TRACKER_URL in the stack file"),
    }
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

pub fn dynamodb(env: &HashMap<String, String>) -> Result<aws_sdk_dynamodb::Client> {
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

pub async fn scan_ids(ddb: &aws_sdk_dynamodb::Client, table: &str) -> Result<HashSet<String>> {
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
pub fn kinesis(env: &HashMap<String, String>) -> Result<(aws_sdk_kinesis::Client, String)> {
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

/// Creates `name` with `shards` shards unless it exists; waits until active.
pub async fn provision_stream(
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
