//! The reader: leases shards, works each leased shard in its own task
//! (GetShardIterator, GetRecords, the handler), stores the checkpoint only
//! after the records before it are done, follows a closed shard to its
//! children once it is read to the end, and shares the shards with the
//! other live readers of the stream.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use adtrack_service::retry::{CALLS, Stopped};
use aws_sdk_kinesis::types::{Shard, ShardIteratorType};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::lease::{Leases, SHARD_END};
use crate::{Handler, Record, Settings, StartPosition};

/// A shard's parents: the split or merged shard, and the merge's other one.
fn parents(s: &Shard) -> impl Iterator<Item = &str> {
    [s.parent_shard_id(), s.adjacent_parent_shard_id()]
        .into_iter()
        .flatten()
}

/// One stream's reader: clients, settings and the handler every shard task
/// shares.
pub struct Reader<H> {
    kinesis: aws_sdk_kinesis::Client,
    leases: Leases,
    settings: Settings,
    handler: H,
    names: Names,
}

/// The reader's metric names, under its prefix.
struct Names {
    checkpoints: String,
    read_errors: String,
    leases_held: String,
    lease_changes: String,
    millis_behind: String,
}

impl Names {
    fn new(prefix: &str) -> Self {
        Self {
            checkpoints: format!("{prefix}_checkpoints_total"),
            read_errors: format!("{prefix}_read_errors_total"),
            leases_held: format!("{prefix}_leases_held"),
            lease_changes: format!("{prefix}_lease_changes_total"),
            millis_behind: format!("{prefix}_millis_behind_latest"),
        }
    }
}

/// The shard task ends: stopped, or its lease is gone.
struct Interrupted;

impl From<Stopped> for Interrupted {
    fn from(_: Stopped) -> Self {
        Interrupted
    }
}

async fn backoff(attempt: u32, stop: &CancellationToken) -> Result<(), Interrupted> {
    Ok(CALLS.sleep(attempt, stop).await?)
}

struct Worked {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl<H: Handler> Reader<H> {
    /// A reader of `settings.stream` named `owner` in the lease table.
    pub fn new(
        kinesis: aws_sdk_kinesis::Client,
        dynamodb: aws_sdk_dynamodb::Client,
        owner: String,
        settings: Settings,
        handler: H,
    ) -> Self {
        let leases = Leases::new(
            dynamodb,
            settings.checkpoint_table.clone(),
            settings.stream.clone(),
            owner,
            settings.lease_duration,
        );
        let names = Names::new(settings.metric_prefix);
        Self {
            kinesis,
            leases,
            settings,
            handler,
            names,
        }
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Coordinates leases until `stop`, then stops every shard task (their
    /// checkpoints stay where the data is durable) and gives the leases up.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut worked: HashMap<String, Worked> = HashMap::new();
        let tick = (self.settings.lease_duration / 3).max(Duration::from_millis(200));
        loop {
            worked.retain(|_, w| !w.task.is_finished());
            if let Err(e) = self.coordinate(&mut worked, &stop).await {
                tracing::warn!(error = %e, "lease coordination failed; retrying");
            }
            metrics::gauge!(self.names.leases_held.clone()).set(worked.len() as f64);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(tick) => {}
            }
        }
        for (shard, w) in worked.drain() {
            w.stop.cancel();
            let _ = w.task.await;
            let _ = self.leases.release(&shard).await;
        }
        self.leases.leave().await;
    }

    async fn coordinate(
        self: &Arc<Self>,
        worked: &mut HashMap<String, Worked>,
        stop: &CancellationToken,
    ) -> Result<(), String> {
        self.leases.heartbeat().await?;
        let shards = self.list_shards().await?;
        let (rows, workers) = self.leases.snapshot().await?;
        let ids: HashSet<&str> = shards.iter().map(|s| s.shard_id()).collect();
        let done = |id: &str| rows.get(id).and_then(|r| r.checkpoint.as_deref()) == Some(SHARD_END);
        // Workable: not read to its end, and its parents (if still in the
        // stream) are: children wait for both parents of a merge, and for the
        // parent of a split, so order is kept.
        let workable: Vec<&Shard> = shards
            .iter()
            .filter(|s| !done(s.shard_id()))
            .filter(|s| parents(s).all(|p| !ids.contains(p) || done(p)))
            .collect();
        let target = workable.len().div_ceil(workers.len().max(1));

        // Renew ours; drop those we lost.
        for shard in worked.keys().cloned().collect::<Vec<_>>() {
            if !self.leases.renew(&shard).await? {
                tracing::warn!(shard, "lease lost; stopping work on the shard");
                metrics::counter!(self.names.lease_changes.clone(), "change" => "lost")
                    .increment(1);
                if let Some(w) = worked.remove(&shard) {
                    w.stop.cancel();
                    let _ = w.task.await;
                }
            }
        }
        // Share: give one up when we hold more than our part and another
        // live reader holds less.
        let mut held: HashMap<&str, usize> = HashMap::new();
        for r in rows.values() {
            if let Some(o) = &r.owner
                && r.expires_ms > 0
                && r.held_by_other(&self.leases.owner)
            {
                *held.entry(o.as_str()).or_default() += 1;
            }
        }
        let someone_short = workers
            .iter()
            .filter(|w| **w != self.leases.owner)
            .any(|w| held.get(w.as_str()).copied().unwrap_or(0) < target);
        if worked.len() > target
            && someone_short
            && let Some(shard) = worked.keys().next().cloned()
            && let Some(w) = worked.remove(&shard)
        {
            w.stop.cancel();
            let _ = w.task.await;
            self.leases.release(&shard).await?;
            metrics::counter!(self.names.lease_changes.clone(), "change" => "released")
                .increment(1);
            tracing::info!(shard, "lease released to share the stream");
        }
        // Take free or expired shards up to our part.
        for s in workable {
            let shard = s.shard_id();
            if worked.len() >= target {
                break;
            }
            if worked.contains_key(shard)
                || rows
                    .get(shard)
                    .is_some_and(|r| r.held_by_other(&self.leases.owner))
            {
                continue;
            }
            if self.leases.acquire(shard).await? {
                metrics::counter!(self.names.lease_changes.clone(), "change" => "acquired")
                    .increment(1);
                tracing::info!(shard, "lease acquired; working shard");
                let me = self.clone();
                let token = stop.child_token();
                let t = token.clone();
                let id = shard.to_owned();
                // A child of a shard this stream's consumers have read starts
                // at its beginning, whatever CONSUMER_START_POSITION says:
                // `latest` is for the shards there at the first start.
                let from_start = parents(s).any(|p| rows.contains_key(p));
                let task = tokio::spawn(async move { me.work_shard(id, from_start, t).await });
                worked.insert(shard.to_owned(), Worked { stop: token, task });
            }
        }
        Ok(())
    }

    async fn list_shards(&self) -> Result<Vec<Shard>, String> {
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let req = self.kinesis.list_shards();
            let req = match &token {
                Some(t) => req.next_token(t),
                None => req.stream_name(&self.settings.stream),
            };
            let out = req.send().await.map_err(|e| {
                metrics::counter!(self.names.read_errors.clone(), "op" => "list_shards")
                    .increment(1);
                aws_sdk_kinesis::error::DisplayErrorContext(&e).to_string()
            })?;
            shards.extend(out.shards.unwrap_or_default());
            token = out.next_token;
            if token.is_none() {
                return Ok(shards);
            }
        }
    }

    async fn iterator(
        &self,
        shard: &str,
        after: Option<&str>,
        from_start: bool,
        stop: &CancellationToken,
    ) -> Result<String, Interrupted> {
        let mut attempt = 0;
        loop {
            let req = self
                .kinesis
                .get_shard_iterator()
                .stream_name(&self.settings.stream)
                .shard_id(shard);
            let req = match after {
                Some(seq) => req
                    .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                    .starting_sequence_number(seq),
                None if self.settings.start_position == StartPosition::Latest && !from_start => {
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
                    metrics::counter!(self.names.read_errors.clone(), "op" => "get_shard_iterator")
                        .increment(1);
                    tracing::warn!(shard, error = %aws_sdk_kinesis::error::DisplayErrorContext(&e), "GetShardIterator failed; retrying");
                }
            }
            attempt += 1;
            backoff(attempt, stop).await?;
        }
    }

    /// Works one leased shard until it ends, the lease is lost, or `stop`.
    async fn work_shard(&self, shard: String, from_start: bool, stop: CancellationToken) {
        match self.work_shard_inner(&shard, from_start, &stop).await {
            Ok(()) => {
                let _ = self.leases.release(&shard).await;
                tracing::info!(shard, "shard read to its end; children may start");
            }
            Err(Interrupted) => tracing::info!(shard, "stopped working shard"),
        }
    }

    async fn work_shard_inner(
        &self,
        shard: &str,
        from_start: bool,
        stop: &CancellationToken,
    ) -> Result<(), Interrupted> {
        let mut attempt = 0;
        let mut checkpoint = loop {
            match self.leases.read_checkpoint(shard).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(shard, error = %e, "reading checkpoint failed; retrying");
                    attempt += 1;
                    backoff(attempt, stop).await?;
                }
            }
        };
        if checkpoint.as_deref() == Some(SHARD_END) {
            return Ok(());
        }
        if let Some(seq) = &checkpoint {
            tracing::info!(shard, sequence = %seq, "resuming after checkpoint");
        }
        let mut iterator = self
            .iterator(shard, checkpoint.as_deref(), from_start, stop)
            .await?;
        let mut attempt = 0;
        // The next page, read while the previous one was being written.
        let mut prefetched = None;
        loop {
            if stop.is_cancelled() {
                return Err(Interrupted);
            }
            let page = match prefetched.take() {
                Some(page) => page,
                None => self.read_page(&iterator).await,
            };
            let out = match page {
                Ok(out) => {
                    attempt = 0;
                    out
                }
                Err(e) => {
                    metrics::counter!(self.names.read_errors.clone(), "op" => "get_records")
                        .increment(1);
                    let expired = e
                        .as_service_error()
                        .is_some_and(|s| s.is_expired_iterator_exception());
                    if !expired {
                        tracing::warn!(shard, error = %aws_sdk_kinesis::error::DisplayErrorContext(&e), "GetRecords failed; retrying");
                        attempt += 1;
                        backoff(attempt, stop).await?;
                    }
                    iterator = self
                        .iterator(shard, checkpoint.as_deref(), from_start, stop)
                        .await?;
                    continue;
                }
            };
            if let Some(ms) = out.millis_behind_latest {
                metrics::gauge!(self.names.millis_behind.clone()).set(ms as f64);
            }
            let next = out.next_shard_iterator;
            let records: Vec<Record> = out
                .records
                .into_iter()
                .map(|r| Record {
                    shard_id: shard.to_owned(),
                    arrival_ms: r
                        .approximate_arrival_timestamp
                        .and_then(|t| t.to_millis().ok()),
                    sequence_number: r.sequence_number,
                    data: bytes::Bytes::from(r.data.into_inner()),
                })
                .collect();
            if !records.is_empty() {
                // Write this page and read the next one at the same time.
                let write = async {
                    let durable = self.handler.handle(&records, stop).await.min(records.len());
                    if durable > 0 {
                        let seq = &records[durable - 1].sequence_number;
                        if !self.store_checkpoint(shard, seq, stop).await? {
                            return Err(Interrupted);
                        }
                        checkpoint = Some(seq.clone());
                    }
                    if durable < records.len() {
                        // Stopped mid-page (shutdown): the rest is read again later.
                        return Err(Interrupted);
                    }
                    Ok(())
                };
                let read_next = async {
                    match &next {
                        Some(it) => Some(self.read_page(it).await),
                        None => None,
                    }
                };
                let (written, page) = tokio::join!(write, read_next);
                written?;
                prefetched = page;
            }
            match next {
                Some(next) => iterator = next,
                None => {
                    // A closed shard, read to its end: its children may start
                    // (unless the lease was lost first: its next holder ends it).
                    if !self.store_checkpoint(shard, SHARD_END, stop).await? {
                        return Err(Interrupted);
                    }
                    return Ok(());
                }
            }
            if records.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => return Err(Interrupted),
                    _ = tokio::time::sleep(self.settings.poll_interval) => {}
                }
            }
        }
    }

    /// One GetRecords page.
    async fn read_page(
        &self,
        iterator: &str,
    ) -> Result<
        aws_sdk_kinesis::operation::get_records::GetRecordsOutput,
        aws_sdk_kinesis::error::SdkError<
            aws_sdk_kinesis::operation::get_records::GetRecordsError,
            aws_sdk_kinesis::config::http::HttpResponse,
        >,
    > {
        self.kinesis
            .get_records()
            .shard_iterator(iterator)
            .limit(self.settings.max_records)
            .send()
            .await
    }

    /// Stores a checkpoint; `Ok(false)` when the lease is no longer ours.
    async fn store_checkpoint(
        &self,
        shard: &str,
        seq: &str,
        stop: &CancellationToken,
    ) -> Result<bool, Interrupted> {
        let mut attempt = 0;
        loop {
            match self.leases.checkpoint(shard, seq).await {
                Ok(true) => {
                    metrics::counter!(self.names.checkpoints.clone()).increment(1);
                    return Ok(true);
                }
                Ok(false) => {
                    tracing::warn!(
                        shard,
                        "lease lost or expired before the checkpoint; stopping work on the shard"
                    );
                    metrics::counter!(self.names.lease_changes.clone(), "change" => "lost")
                        .increment(1);
                    return Ok(false);
                }
                Err(e) => {
                    tracing::warn!(shard, error = %e, "writing checkpoint failed; retrying");
                    attempt += 1;
                    backoff(attempt, stop).await?;
                }
            }
        }
    }
}
