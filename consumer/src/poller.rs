//! The poller front-end: one task per shard reads records (GetShardIterator,
//! GetRecords), writes their events, then stores the shard's checkpoint, so a
//! restart resumes after the last record fully written.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::types::ShardIteratorType;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::item::to_item;
use crate::writer::{Interrupted, Item, backoff, write_all};
use crate::{Config, metric};

/// Clients and settings every shard task shares.
pub struct Poller {
    pub kinesis: aws_sdk_kinesis::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub config: Config,
}

impl Poller {
    /// Works every shard until `stop`; picks up new shards as they appear.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut started: HashSet<String> = HashSet::new();
        let mut tasks = JoinSet::new();
        let mut attempt = 0;
        loop {
            match self.list_shards().await {
                Ok(shards) => {
                    attempt = 0;
                    for shard in shards {
                        if started.insert(shard.clone()) {
                            tracing::info!(shard, "working shard");
                            let me = self.clone();
                            let stop = stop.clone();
                            tasks.spawn(async move { me.work_shard(shard, stop).await });
                        }
                    }
                }
                Err(e) => {
                    metrics::counter!(metric::READ_ERRORS, "op" => "list_shards").increment(1);
                    tracing::warn!(error = %e, "ListShards failed; retrying");
                    attempt += 1;
                }
            }
            let pause = if attempt == 0 {
                Duration::from_secs(10)
            } else {
                Duration::from_millis(500)
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn list_shards(&self) -> anyhow::Result<Vec<String>> {
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let req = self.kinesis.list_shards();
            let req = match &token {
                Some(t) => req.next_token(t),
                None => req.stream_name(&self.config.events_stream),
            };
            let out = req.send().await.map_err(|e| {
                anyhow::anyhow!("{}", aws_sdk_kinesis::error::DisplayErrorContext(&e))
            })?;
            shards.extend(out.shards().iter().map(|s| s.shard_id().to_owned()));
            token = out.next_token().map(str::to_owned);
            if token.is_none() {
                return Ok(shards);
            }
        }
    }

    fn checkpoint_key(&self, shard: &str) -> String {
        format!("{}/{}", self.config.events_stream, shard)
    }

    async fn read_checkpoint(
        &self,
        shard: &str,
        stop: &CancellationToken,
    ) -> Result<Option<String>, Interrupted> {
        let mut attempt = 0;
        loop {
            let out = self
                .dynamodb
                .get_item()
                .table_name(&self.config.checkpoint_table)
                .key("shardKey", AttributeValue::S(self.checkpoint_key(shard)))
                .consistent_read(true)
                .send()
                .await;
            match out {
                Ok(out) => {
                    return Ok(out
                        .item
                        .and_then(|mut i| i.remove("sequenceNumber"))
                        .and_then(|v| v.as_s().ok().cloned()));
                }
                Err(e) => {
                    tracing::warn!(shard, error = %aws_sdk_dynamodb::error::DisplayErrorContext(&e), "reading checkpoint failed; retrying");
                    attempt += 1;
                    backoff(attempt, stop).await?;
                }
            }
        }
    }

    async fn write_checkpoint(
        &self,
        shard: &str,
        sequence: &str,
        stop: &CancellationToken,
    ) -> Result<(), Interrupted> {
        let mut attempt = 0;
        loop {
            let out = self
                .dynamodb
                .put_item()
                .table_name(&self.config.checkpoint_table)
                .item("shardKey", AttributeValue::S(self.checkpoint_key(shard)))
                .item("sequenceNumber", AttributeValue::S(sequence.to_owned()))
                .send()
                .await;
            match out {
                Ok(_) => {
                    metrics::counter!(metric::CHECKPOINTS).increment(1);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(shard, error = %aws_sdk_dynamodb::error::DisplayErrorContext(&e), "writing checkpoint failed; retrying");
                    attempt += 1;
                    backoff(attempt, stop).await?;
                }
            }
        }
    }

    async fn iterator(
        &self,
        shard: &str,
        after: Option<&str>,
        stop: &CancellationToken,
    ) -> Result<String, Interrupted> {
        let mut attempt = 0;
        loop {
            let req = self
                .kinesis
                .get_shard_iterator()
                .stream_name(&self.config.events_stream)
                .shard_id(shard);
            let req = match after {
                Some(seq) => req
                    .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                    .starting_sequence_number(seq),
                None if self.config.start_position == "latest" => {
                    req.shard_iterator_type(ShardIteratorType::Latest)
                }
                None => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
            };
            match req.send().await {
                Ok(out) => {
                    if let Some(it) = out.shard_iterator {
                        return Ok(it);
                    }
                }
                Err(e) => {
                    metrics::counter!(metric::READ_ERRORS, "op" => "get_shard_iterator")
                        .increment(1);
                    tracing::warn!(shard, error = %aws_sdk_kinesis::error::DisplayErrorContext(&e), "GetShardIterator failed; retrying");
                }
            }
            attempt += 1;
            backoff(attempt, stop).await?;
        }
    }

    /// Reads one shard until it ends (closed after a reshard) or `stop`.
    async fn work_shard(&self, shard: String, stop: CancellationToken) {
        let _ = self.work_shard_inner(&shard, &stop).await;
        tracing::info!(shard, "stopped working shard");
    }

    async fn work_shard_inner(
        &self,
        shard: &str,
        stop: &CancellationToken,
    ) -> Result<(), Interrupted> {
        let mut checkpoint = self.read_checkpoint(shard, stop).await?;
        if let Some(seq) = &checkpoint {
            tracing::info!(shard, sequence = %seq, "resuming after checkpoint");
        }
        let mut iterator = self.iterator(shard, checkpoint.as_deref(), stop).await?;
        let mut attempt = 0;
        loop {
            if stop.is_cancelled() {
                return Err(Interrupted);
            }
            let out = match self
                .kinesis
                .get_records()
                .shard_iterator(&iterator)
                .limit(self.config.max_records)
                .send()
                .await
            {
                Ok(out) => {
                    attempt = 0;
                    out
                }
                Err(e) => {
                    metrics::counter!(metric::READ_ERRORS, "op" => "get_records").increment(1);
                    let expired = e
                        .as_service_error()
                        .is_some_and(|s| s.is_expired_iterator_exception());
                    if expired {
                        iterator = self.iterator(shard, checkpoint.as_deref(), stop).await?;
                    } else {
                        tracing::warn!(shard, error = %aws_sdk_kinesis::error::DisplayErrorContext(&e), "GetRecords failed; retrying");
                        attempt += 1;
                        backoff(attempt, stop).await?;
                    }
                    continue;
                }
            };
            if let Some(ms) = out.millis_behind_latest {
                metrics::gauge!(metric::MILLIS_BEHIND).set(ms as f64);
            }
            let records = out.records;
            if !records.is_empty() {
                metrics::counter!(metric::RECORDS_READ).increment(records.len() as u64);
                let last = records
                    .last()
                    .map(|r| r.sequence_number().to_owned())
                    .unwrap_or_default();
                // Kinesis may deliver a record twice; one item per event id
                // per call (BatchWriteItem refuses duplicate keys).
                let mut items: HashMap<String, Item> = HashMap::with_capacity(records.len());
                for r in &records {
                    for ev in crate::item::decode_record(r.data().as_ref()) {
                        match ev {
                            Ok(ev) => {
                                let id = ev.message_id.clone();
                                items.insert(id, to_item(ev, shard, r.sequence_number()));
                            }
                            Err(e) => {
                                metrics::counter!(metric::RECORDS_BAD, "reason" => e.reason())
                                    .increment(1);
                                tracing::warn!(shard, sequence = r.sequence_number(), error = %e, "skipping data that is not an event");
                            }
                        }
                    }
                }
                write_all(
                    &self.dynamodb,
                    &self.config.events_table,
                    items.into_values().collect(),
                    stop,
                )
                .await?;
                self.write_checkpoint(shard, &last, stop).await?;
                checkpoint = Some(last);
            }
            match out.next_shard_iterator {
                Some(next) => iterator = next,
                None => {
                    tracing::info!(shard, "shard closed and fully read");
                    return Ok(());
                }
            }
            if records.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => return Err(Interrupted),
                    _ = tokio::time::sleep(self.config.poll_interval()) => {}
                }
            }
        }
    }
}
