//! Shard leases and checkpoints in the checkpoint table, so two readers on
//! one stream never both work one shard, a crashed reader's shards are taken
//! over once its leases expire, and live readers share the shards.
//!
//! Rows (partition key `shardKey`):
//! - `{stream}/{shardId}`: `sequenceNumber` (checkpoint, or `SHARD_END`),
//!   `leaseOwner`, `leaseExpiresAt` (epoch ms). Every change is a
//!   conditional write: a lease is taken only when free or expired, renewed
//!   and checkpointed only by its owner while it has not expired (a reader
//!   that stalled past its lease learns it at its next write, before another
//!   reader's work can be overwritten by its checkpoint).
//! - `{stream}/worker/{owner}`: `leaseExpiresAt`, a reader's heartbeat, so
//!   readers know how many share the stream.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;

/// Checkpoint of a shard read to its end.
pub const SHARD_END: &str = "SHARD_END";

/// One shard's row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardRow {
    pub checkpoint: Option<String>,
    pub owner: Option<String>,
    pub expires_ms: i64,
}

/// The lease table of one stream, seen by one reader.
#[derive(Debug, Clone)]
pub struct Leases {
    client: Client,
    table: String,
    stream: String,
    pub owner: String,
    duration: Duration,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

type Res<T> = Result<T, String>;

/// The condition of every write by a lease's holder: ours, and not expired.
const HELD: &str = "leaseOwner = :me AND leaseExpiresAt > :now";

fn err<E: std::error::Error + 'static>(e: aws_sdk_dynamodb::error::SdkError<E>) -> String {
    aws_sdk_dynamodb::error::DisplayErrorContext(&e).to_string()
}

impl Leases {
    pub fn new(
        client: Client,
        table: String,
        stream: String,
        owner: String,
        duration: Duration,
    ) -> Self {
        Self {
            client,
            table,
            stream,
            owner,
            duration,
        }
    }

    fn key(&self, shard: &str) -> String {
        format!("{}/{shard}", self.stream)
    }

    fn expiry(&self) -> i64 {
        now_ms() + self.duration.as_millis() as i64
    }

    /// Conditional update; `Ok(false)` when the condition did not hold.
    async fn conditional(
        &self,
        key: String,
        update: &str,
        condition: &str,
        values: Vec<(&str, AttributeValue)>,
    ) -> Res<bool> {
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("shardKey", s(&key))
            .update_expression(update)
            .condition_expression(condition);
        for (k, v) in values {
            req = req.expression_attribute_values(k, v);
        }
        match req.send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception())
                {
                    Ok(false)
                } else {
                    Err(err(e))
                }
            }
        }
    }

    /// Takes a shard's lease if it is free, expired, or already ours.
    pub async fn acquire(&self, shard: &str) -> Res<bool> {
        self.conditional(
            self.key(shard),
            "SET leaseOwner = :me, leaseExpiresAt = :exp",
            "attribute_not_exists(leaseOwner) OR leaseExpiresAt < :now OR leaseOwner = :me",
            vec![
                (":me", s(&self.owner)),
                (":exp", n(self.expiry())),
                (":now", n(now_ms())),
            ],
        )
        .await
    }

    /// Extends our lease; `Ok(false)` when it is no longer ours or expired.
    pub async fn renew(&self, shard: &str) -> Res<bool> {
        self.conditional(
            self.key(shard),
            "SET leaseExpiresAt = :exp",
            HELD,
            vec![
                (":me", s(&self.owner)),
                (":exp", n(self.expiry())),
                (":now", n(now_ms())),
            ],
        )
        .await
    }

    /// Gives our lease up.
    pub async fn release(&self, shard: &str) -> Res<bool> {
        self.conditional(
            self.key(shard),
            "REMOVE leaseOwner, leaseExpiresAt",
            "leaseOwner = :me",
            vec![(":me", s(&self.owner))],
        )
        .await
    }

    /// Stores the checkpoint, only while the lease is ours and unexpired.
    pub async fn checkpoint(&self, shard: &str, sequence: &str) -> Res<bool> {
        self.conditional(
            self.key(shard),
            "SET sequenceNumber = :seq, leaseExpiresAt = :exp",
            HELD,
            vec![
                (":me", s(&self.owner)),
                (":seq", s(sequence)),
                (":exp", n(self.expiry())),
                (":now", n(now_ms())),
            ],
        )
        .await
    }

    /// A shard's checkpoint (consistent read of its one row).
    pub async fn read_checkpoint(&self, shard: &str) -> Res<Option<String>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("shardKey", s(&self.key(shard)))
            .consistent_read(true)
            .projection_expression("sequenceNumber")
            .send()
            .await
            .map_err(err)?;
        Ok(out
            .item
            .and_then(|item| item.get("sequenceNumber")?.as_s().ok().cloned()))
    }

    /// Announces this reader (heartbeat).
    pub async fn heartbeat(&self) -> Res<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .item(
                "shardKey",
                s(&format!("{}/worker/{}", self.stream, self.owner)),
            )
            .item("leaseExpiresAt", n(self.expiry()))
            .send()
            .await
            .map(|_| ())
            .map_err(err)
    }

    /// Removes this reader's heartbeat (on a clean stop).
    pub async fn leave(&self) {
        let _ = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key(
                "shardKey",
                s(&format!("{}/worker/{}", self.stream, self.owner)),
            )
            .send()
            .await;
    }

    /// Every shard row of this stream, and the live readers (a scan of the
    /// small lease table, as KCL lists its leases).
    pub async fn snapshot(&self) -> Res<(HashMap<String, ShardRow>, Vec<String>)> {
        let prefix = format!("{}/", self.stream);
        let worker_prefix = format!("{}/worker/", self.stream);
        let now = now_ms();
        let mut shards = HashMap::new();
        let mut workers = Vec::new();
        let mut items = self
            .client
            .scan()
            .table_name(&self.table)
            .consistent_read(true)
            .into_paginator()
            .items()
            .send();
        while let Some(item) = items.next().await {
            let item = item.map_err(err)?;
            let Some(key) = item.get("shardKey").and_then(|v| v.as_s().ok()) else {
                continue;
            };
            let expires = item
                .get("leaseExpiresAt")
                .and_then(|v| v.as_n().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if let Some(worker) = key.strip_prefix(&worker_prefix) {
                if expires > now {
                    workers.push(worker.to_owned());
                }
            } else if let Some(shard) = key.strip_prefix(&prefix) {
                shards.insert(
                    shard.to_owned(),
                    ShardRow {
                        checkpoint: item
                            .get("sequenceNumber")
                            .and_then(|v| v.as_s().ok())
                            .cloned(),
                        owner: item.get("leaseOwner").and_then(|v| v.as_s().ok()).cloned(),
                        expires_ms: expires,
                    },
                );
            }
        }
        if !workers.contains(&self.owner) {
            workers.push(self.owner.clone());
        }
        Ok((shards, workers))
    }
}

impl ShardRow {
    /// Held by someone (not expired) other than `me`.
    pub fn held_by_other(&self, me: &str) -> bool {
        self.owner.as_deref().is_some_and(|o| o != me) && self.expires_ms > now_ms()
    }
}

/// Where the reader keeps its leases and checkpoints (shared by every
/// stream it reads; rows are prefixed with the stream's name).
#[derive(clap::Args, Debug, Clone)]
pub struct CheckpointArgs {
    /// DynamoDB table of shard leases and checkpoints.
    #[arg(
        long,
        env = "CHECKPOINT_TABLE",
        value_name = "CHECKPOINT_TABLE",
        default_value = "adtrack-checkpoints"
    )]
    pub checkpoint_table: String,
}
