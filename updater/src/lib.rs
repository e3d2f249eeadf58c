//! The operators' program store. The DynamoDB programs table is the source
//! of truth ([`table`]); Redis is the trackers' copy ([`redis_copy`]).
//! Every write goes to the table first, then to Redis with its PUBLISH, so
//! running trackers apply it at once; [`Programs::sync`] brings Redis back
//! to the table's content (after Redis lost its data, or a write reached the
//! table and not Redis) and publishes what it changed.

pub mod lambda;
pub mod lambda_config;
pub mod record;
pub mod redis_copy;
pub mod store_config;
pub mod stream;
pub mod stream_config;
pub mod table;

use std::collections::{BTreeMap, HashMap, HashSet};

use adtrack_proto::customer::Customer;
use adtrack_proto::program::{Program, ProgramId};
use anyhow::{Result, anyhow};
use futures_util::{StreamExt, TryStreamExt};

pub use record::Record;
pub use redis_copy::{Counter, Held, RedisPrograms};
pub use table::{CustomerTable, Entry, ProgramTable, Table};

/// What happened to one program write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Written and published with this version.
    Written(u64),
    /// Not written: the store already holds this newer (or equal) version.
    Stale(u64),
}

/// What one delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The program was deleted; its tombstone has this version.
    Deleted(u64),
    /// There was no such program; a tombstone with this version now says
    /// so, and a later write of an older version is refused.
    Tombstoned(u64),
    /// It was deleted before, at this version; nothing changed.
    AlreadyDeleted(u64),
    /// Not deleted: the store holds a newer version of the program.
    Stale(u64),
}

/// Conditional table writes in flight at once during a load, by default:
/// at DynamoDB's few milliseconds per write, 64 in flight take 100,000
/// programs in well under 10 s (the table must take that rate: a new
/// on-demand table takes 4,000 writes per second unless pre-warmed).
pub const LOAD_CONCURRENCY: usize = 64;

/// What a load of a file does (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadPlan {
    /// Programs the table does not hold (or holds deleted).
    pub added: Vec<ProgramId>,
    /// Programs whose content differs from the table's.
    pub changed: Vec<ProgramId>,
    /// Programs the table holds exactly so.
    pub unchanged: usize,
    /// Programs whose explicit version is older than the table's.
    pub stale: Vec<(ProgramId, u64)>,
}

/// What a load did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub plan: LoadPlan,
    /// Table writes refused because a newer version arrived meanwhile.
    pub lost_races: usize,
    /// Programs written to Redis (the changes, and copies Redis lacked).
    pub redis_written: usize,
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Items in the table (programs and tombstones).
    pub table_items: usize,
    /// Customer records (and tombstones) in the customers table, and how
    /// many of them were written to Redis.
    pub customer_items: usize,
    pub customers_written: usize,
    /// Programs written to Redis.
    pub written: usize,
    /// Tombstones written to Redis.
    pub deleted: usize,
    /// Programs only Redis held, deleted there (with `prune`).
    pub pruned: usize,
    /// Programs only Redis holds, left there (without `prune`, or while
    /// the table is empty).
    pub only_in_redis: usize,
    /// Redis entries newer than the table's (left alone, reported).
    pub ahead: usize,
    /// Whether Redis had lost its data (no version counter) at the start.
    pub redis_was_incomplete: bool,
}

/// The tables and their Redis copy.
pub struct Programs {
    pub table: ProgramTable,
    /// The customers table; without one, customer records cannot be
    /// written and the sync copies programs only.
    pub customers: Option<CustomerTable>,
    pub redis: RedisPrograms,
    /// Conditional table writes in flight at once during a load.
    pub load_concurrency: usize,
}

fn same_content(a: &Program, b: &Program) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    a.version = 0;
    b.version = 0;
    a == b
}

impl Programs {
    pub fn new(table: ProgramTable, redis: RedisPrograms) -> Self {
        Self {
            table,
            customers: None,
            redis,
            load_concurrency: LOAD_CONCURRENCY,
        }
    }

    /// The same store with a customers table.
    pub fn with_customers(mut self, customers: CustomerTable) -> Self {
        self.customers = Some(customers);
        self
    }

    /// The customers table, or why there is none.
    pub fn customer_table(&self) -> Result<&CustomerTable> {
        self.customers
            .as_ref()
            .ok_or_else(|| anyhow!("no customers table is configured (CUSTOMERS_TABLE)"))
    }

    /// Writes one program: the table, then Redis. A write the table holds
    /// already at its very version (a retry after Redis failed, a replayed
    /// stream record) is copied to Redis again, so a retry finishes what
    /// the first attempt began.
    pub async fn put(&self, program: &Program) -> Result<WriteOutcome> {
        self.put_in(&self.table, program).await
    }

    /// Writes one customer record as [`Programs::put`] writes a program.
    pub async fn put_customer(&self, customer: &Customer) -> Result<WriteOutcome> {
        self.put_in(self.customer_table()?, customer).await
    }

    async fn put_in<R: Record>(&self, table: &Table<R>, record: &R) -> Result<WriteOutcome> {
        let outcome = table.put(record).await?;
        match outcome {
            WriteOutcome::Written(v) => {
                let mut r = record.clone();
                r.set_version(v);
                self.redis.put(&r).await?;
            }
            WriteOutcome::Stale(v) if v == record.version() => {
                self.redis.put(record).await?;
            }
            WriteOutcome::Stale(_) => {}
        }
        Ok(outcome)
    }

    /// Deletes one program: the table's tombstone, then Redis's.
    pub async fn delete(&self, id: &ProgramId) -> Result<DeleteOutcome> {
        self.delete_at(id, 0).await
    }

    /// Deletes one program at `version` (0: the next one); refused when the
    /// table holds a newer version.
    pub async fn delete_at(&self, id: &ProgramId, version: u64) -> Result<DeleteOutcome> {
        self.delete_in(&self.table, id, version).await
    }

    /// Deletes one customer record at `version` (0: the next one): the
    /// customer takes the defaults again.
    pub async fn delete_customer_at(&self, id: i32, version: u64) -> Result<DeleteOutcome> {
        self.delete_in(self.customer_table()?, &id, version).await
    }

    async fn delete_in<R: Record>(
        &self,
        table: &Table<R>,
        id: &R::Id,
        version: u64,
    ) -> Result<DeleteOutcome> {
        let outcome = table.delete_at(id, version).await?;
        match outcome {
            DeleteOutcome::Stale(_) => {}
            // Also for one deleted before: Redis may have missed it.
            DeleteOutcome::Deleted(v)
            | DeleteOutcome::Tombstoned(v)
            | DeleteOutcome::AlreadyDeleted(v) => {
                self.redis.delete_record::<R>(id, v).await?;
            }
        }
        Ok(outcome)
    }

    /// What loading `programs` would change in the table.
    pub async fn plan(&self, programs: &[Program]) -> Result<LoadPlan> {
        let stored = self.table.scan_all().await?;
        Ok(plan_against(&stored, programs))
    }

    /// Loads `programs` (already validated): writes to the table only what
    /// differs from it, then makes Redis hold each of them at the table's
    /// version (and, when Redis does not hold every program, all the
    /// table, as [`Programs::sync`] does). Running it again after an
    /// interruption finishes it; running it on what is loaded changes
    /// nothing.
    pub async fn load(&self, programs: &[Program]) -> Result<LoadReport> {
        let mut stored = self.table.scan_all().await?;
        let plan = plan_against(&stored, programs);
        let to_write: Vec<&Program> = {
            let ids: HashSet<&ProgramId> = plan.added.iter().chain(&plan.changed).collect();
            programs
                .iter()
                .filter(|p| ids.contains(&p.program_id))
                .collect()
        };
        let outcomes: Vec<WriteOutcome> = futures_util::stream::iter(&to_write)
            .map(|p| self.table.put(p))
            .buffered(self.load_concurrency.max(1))
            .try_collect()
            .await?;
        // The table as it is now: the scan, with what this load wrote. A
        // write another writer won is that writer's to copy to Redis.
        let mut lost_races = 0;
        for (p, outcome) in to_write.iter().zip(outcomes) {
            match outcome {
                WriteOutcome::Written(v) => {
                    let mut p = (*p).clone();
                    p.version = v;
                    stored.insert(p.program_id.clone(), Entry::Present(p));
                }
                WriteOutcome::Stale(_) => {
                    lost_races += 1;
                    stored.remove(&p.program_id);
                }
            }
        }
        let redis_written = if self.redis.is_complete().await? {
            // Redis gets each program of the file it lacks at the table's
            // version: the changes, and copies an earlier, interrupted
            // load did not finish.
            let ids: Vec<ProgramId> = programs
                .iter()
                .map(|p| p.program_id.clone())
                .filter(|id| stored.contains_key(id))
                .collect();
            let held: HashMap<ProgramId, Held> = ids
                .iter()
                .cloned()
                .zip(self.redis.versions(&ids).await?)
                .filter_map(|(id, h)| h.map(|h| (id, h)))
                .collect();
            let entries = ids.iter().map(|id| (id, &stored[id]));
            let copy = RedisCopy::plan(entries, &held);
            self.apply(&copy).await?
        } else {
            // A Redis that does not hold every program (new, or emptied)
            // gets the whole table, and is then marked complete.
            let synced = self.sync_from(&stored, false).await?;
            synced.written + synced.deleted
        };
        Ok(LoadReport {
            plan,
            lost_races,
            redis_written,
        })
    }

    /// Writes a [`RedisCopy`] to Redis; returns how many it wrote.
    async fn apply<R: Record>(&self, copy: &RedisCopy<R>) -> Result<usize> {
        self.redis.put_all(&copy.puts).await?;
        self.redis.delete_all_of::<R>(&copy.deletes).await?;
        Ok(copy.puts.len() + copy.deletes.len())
    }

    /// Brings Redis to the table's content and publishes what changed;
    /// then marks Redis complete. With `prune`, programs only Redis holds
    /// are deleted there (never while the table is empty: that is a table
    /// not loaded yet, not a table without programs); without it they are
    /// counted in [`SyncReport::only_in_redis`] and left alone.
    pub async fn sync(&self, prune: bool) -> Result<SyncReport> {
        let stored = self.table.scan_all().await?;
        self.sync_from(&stored, prune).await
    }

    /// [`Programs::sync`] from a table snapshot already read. Customer
    /// records are copied first (all of them: there are few), so a Redis
    /// marked complete holds every switched-off customer.
    async fn sync_from(
        &self,
        stored: &BTreeMap<ProgramId, Entry>,
        prune: bool,
    ) -> Result<SyncReport> {
        let redis_was_incomplete = !self.redis.is_complete().await?;
        let (customer_items, customers_written, customers_max) = match &self.customers {
            Some(table) => {
                let customers = table.scan_all().await?;
                let held = self.redis.all_versions_of::<Customer>().await?;
                let copy = RedisCopy::plan(customers.iter(), &held);
                let written = self.apply(&copy).await?;
                let max = customers.values().map(Entry::version).max().unwrap_or(0);
                (customers.len(), written, max)
            }
            None => (0, 0, 0),
        };
        let held = self.redis.all_versions().await?;
        let copy = RedisCopy::plan(stored.iter(), &held);
        // Programs only Redis holds: gone from the table for good? Re-read
        // each (a program written since the scan is in the table by now,
        // since every write reaches the table first).
        let mut pruned = Vec::new();
        let mut only_in_redis = 0;
        for (id, h) in &held {
            if h.deleted || stored.contains_key(id) {
                continue;
            }
            if !prune || stored.is_empty() {
                only_in_redis += 1;
            } else if self.table.get(id).await?.is_none() {
                pruned.push((id.clone(), h.version + 1));
            }
        }
        self.apply(&copy).await?;
        self.redis.delete_all(&pruned).await?;
        let max_version = stored
            .values()
            .map(Entry::version)
            .max()
            .unwrap_or(0)
            .max(customers_max);
        self.redis.mark_complete(max_version).await?;
        Ok(SyncReport {
            table_items: stored.len(),
            customer_items,
            customers_written,
            written: copy.puts.len(),
            deleted: copy.deletes.len(),
            pruned: pruned.len(),
            only_in_redis,
            ahead: copy.ahead,
            redis_was_incomplete,
        })
    }
}

/// Programs Redis holds ahead of the table that are named in the log one by
/// one (the rest are counted).
const AHEAD_NAMED: usize = 10;

/// What Redis lacks of some table entries: records to write, tombstones
/// to write, and how many entries Redis holds newer than the table.
#[derive(Debug)]
struct RedisCopy<R: Record> {
    puts: Vec<R>,
    deletes: Vec<(R::Id, u64)>,
    ahead: usize,
}

impl<R: Record> RedisCopy<R> {
    fn plan<'a>(
        entries: impl Iterator<Item = (&'a R::Id, &'a Entry<R>)>,
        held: &HashMap<R::Id, Held>,
    ) -> Self {
        let mut copy = Self {
            puts: Vec::new(),
            deletes: Vec::new(),
            ahead: 0,
        };
        for (id, entry) in entries {
            match held.get(id) {
                Some(h) if h.version == entry.version() => continue,
                Some(h) if h.version > entry.version() => {
                    copy.ahead += 1;
                    // Named one by one up to a few, then counted: a Redis
                    // written around the table can be ahead everywhere.
                    if copy.ahead <= AHEAD_NAMED {
                        tracing::warn!(
                            kind = R::KIND,
                            id = %id,
                            redis = h.version,
                            table = entry.version(),
                            "Redis holds a newer version than the table; left alone"
                        );
                    }
                    continue;
                }
                _ => {}
            }
            match entry {
                Entry::Present(p) => copy.puts.push(p.clone()),
                Entry::Deleted { version } => copy.deletes.push((id.clone(), *version)),
            }
        }
        if copy.ahead > AHEAD_NAMED {
            tracing::warn!(
                kind = R::KIND,
                records = copy.ahead,
                named = AHEAD_NAMED,
                "Redis holds newer versions than the table for these many records; left alone"
            );
        }
        copy
    }
}

/// Compares a file's programs with the table's items.
pub fn plan_against(stored: &BTreeMap<ProgramId, Entry>, programs: &[Program]) -> LoadPlan {
    let mut plan = LoadPlan::default();
    for p in programs {
        match stored.get(&p.program_id) {
            None => plan.added.push(p.program_id.clone()),
            Some(entry) if p.version != 0 && p.version <= entry.version() => match entry {
                Entry::Present(s) if p.version == s.version && same_content(p, s) => {
                    plan.unchanged += 1
                }
                _ => plan.stale.push((p.program_id.clone(), entry.version())),
            },
            Some(Entry::Deleted { .. }) => plan.added.push(p.program_id.clone()),
            Some(Entry::Present(s)) if same_content(p, s) => plan.unchanged += 1,
            Some(Entry::Present(_)) => plan.changed.push(p.program_id.clone()),
        }
    }
    plan
}

/// Ids the table holds as programs (not tombstones) that `programs` lacks:
/// what `prune` deletes.
pub fn absent_from(stored: &BTreeMap<ProgramId, Entry>, programs: &[Program]) -> Vec<ProgramId> {
    let keep: HashSet<&ProgramId> = programs.iter().map(|p| &p.program_id).collect();
    stored
        .iter()
        .filter(|(id, e)| matches!(e, Entry::Present(_)) && !keep.contains(id))
        .map(|(id, _)| id.clone())
        .collect()
}

/// Syncs until `stop`: at once whenever Redis is found incomplete (it lost
/// its data), and a full comparison every `full_every`; a failed round is
/// tried again at the next check.
pub async fn watch(
    store: &Programs,
    prune: bool,
    check_every: std::time::Duration,
    full_every: std::time::Duration,
    stop: &tokio_util::sync::CancellationToken,
) {
    let mut last_full: Option<tokio::time::Instant> = None;
    loop {
        let due = last_full.is_none_or(|t| t.elapsed() >= full_every);
        let lost = match store.redis.is_complete().await {
            Ok(complete) => !complete,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot reach Redis; retrying");
                false
            }
        };
        if due || lost {
            match store.sync(prune).await {
                Ok(r) => {
                    last_full = Some(tokio::time::Instant::now());
                    if r.redis_was_incomplete
                        || r.written + r.deleted + r.pruned + r.customers_written > 0
                    {
                        tracing::info!(
                            table_items = r.table_items,
                            customer_items = r.customer_items,
                            customers_written = r.customers_written,
                            written = r.written,
                            deleted = r.deleted,
                            pruned = r.pruned,
                            only_in_redis = r.only_in_redis,
                            ahead = r.ahead,
                            redis_was_incomplete = r.redis_was_incomplete,
                            "Redis synced with the programs table"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "sync failed; retrying"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(check_every) => {}
        }
    }
}
