//! The program cache: moka in process (L1) in front of Redis (L2).
//!
//! Known programs and unknown ids are both cached (separate TTLs). Concurrent
//! misses for one id share a single Redis read. Pushed changes are applied
//! only when their version is newer than what the cache holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use adtrack_proto::program::Program;
use adtrack_proto::redis_layout::{
    PROGRAM_KEY_PATTERN, PROGRAM_KEY_PREFIX, ProgramChange, StoredProgram,
};
use metrics::Counter;
use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};
use redis::aio::ConnectionManager;
use time::OffsetDateTime;
use tokio::sync::OnceCell;

use crate::metric;

/// What the cache holds for one id.
#[derive(Debug, Clone)]
pub enum Cached {
    Known(Arc<Program>),
    /// Not in Redis (or deleted there at `version`).
    Missing {
        version: u64,
    },
}

impl Cached {
    fn version(&self) -> u64 {
        match self {
            Self::Known(p) => p.version,
            Self::Missing { version } => *version,
        }
    }
}

/// The answer for one hit.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The program exists and accepts hits now.
    Active(Arc<Program>),
    /// The program exists but is disabled or outside its validity window.
    Inactive(Arc<Program>),
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

impl Expiry<String, Cached> for TtlPolicy {
    fn expire_after_create(&self, _: &String, v: &Cached, _: Instant) -> Option<Duration> {
        Some(self.ttl(v))
    }
    fn expire_after_update(
        &self,
        _: &String,
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
    cache: Cache<String, Cached>,
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
        let cache = Cache::builder()
            .max_capacity(settings.capacity)
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

    /// Validates one program id (already syntax-checked) at `now`.
    pub async fn lookup(&self, id: &str, now: OffsetDateTime) -> Lookup {
        let cached = match self.cache.get(id).await {
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
                match self.cache.try_get_with(id.to_owned(), self.fetch(id)).await {
                    Ok(c) => c,
                    Err(e) => {
                        let op = if matches!(*e, FetchError::Timeout(_)) {
                            "timeout"
                        } else {
                            "lookup"
                        };
                        metrics::counter!(metric::REDIS_ERRORS, "op" => op).increment(1);
                        return Lookup::Unverified;
                    }
                }
            }
        };
        match cached {
            Cached::Known(p) if p.is_active_at(now) => Lookup::Active(p),
            Cached::Known(p) => Lookup::Inactive(p),
            Cached::Missing { .. } => Lookup::Unknown,
        }
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
        Ok(interpret(&key, &fields))
    }

    /// Applies a pushed change if it is newer than what is cached.
    /// Returns false when it was stale and ignored.
    ///
    /// A cache miss that read Redis just before this change was written may
    /// insert its older answer just after; so the change is applied once more
    /// after that read's timeout has surely passed ([`Self::reapply_later`]).
    pub async fn apply(&self, change: &ProgramChange) -> bool {
        let id = change.program_id().to_string();
        let new = match change {
            ProgramChange::Upsert(p) => Cached::Known(Arc::new(p.clone())),
            ProgramChange::Delete { version, .. } => Cached::Missing { version: *version },
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

    async fn put_if_newer(&self, id: String, new: Cached) -> bool {
        let version = new.version();
        let result = self
            .cache
            .entry(id)
            .and_compute_with(|current| {
                let op = match current {
                    Some(e) if e.value().version() >= version => Op::Nop,
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
                    let cached = interpret(&key, &fields);
                    if let Cached::Known(_) = cached {
                        loaded += 1;
                    }
                    if loaded as u64 <= self.cache.policy().max_capacity().unwrap_or(u64::MAX) {
                        if !self.warmed.load(Ordering::Acquire) {
                            // First load into an empty cache: nothing newer to keep.
                            self.cache.insert(id.to_owned(), cached).await;
                        } else {
                            self.put_if_newer(id.to_owned(), cached).await;
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

fn interpret(key: &str, fields: &BTreeMap<String, String>) -> Cached {
    match StoredProgram::from_hash(fields) {
        Ok(StoredProgram::Present(p)) => Cached::Known(Arc::new(p)),
        Ok(StoredProgram::Deleted { version }) => Cached::Missing { version },
        Ok(StoredProgram::Absent) => Cached::Missing { version: 0 },
        Err(e) => {
            // A hash the updater would never write: treat as unknown, loudly.
            tracing::warn!(key, error = %e, "unreadable program hash in Redis; treating as unknown");
            Cached::Missing { version: 0 }
        }
    }
}
