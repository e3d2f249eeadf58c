//! The trackers' copy of the programs in Redis: versioned writes through
//! the layout's Lua scripts (each write and its PUBLISH one atomic step),
//! reads of what Redis holds, and the completeness mark (the version
//! counter) that tells a tracker Redis holds every program.
//!
//! Scripts run through `redis::Script` (EVALSHA, loading the script again
//! when Redis answers NOSCRIPT, as after a failover to a replica that never
//! saw it).

use std::collections::{BTreeMap, HashMap};

use adtrack_proto::program::{Program, ProgramId};
use adtrack_proto::redis_layout::{
    CHANGES_CHANNEL, COMPLETE_SCRIPT, DELETE_SCRIPT, StoredCustomer, StoredProgram, UPSERT_SCRIPT,
    VERSION_KEY, customer_key, program_key,
};
use anyhow::{Context, Result, anyhow};
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::record::Record;
use crate::{DeleteOutcome, WriteOutcome};

/// Scripts per pipelined round trip in bulk writes.
const PIPELINE_CHUNK: usize = 1_000;

/// How a writer treats the version counter, Redis's mark of holding every
/// program (see [`adtrack_proto::redis_layout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Create it when absent: this writer is the whole truth (Redis used
    /// alone, as in tests and benchmarks).
    Create,
    /// Keep it only if present: a copy of the table never marks an emptied
    /// Redis complete by writing one program into it; the sync does, once
    /// every program is back.
    KeepIfPresent,
}

impl Counter {
    fn arg(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::KeepIfPresent => "keep",
        }
    }
}

/// What Redis holds for one program: its version, and whether that is a
/// tombstone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub version: u64,
    pub deleted: bool,
}

/// A connection to the programs in Redis. Cheap to share: every call runs
/// on a clone of one multiplexed connection, which reconnects after Redis
/// went away (a failover, a restart), so the long-running sync, the stream
/// reader and a warm Lambda outlive it.
pub struct RedisPrograms {
    conn: ConnectionManager,
    counter: Counter,
    upsert: redis::Script,
    delete: redis::Script,
}

impl RedisPrograms {
    /// Connects; writes treat the version counter as `counter` says.
    pub async fn connect(url: &str, counter: Counter) -> Result<Self> {
        let client = redis::Client::open(url).with_context(|| format!("bad Redis URL {url}"))?;
        // A bulk write's pipelined chunk of scripts answers well inside the
        // response timeout; a Redis that answers nothing fails the call
        // instead of hanging it. A lost connection is tried again once per
        // call: the callers have their own retry (and a Lambda its time
        // limit), so a call never waits out a long reconnect schedule.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_connection_timeout(Some(std::time::Duration::from_secs(5)))
            .set_response_timeout(Some(std::time::Duration::from_secs(30)));
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .with_context(|| format!("cannot connect to Redis at {url}"))?;
        Ok(Self {
            conn,
            counter,
            upsert: redis::Script::new(UPSERT_SCRIPT),
            delete: redis::Script::new(DELETE_SCRIPT),
        })
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn upsert_invocation<R: Record>(&self, record: &R) -> redis::ScriptInvocation<'_> {
        let mut inv = self.upsert.prepare_invoke();
        inv.key(R::redis_key(record.id()))
            .key(VERSION_KEY)
            .arg(record.version())
            .arg(CHANGES_CHANNEL)
            .arg(record.upsert_body())
            .arg(self.counter.arg());
        for (field, value) in record.redis_fields() {
            inv.arg(field).arg(value);
        }
        inv
    }

    fn delete_invocation<R: Record>(
        &self,
        id: &R::Id,
        version: u64,
    ) -> redis::ScriptInvocation<'_> {
        let mut inv = self.delete.prepare_invoke();
        inv.key(R::redis_key(id))
            .key(VERSION_KEY)
            .arg(CHANGES_CHANNEL)
            .arg(R::delete_body(id))
            .arg(version)
            .arg(self.counter.arg());
        inv
    }

    /// Writes one record (version 0: Redis takes the next one).
    pub async fn put<R: Record>(&self, record: &R) -> Result<WriteOutcome> {
        let reply: (i64, u64) = self
            .upsert_invocation(record)
            .invoke_async(&mut self.conn())
            .await
            .with_context(|| format!("writing {} to Redis", R::KIND))?;
        Ok(outcome(reply))
    }

    /// Writes records in pipelined chunks; one outcome per record, in
    /// order. Each write is atomic with its PUBLISH; the whole is not (a
    /// load is made whole by the table: running it again finishes it).
    pub async fn put_all<R: Record>(&self, programs: &[R]) -> Result<Vec<WriteOutcome>> {
        let mut out = Vec::with_capacity(programs.len());
        for chunk in programs.chunks(PIPELINE_CHUNK) {
            let mut pipe = redis::pipe();
            pipe.load_script(&self.upsert).ignore();
            for p in chunk {
                pipe.invoke_script(&self.upsert_invocation(p));
            }
            let replies: Vec<(i64, u64)> = pipe
                .query_async(&mut self.conn())
                .await
                .with_context(|| format!("writing {}s to Redis", R::KIND))?;
            out.extend(replies.into_iter().map(outcome));
        }
        Ok(out)
    }

    /// Writes programs atomically (one `MULTI`/`EXEC`): all or nothing.
    pub async fn load_atomic(&self, programs: &[Program]) -> Result<Vec<WriteOutcome>> {
        if programs.is_empty() {
            return Ok(Vec::new());
        }
        // Load outside the transaction: EVALSHA inside MULTI cannot fall back.
        self.upsert
            .load_async(&mut self.conn())
            .await
            .context("loading the upsert script")?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for p in programs {
            pipe.invoke_script(&self.upsert_invocation(p));
        }
        let replies: Vec<(i64, u64)> = pipe
            .query_async(&mut self.conn())
            .await
            .context("writing programs to Redis")?;
        Ok(replies.into_iter().map(outcome).collect())
    }

    /// Deletes a program at `version` (0: Redis takes the next one),
    /// leaving a tombstone (also for an id Redis does not hold) and
    /// publishing the deletion.
    pub async fn delete(&self, id: &ProgramId, version: u64) -> Result<DeleteOutcome> {
        self.delete_record::<Program>(id, version).await
    }

    /// Deletes a record of kind `R` at `version` (as [`Self::delete`]).
    pub async fn delete_record<R: Record>(
        &self,
        id: &R::Id,
        version: u64,
    ) -> Result<DeleteOutcome> {
        let reply: (i64, u64, i64) = self
            .delete_invocation::<R>(id, version)
            .invoke_async(&mut self.conn())
            .await
            .with_context(|| format!("deleting {} in Redis", R::KIND))?;
        Ok(delete_outcome(reply))
    }

    /// Deletes programs at their versions, in pipelined chunks.
    pub async fn delete_all(&self, ids: &[(ProgramId, u64)]) -> Result<Vec<DeleteOutcome>> {
        self.delete_all_of::<Program>(ids).await
    }

    /// Deletes records of kind `R` at their versions, in pipelined chunks.
    pub async fn delete_all_of<R: Record>(
        &self,
        ids: &[(R::Id, u64)],
    ) -> Result<Vec<DeleteOutcome>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(PIPELINE_CHUNK) {
            let mut pipe = redis::pipe();
            pipe.load_script(&self.delete).ignore();
            for (id, version) in chunk {
                pipe.invoke_script(&self.delete_invocation::<R>(id, *version));
            }
            let replies: Vec<(i64, u64, i64)> = pipe
                .query_async(&mut self.conn())
                .await
                .with_context(|| format!("deleting {}s in Redis", R::KIND))?;
            out.extend(replies.into_iter().map(delete_outcome));
        }
        Ok(out)
    }

    /// Reads one program as stored.
    pub async fn get(&self, id: &ProgramId) -> Result<StoredProgram> {
        let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(program_key(id))
            .query_async(&mut self.conn())
            .await
            .context("reading program from Redis")?;
        StoredProgram::from_hash(&fields).map_err(|e| anyhow!("stored program {id}: {e}"))
    }

    /// Reads one customer record as stored.
    pub async fn get_customer(&self, customer_id: i32) -> Result<StoredCustomer> {
        let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(customer_key(customer_id))
            .query_async(&mut self.conn())
            .await
            .context("reading customer from Redis")?;
        StoredCustomer::from_hash(&fields)
            .map_err(|e| anyhow!("stored customer {customer_id}: {e}"))
    }

    /// The version (and tombstone flag) Redis holds for each of `ids`.
    pub async fn versions(&self, ids: &[ProgramId]) -> Result<Vec<Option<Held>>> {
        self.versions_of::<Program>(ids).await
    }

    /// [`Self::versions`] for records of kind `R`.
    pub async fn versions_of<R: Record>(&self, ids: &[R::Id]) -> Result<Vec<Option<Held>>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(PIPELINE_CHUNK * 10) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HMGET")
                    .arg(R::redis_key(id))
                    .arg("version")
                    .arg("deleted");
            }
            let replies: Vec<(Option<u64>, Option<String>)> = pipe
                .query_async(&mut self.conn())
                .await
                .with_context(|| format!("reading {} versions from Redis", R::KIND))?;
            out.extend(replies.into_iter().map(|(v, d)| {
                v.map(|version| Held {
                    version,
                    deleted: d.as_deref() == Some("1"),
                })
            }));
        }
        Ok(out)
    }

    /// Every program hash in Redis with what it holds (SCAN, then the
    /// versions pipelined).
    pub async fn all_versions(&self) -> Result<HashMap<ProgramId, Held>> {
        self.all_versions_of::<Program>().await
    }

    /// [`Self::all_versions`] for records of kind `R`.
    pub async fn all_versions_of<R: Record>(&self) -> Result<HashMap<R::Id, Held>> {
        let mut conn = self.conn();
        let mut scan = conn
            .scan_options::<String>(
                redis::ScanOptions::default()
                    .with_pattern(R::REDIS_PATTERN)
                    .with_count(1000),
            )
            .await
            .with_context(|| format!("scanning {} keys in Redis", R::KIND))?;
        let mut keys: Vec<String> = Vec::new();
        while let Some(key) = scan.next_item().await {
            keys.push(key.with_context(|| format!("scanning {} keys in Redis", R::KIND))?);
        }
        // SCAN may return a key twice.
        keys.sort();
        keys.dedup();
        let ids: Vec<R::Id> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(R::REDIS_PREFIX))
            .filter_map(R::id_from_str)
            .collect();
        let held = self.versions_of::<R>(&ids).await?;
        Ok(ids
            .into_iter()
            .zip(held)
            .filter_map(|(id, h)| h.map(|h| (id, h)))
            .collect())
    }

    /// Whether Redis holds the version counter: the mark that it holds
    /// every program (it is gone after Redis lost its data).
    pub async fn is_complete(&self) -> Result<bool> {
        let counter: Option<u64> = redis::cmd("GET")
            .arg(VERSION_KEY)
            .query_async(&mut self.conn())
            .await
            .context("reading the version counter")?;
        Ok(counter.is_some())
    }

    /// Marks Redis complete: the counter raised to at least `version`.
    pub async fn mark_complete(&self, version: u64) -> Result<()> {
        let _: u64 = redis::Script::new(COMPLETE_SCRIPT)
            .key(VERSION_KEY)
            .arg(version)
            .invoke_async(&mut self.conn())
            .await
            .context("setting the version counter")?;
        Ok(())
    }
}

fn outcome((written, version): (i64, u64)) -> WriteOutcome {
    if written == 1 {
        WriteOutcome::Written(version)
    } else {
        WriteOutcome::Stale(version)
    }
}

fn delete_outcome((done, version, existed): (i64, u64, i64)) -> DeleteOutcome {
    match (done, existed) {
        (0, 1) => DeleteOutcome::Stale(version),
        (0, _) => DeleteOutcome::AlreadyDeleted(version),
        (_, 1) => DeleteOutcome::Deleted(version),
        _ => DeleteOutcome::Tombstoned(version),
    }
}
