//! The program cache: moka in process (L1) in front of Redis (L2).
//!
//! Known programs and unknown ids are both cached (unknown ids for a short
//! TTL, known programs until a push or the reconcile changes them, or for
//! TRACKER_CACHE_TTL_SECS when set). Concurrent
//! misses for one id share a single Redis read. Every write into the cache
//! (a pushed change, a miss's read, a reload) goes through one
//! version-checked step ([`ProgramCache::put_if_newer`], moka's
//! `and_compute_with`, serialised per key), so an older answer never
//! replaces a newer one whatever order they arrive in. A reload also drops
//! programs that vanished from Redis, unless Redis itself lost its data.
//!
//! The cache is keyed by a keyed 64-bit hash of the program id, not the id
//! itself: a lookup compares integers instead of chasing a key string per
//! probe, and an entry holds one allocation less. Every entry carries its
//! id, and an entry whose id is not the one asked for (two ids with one
//! hash, about once in 10^9 for 100,000 programs) is treated as a miss that
//! is read from Redis and not cached, so a collision costs time, never a
//! wrong answer. Eviction is plain LRU: the cache is sized to hold every
//! program, so TinyLFU's admission sketch would be bookkeeping per hit for
//! nothing.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use adtrack_proto::redis_layout::{
    HASH_FIELDS, PROGRAM_KEY_PATTERN, PROGRAM_KEY_PREFIX, ProgramChange, StoredProgram, VERSION_KEY,
};
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use metrics::Counter;
use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};
use moka::policy::EvictionPolicy;
use redis::aio::ConnectionManager;
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use crate::metric;
use crate::program_entry::ProgramEntry;

/// What the cache holds for one id.
#[derive(Debug, Clone)]
pub enum Cached {
    Known(Arc<ProgramEntry>),
    /// Not in Redis (or deleted there at `version`).
    Missing {
        id: Arc<str>,
        version: u64,
    },
}

impl Cached {
    fn version(&self) -> u64 {
        match self {
            Self::Known(p) => p.version(),
            Self::Missing { version, .. } => *version,
        }
    }

    /// Whether this entry is the one for `id` (and not for another id
    /// with the same key hash).
    fn is_for(&self, id: &str) -> bool {
        match self {
            Self::Known(p) => p.program_id() == id,
            Self::Missing { id: own, .. } => &**own == id,
        }
    }

    fn missing(id: &str, version: u64) -> Self {
        Self::Missing {
            id: Arc::from(id),
            version,
        }
    }

    /// The very same entry (not only an equal one).
    fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Known(a), Self::Known(b)) => Arc::ptr_eq(a, b),
            (Self::Missing { id: a, .. }, Self::Missing { id: b, .. }) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// The cache's key for a program id.
type Key = u64;

/// How an id becomes its key.
pub type KeyFn = Box<dyn Fn(&str) -> Key + Send + Sync>;

/// The answer for one hit.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The program exists and accepts hits now.
    Active(Arc<ProgramEntry>),
    /// The program exists but is disabled or outside its validity window.
    Inactive(Arc<ProgramEntry>),
    /// No such program.
    Unknown,
    /// Not cached and Redis did not answer in time.
    Unverified,
}

/// Unknown ids expire; known programs expire only when a positive TTL is
/// set. Without one, moka keeps no expiry timer for them at all (a node per
/// entry in its timer wheel, and the wheel's work): pushes and the
/// reconcile keep them current.
struct TtlPolicy {
    positive: Option<Duration>,
    negative: Duration,
}

impl TtlPolicy {
    fn ttl(&self, v: &Cached) -> Option<Duration> {
        match v {
            Cached::Known(_) => self.positive,
            Cached::Missing { .. } => Some(self.negative),
        }
    }
}

impl Expiry<Key, Cached> for TtlPolicy {
    fn expire_after_create(&self, _: &Key, v: &Cached, _: Instant) -> Option<Duration> {
        self.ttl(v)
    }
    fn expire_after_update(
        &self,
        _: &Key,
        v: &Cached,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.ttl(v)
    }
}

/// Cache settings.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub capacity: u64,
    /// `None`: known programs do not expire.
    pub positive_ttl: Option<Duration>,
    pub negative_ttl: Duration,
    pub redis_timeout: Duration,
}

/// The program cache shared by all requests.
pub struct ProgramCache {
    cache: Cache<Key, Cached>,
    /// An id's key: a hash keyed at random per process, so ids cannot be
    /// chosen to collide.
    key_of: KeyFn,
    /// Set once the first full load has completed. Until then only that
    /// load writes into the cache (misses answer without caching, pushes
    /// wait for the load), so it can insert without version checks.
    warm: AtomicBool,
    redis: OnceCell<ConnectionManager>,
    timeout: Duration,
    /// Redis reads of misses in flight, by id: concurrent misses for one
    /// id share one read. Each read runs as a task of its own that removes
    /// its entry when it ends (within the Redis timeout), whether or not
    /// anyone still waits for it, so a read is never reused stale.
    reads: Arc<Mutex<HashMap<String, Read>>>,
    lookups: LookupMeters,
}

/// A miss's Redis read, shareable by every miss for the same id.
type Read = Shared<BoxFuture<'static, Result<Cached, Arc<FetchError>>>>;

/// What one full load did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Loaded {
    /// Programs read (tombstones and unreadable hashes not counted).
    pub programs: usize,
    /// Cached programs dropped because Redis no longer has them.
    pub vanished: usize,
    /// Redis held no version counter: it lost its data (a failover to an
    /// empty replica, a FLUSHALL), so nothing cached was dropped.
    pub redis_lost_data: bool,
    /// Redis held its version counter before and after the scan: the mark
    /// that it holds every program (the sync sets it once it has restored
    /// them from the programs table).
    pub redis_complete: bool,
}

/// Handles for the per-lookup counters, registered once.
struct LookupMeters {
    hit: Counter,
    negative_hit: Counter,
    miss: Counter,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("Redis is not connected yet")]
    NotConnected,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(Arc<redis::RedisError>),
}

impl From<redis::RedisError> for FetchError {
    fn from(e: redis::RedisError) -> Self {
        Self::Redis(Arc::new(e))
    }
}

impl ProgramCache {
    pub fn new(settings: &CacheSettings) -> Self {
        let hasher = RandomState::new();
        Self::with_key_fn(settings, Box::new(move |id| hasher.hash_one(id)))
    }

    /// A cache whose keys come from `key_of` (tests use one that makes
    /// every id collide).
    pub fn with_key_fn(settings: &CacheSettings, key_of: KeyFn) -> Self {
        let cache = Cache::builder()
            .max_capacity(settings.capacity)
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(TtlPolicy {
                positive: settings.positive_ttl,
                negative: settings.negative_ttl,
            })
            .eviction_listener(|_, _, cause| {
                let cause = match cause {
                    moka::notification::RemovalCause::Expired => "expired",
                    moka::notification::RemovalCause::Explicit => "explicit",
                    moka::notification::RemovalCause::Replaced => "replaced",
                    moka::notification::RemovalCause::Size => "size",
                };
                metrics::counter!(metric::CACHE_EVICTIONS, "cause" => cause).increment(1);
            })
            .build();
        Self {
            cache,
            key_of,
            warm: AtomicBool::new(false),
            redis: OnceCell::new(),
            timeout: settings.redis_timeout,
            reads: Arc::new(Mutex::new(HashMap::new())),
            lookups: LookupMeters {
                hit: metrics::counter!(metric::CACHE_LOOKUPS, "result" => "hit"),
                negative_hit: metrics::counter!(metric::CACHE_LOOKUPS, "result" => "negative_hit"),
                miss: metrics::counter!(metric::CACHE_LOOKUPS, "result" => "miss"),
            },
        }
    }

    /// Hands the cache its Redis connection (done once, by the sync task).
    pub fn set_connection(&self, conn: ConnectionManager) {
        let _ = self.redis.set(conn);
    }

    /// The Redis connection, once there is one.
    pub fn connection(&self) -> Option<ConnectionManager> {
        self.redis.get().cloned()
    }

    pub fn is_connected(&self) -> bool {
        self.redis.initialized()
    }

    /// Redis reads of misses in flight now.
    pub fn reads_in_flight(&self) -> usize {
        self.reads.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Entries held now (approximate).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    fn key(&self, id: &str) -> Key {
        (self.key_of)(id)
    }

    /// Validates one program id (already syntax-checked) at `now`.
    pub async fn lookup(&self, id: &str, now: OffsetDateTime) -> Lookup {
        let key = self.key(id);
        let cached = match self.cache.get(&key).await {
            Some(c) if c.is_for(id) => {
                if matches!(c, Cached::Known(_)) {
                    self.lookups.hit.increment(1);
                } else {
                    self.lookups.negative_hit.increment(1);
                }
                c
            }
            // Another id with the same key hash is cached: ask Redis and
            // cache nothing (the entry is the other id's).
            Some(_) => {
                self.lookups.miss.increment(1);
                match self.read_shared(id).await {
                    Ok(read) => read,
                    Err(e) => return Self::unverified(&e),
                }
            }
            None => {
                self.lookups.miss.increment(1);
                match self.read_shared(id).await {
                    Ok(read) if self.warm.load(Ordering::Acquire) => {
                        self.put_if_newer(id, read).await.current
                    }
                    // The first load is still running (see `warm`).
                    Ok(read) => read,
                    Err(e) => return Self::unverified(&e),
                }
            }
        };
        match cached {
            Cached::Known(p) if p.is_active_at(now) => Lookup::Active(p),
            Cached::Known(p) => Lookup::Inactive(p),
            Cached::Missing { .. } => Lookup::Unknown,
        }
    }

    /// Reads `id` from Redis, sharing the read with every other miss for
    /// it that is in flight.
    async fn read_shared(&self, id: &str) -> Result<Cached, Arc<FetchError>> {
        let read = {
            let mut reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
            reads
                .entry(id.to_owned())
                .or_insert_with(|| {
                    let (conn, id, timeout) =
                        (self.redis.get().cloned(), id.to_owned(), self.timeout);
                    let reads = Arc::clone(&self.reads);
                    let task = tokio::spawn(async move {
                        let result = fetch(conn, id.clone(), timeout).await.map_err(Arc::new);
                        reads.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                        result
                    });
                    task.map(|joined| {
                        joined.unwrap_or_else(|e| {
                            Err(Arc::new(FetchError::from(redis::RedisError::from(
                                std::io::Error::other(e),
                            ))))
                        })
                    })
                    .boxed()
                    .shared()
                })
                .clone()
        };
        read.await
    }

    /// Counts a failed Redis read; the hit is unverified.
    fn unverified(e: &FetchError) -> Lookup {
        let op = if matches!(e, FetchError::Timeout(_)) {
            "timeout"
        } else {
            "lookup"
        };
        metrics::counter!(metric::REDIS_ERRORS, "op" => op).increment(1);
        Lookup::Unverified
    }

    /// Applies a pushed change if it is newer than what is cached.
    /// Returns false when it was stale and ignored.
    pub async fn apply(&self, change: &ProgramChange) -> bool {
        let id = change.program_id().as_str();
        let new = match change {
            ProgramChange::Upsert(p) => Cached::Known(Arc::new(ProgramEntry::new(p))),
            ProgramChange::Delete { version, .. } => Cached::missing(id, *version),
        };
        self.put_if_newer(id, new).await.written
    }

    /// The one way anything enters the cache: `new` replaces what is cached
    /// for `id` only if it is newer (a colliding id's entry is replaced).
    /// Serialised per key by moka, so of two writes racing (a miss's read
    /// and a push, a reload and a miss) the newer always stays.
    async fn put_if_newer(&self, id: &str, new: Cached) -> Put {
        let version = new.version();
        let mut kept = None;
        let result = self
            .cache
            .entry(self.key(id))
            .and_compute_with(|current| {
                let op = match current {
                    Some(e) if e.value().is_for(id) && e.value().version() >= version => {
                        kept = Some(e.into_value());
                        Op::Nop
                    }
                    _ => Op::Put(new.clone()),
                };
                std::future::ready(op)
            })
            .await;
        match (result, kept) {
            (CompResult::Unchanged(_), Some(current)) => Put {
                written: false,
                current,
            },
            _ => Put {
                written: true,
                current: new,
            },
        }
    }

    /// Drops `old` if it is still what the cache holds for its key.
    async fn remove_if_same(&self, key: Key, old: &Cached) -> bool {
        let result = self
            .cache
            .entry(key)
            .and_compute_with(|current| {
                std::future::ready(match current {
                    Some(e) if e.value().same(old) => Op::Remove,
                    _ => Op::Nop,
                })
            })
            .await;
        matches!(result, CompResult::Removed(_))
    }

    /// Loads every program in Redis (SCAN) through the version-checked
    /// write, then drops the cached programs Redis no longer has (unless it
    /// lost its data, see [`Loaded::redis_lost_data`]). Used for the warm
    /// start, after every pub/sub reconnect and periodically. The first
    /// load inserts directly: nothing else writes until it is done.
    ///
    /// Reading runs ahead of writing into the cache: one task scans and
    /// reads pages of hashes while this one applies the page before.
    pub async fn load_all(&self) -> Result<Loaded, FetchError> {
        let mut conn = self.redis.get().cloned().ok_or(FetchError::NotConnected)?;
        // Before the scan: whether Redis still has its data, and its clock
        // (a program written after this instant may be missed by the scan
        // and is never dropped for it).
        let (counter, (secs, micros)): (Option<u64>, (u64, u64)) = redis::pipe()
            .get(VERSION_KEY)
            .cmd("TIME")
            .query_async(&mut conn)
            .await?;
        let scan_started = secs * 1_000_000 + micros;
        let (tx, mut pages) = tokio::sync::mpsc::channel(2);
        let reader = tokio::spawn(read_pages(conn.clone(), tx));
        let mut loaded = Loaded {
            // Only worth saying when there is something cached to keep.
            redis_lost_data: counter.is_none() && self.cache.iter().next().is_some(),
            redis_complete: counter.is_some(),
            ..Loaded::default()
        };
        let first = !self.warm.load(Ordering::Acquire);
        let mut seen = HashSet::new();
        let capacity = self.cache.policy().max_capacity().unwrap_or(u64::MAX);
        while let Some(page) = pages.recv().await {
            for (id, cached) in page {
                if let Cached::Known(_) = cached {
                    loaded.programs += 1;
                }
                // A hash that was gone by the time it was read is not seen.
                let present = !matches!(cached, Cached::Missing { version: 0, .. });
                if first {
                    if loaded.programs as u64 <= capacity {
                        self.cache.insert(self.key(&id), cached).await;
                    }
                    continue;
                }
                if present {
                    seen.insert(self.key(&id));
                }
                if loaded.programs as u64 <= capacity {
                    self.put_if_newer(&id, cached).await;
                }
            }
        }
        // The reader's result: an error ends the load before anything is dropped.
        reader
            .await
            .map_err(|e| FetchError::from(redis::RedisError::from(std::io::Error::other(e))))??;
        // Redis may have lost its data during the scan, too.
        if loaded.redis_complete {
            let counter: Option<u64> = redis::cmd("GET")
                .arg(VERSION_KEY)
                .query_async(&mut conn)
                .await?;
            loaded.redis_complete = counter.is_some();
            loaded.redis_lost_data |= counter.is_none() && !first;
        }
        if first {
            self.warm.store(true, Ordering::Release);
        } else if !loaded.redis_lost_data {
            loaded.vanished = self.drop_vanished(&seen, scan_started).await;
        }
        metrics::counter!(metric::PROGRAMS_LOADED).increment(loaded.programs as u64);
        metrics::counter!(metric::PROGRAMS_VANISHED).increment(loaded.vanished as u64);
        metrics::gauge!(metric::CACHE_ENTRIES).set(self.cache.entry_count() as f64);
        Ok(loaded)
    }

    /// Drops cached programs the scan did not see and that were cached
    /// before it started; the next hit for one reads Redis again.
    async fn drop_vanished(&self, seen: &HashSet<Key>, scan_started: u64) -> usize {
        let gone: Vec<(Key, Cached)> = self
            .cache
            .iter()
            .filter(|(key, value)| {
                matches!(value, Cached::Known(p) if p.version() < scan_started)
                    && !seen.contains(&**key)
            })
            .map(|(key, value)| (*key, value))
            .collect();
        let mut dropped = 0;
        for (key, value) in gone {
            if self.remove_if_same(key, &value).await {
                dropped += 1;
            }
        }
        dropped
    }
}

/// The outcome of [`ProgramCache::put_if_newer`].
struct Put {
    /// Whether the offered value was written.
    written: bool,
    /// What the cache holds for the id now (the offered value on a collision).
    current: Cached,
}

/// Reads one program from Redis, within `timeout`.
async fn fetch(
    conn: Option<ConnectionManager>,
    id: String,
    timeout: Duration,
) -> Result<Cached, FetchError> {
    let mut conn = conn.ok_or(FetchError::NotConnected)?;
    let key = format!("{PROGRAM_KEY_PREFIX}{id}");
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(&key).arg(&HASH_FIELDS[..]);
    let read = cmd.query_async::<Vec<Option<String>>>(&mut conn);
    let values = tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| FetchError::Timeout(timeout))??;
    Ok(interpret(&id, &key, &values))
}

/// Scans every program hash and reads each page of them in one pipeline,
/// sending the interpreted page on; ends at the end of the scan, at the
/// first error, or when nobody takes the pages any more.
async fn read_pages(
    mut conn: ConnectionManager,
    pages: tokio::sync::mpsc::Sender<Vec<(String, Cached)>>,
) -> Result<(), FetchError> {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(PROGRAM_KEY_PATTERN)
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            // HMGET of the known fields, read positionally: no map of
            // strings per program (the warm start reads 100,000s).
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.cmd("HMGET").arg(k).arg(&HASH_FIELDS[..]);
            }
            let hashes: Vec<Vec<Option<String>>> = pipe.query_async(&mut conn).await?;
            let page = keys
                .into_iter()
                .zip(hashes)
                .filter_map(|(key, fields)| {
                    let id = key.strip_prefix(PROGRAM_KEY_PREFIX)?;
                    let cached = interpret(id, &key, &fields);
                    Some((id.to_owned(), cached))
                })
                .collect();
            if pages.send(page).await.is_err() {
                return Ok(());
            }
        }
        cursor = next;
        if cursor == 0 {
            return Ok(());
        }
    }
}

fn interpret(id: &str, key: &str, values: &[Option<String>]) -> Cached {
    match StoredProgram::from_hmget(values) {
        Ok(StoredProgram::Present(p)) if p.program_id.as_str() == id => {
            Cached::Known(Arc::new(ProgramEntry::new(&p)))
        }
        Ok(StoredProgram::Present(_)) => {
            tracing::warn!(
                key,
                "program hash names another program id; treating as unknown"
            );
            Cached::missing(id, 0)
        }
        Ok(StoredProgram::Deleted { version }) => Cached::missing(id, version),
        Ok(StoredProgram::Absent) => Cached::missing(id, 0),
        Err(e) => {
            // A hash the updater would never write: treat as unknown, loudly.
            tracing::warn!(key, error = %e, "unreadable program hash in Redis; treating as unknown");
            Cached::missing(id, 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> ProgramCache {
        ProgramCache::new(&CacheSettings {
            capacity: 100,
            positive_ttl: Some(Duration::from_secs(600)),
            negative_ttl: Duration::from_secs(600),
            redis_timeout: Duration::from_millis(100),
        })
    }

    fn known(name: &str, version: u64) -> Cached {
        let p = adtrack_proto::program::Program::from_json(&serde_json::json!({
            "programId": "p", "programName": name, "checksum": "1",
            "customerId": 1, "customerName": "c", "version": version
        }))
        .expect("program");
        Cached::Known(Arc::new(ProgramEntry::new(&p)))
    }

    fn name(c: &Cached) -> String {
        match c {
            Cached::Known(p) => p.program_name().to_owned(),
            Cached::Missing { version, .. } => format!("missing@{version}"),
        }
    }

    async fn held(cache: &ProgramCache) -> String {
        name(&cache.cache.get(&cache.key("p")).await.expect("cached"))
    }

    /// Whatever order a miss's read, a push and a reload arrive in, the
    /// newest version is what stays and what the late writer answers.
    #[tokio::test]
    async fn every_write_keeps_the_newest_version() {
        let cache = cache();
        assert!(cache.put_if_newer("p", known("v2", 2)).await.written);
        // A miss (or a reload) that read version 1 before version 2 was written.
        let late = cache.put_if_newer("p", known("v1", 1)).await;
        assert!(!late.written);
        assert_eq!(
            name(&late.current),
            "v2",
            "the late reader answers the newer value"
        );
        assert_eq!(held(&cache).await, "v2");
        // A read that found no hash (before the program existed) changes nothing.
        assert!(
            !cache
                .put_if_newer("p", Cached::missing("p", 0))
                .await
                .written
        );
        assert_eq!(held(&cache).await, "v2");
        // A deletion at version 3 wins, and an older write cannot undo it.
        assert!(
            cache
                .put_if_newer("p", Cached::missing("p", 3))
                .await
                .written
        );
        assert!(!cache.put_if_newer("p", known("v2", 2)).await.written);
        assert_eq!(held(&cache).await, "missing@3");
        assert!(cache.put_if_newer("p", known("v4", 4)).await.written);
        assert_eq!(held(&cache).await, "v4");
    }

    /// A reload drops an entry only if it is still the one it looked at.
    #[tokio::test]
    async fn a_vanished_entry_is_dropped_only_if_unchanged() {
        let cache = cache();
        let first = known("v1", 1);
        cache.put_if_newer("p", first.clone()).await;
        cache.put_if_newer("p", known("v2", 2)).await;
        assert!(!cache.remove_if_same(cache.key("p"), &first).await);
        assert_eq!(held(&cache).await, "v2");
        let now = cache.cache.get(&cache.key("p")).await.expect("cached");
        assert!(cache.remove_if_same(cache.key("p"), &now).await);
        assert!(cache.cache.get(&cache.key("p")).await.is_none());
    }
}
