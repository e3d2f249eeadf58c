//! The program cache: moka in process (L1) in front of Redis (L2).
//!
//! Known programs and unknown ids are both cached (separate TTLs). Concurrent
//! misses for one id share a single Redis read. Pushed changes are applied
//! only when their version is newer than what the cache holds.
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

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use adtrack_proto::redis_layout::{
    PROGRAM_KEY_PATTERN, PROGRAM_KEY_PREFIX, ProgramChange, StoredProgram,
};
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

struct TtlPolicy {
    positive: Duration,
    negative: Duration,
}

impl TtlPolicy {
    fn ttl(&self, v: &Cached) -> Duration {
        match v {
            Cached::Known(_) => self.positive,
            Cached::Missing { .. } => self.negative,
        }
    }
}

impl Expiry<Key, Cached> for TtlPolicy {
    fn expire_after_create(&self, _: &Key, v: &Cached, _: Instant) -> Option<Duration> {
        Some(self.ttl(v))
    }
    fn expire_after_update(
        &self,
        _: &Key,
        v: &Cached,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.ttl(v))
    }
}

/// Cache settings.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub capacity: u64,
    pub positive_ttl: Duration,
    pub negative_ttl: Duration,
    pub redis_timeout: Duration,
}

/// The program cache shared by all requests.
pub struct ProgramCache {
    cache: Cache<Key, Cached>,
    /// An id's key: a hash keyed at random per process, so ids cannot be
    /// chosen to collide.
    key_of: KeyFn,
    /// Set after the first full load (before it, loads insert without
    /// version checks; pushes during it are applied again shortly after).
    warmed: AtomicBool,
    redis: OnceCell<ConnectionManager>,
    timeout: Duration,
    lookups: LookupMeters,
}

/// Handles for the per-lookup counters, registered once.
struct LookupMeters {
    hit: Counter,
    negative_hit: Counter,
    miss: Counter,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("Redis is not connected yet")]
    NotConnected,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
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
            warmed: AtomicBool::new(false),
            redis: OnceCell::new(),
            timeout: settings.redis_timeout,
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

    pub fn is_connected(&self) -> bool {
        self.redis.initialized()
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
            Some(c) if !c.is_for(id) => {
                // Another id with the same key hash: ask Redis, cache nothing.
                self.lookups.miss.increment(1);
                match self.fetch(id).await {
                    Ok(c) => c,
                    Err(e) => return Self::unverified(&e),
                }
            }
            Some(c) => {
                if matches!(c, Cached::Known(_)) {
                    self.lookups.hit.increment(1);
                } else {
                    self.lookups.negative_hit.increment(1);
                }
                c
            }
            None => {
                self.lookups.miss.increment(1);
                match self.cache.try_get_with(key, self.fetch(id)).await {
                    Ok(c) if c.is_for(id) => c,
                    // Filled concurrently by a colliding id: ask Redis again.
                    Ok(_) => match self.fetch(id).await {
                        Ok(c) => c,
                        Err(e) => return Self::unverified(&e),
                    },
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

    /// Reads one program from Redis, within the timeout.
    async fn fetch(&self, id: &str) -> Result<Cached, FetchError> {
        let mut conn = self.redis.get().cloned().ok_or(FetchError::NotConnected)?;
        let key = format!("{PROGRAM_KEY_PREFIX}{id}");
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(&key);
        let read = cmd.query_async::<BTreeMap<String, String>>(&mut conn);
        let fields = tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))??;
        Ok(interpret(id, &key, &fields))
    }

    /// Applies a pushed change if it is newer than what is cached.
    /// Returns false when it was stale and ignored.
    ///
    /// A cache miss that read Redis just before this change was written may
    /// insert its older answer just after; so the change is applied once more
    /// after that read's timeout has surely passed ([`Self::reapply_later`]).
    pub async fn apply(&self, change: &ProgramChange) -> bool {
        let id = change.program_id().as_str();
        let new = match change {
            ProgramChange::Upsert(p) => Cached::Known(Arc::new(ProgramEntry::new(p))),
            ProgramChange::Delete { version, .. } => Cached::missing(id, *version),
        };
        self.put_if_newer(id, new).await
    }

    /// Applies `change` again after twice the Redis timeout (see [`Self::apply`]).
    pub fn reapply_later(self: &Arc<Self>, change: ProgramChange) {
        let me = self.clone();
        let delay = self.timeout * 2 + Duration::from_millis(50);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            me.apply(&change).await;
        });
    }

    async fn put_if_newer(&self, id: &str, new: Cached) -> bool {
        let version = new.version();
        let result = self
            .cache
            .entry(self.key(id))
            .and_compute_with(|current| {
                let op = match current {
                    // A colliding id's entry is not this one's to keep.
                    Some(e) if e.value().is_for(id) && e.value().version() >= version => Op::Nop,
                    _ => Op::Put(new),
                };
                std::future::ready(op)
            })
            .await;
        !matches!(result, CompResult::Unchanged(_))
    }

    /// Loads every program in Redis (SCAN), keeping newer cached versions.
    /// Used for the warm start and after every pub/sub reconnect.
    pub async fn load_all(&self) -> Result<usize, FetchError> {
        let mut conn = self.redis.get().cloned().ok_or(FetchError::NotConnected)?;
        let mut cursor: u64 = 0;
        let mut loaded = 0usize;
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
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("HGETALL").arg(k);
                }
                let hashes: Vec<BTreeMap<String, String>> = pipe.query_async(&mut conn).await?;
                for (key, fields) in keys.into_iter().zip(hashes) {
                    let Some(id) = key.strip_prefix(PROGRAM_KEY_PREFIX) else {
                        continue;
                    };
                    let cached = interpret(id, &key, &fields);
                    if let Cached::Known(_) = cached {
                        loaded += 1;
                    }
                    if loaded as u64 <= self.cache.policy().max_capacity().unwrap_or(u64::MAX) {
                        if !self.warmed.load(Ordering::Acquire) {
                            // First load into an empty cache: nothing newer to keep.
                            self.cache.insert(self.key(id), cached).await;
                        } else {
                            self.put_if_newer(id, cached).await;
                        }
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        self.warmed.store(true, Ordering::Release);
        metrics::counter!(metric::PROGRAMS_LOADED).increment(loaded as u64);
        metrics::gauge!(metric::CACHE_ENTRIES).set(self.cache.entry_count() as f64);
        Ok(loaded)
    }
}

fn interpret(id: &str, key: &str, fields: &BTreeMap<String, String>) -> Cached {
    match StoredProgram::from_hash(fields) {
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
