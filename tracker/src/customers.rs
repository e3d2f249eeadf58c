//! Customer settings the tracker enforces: the kill switch and the rate
//! limit of each customer (all its programs together), from the customer
//! records of core data (see `adtrack_proto::customer`), kept current the
//! way programs are: loaded from Redis, then updated by pushed changes.
//!
//! The limit is a token bucket (governor's GCRA, one atomic per check) per
//! customer and per tracker: a customer without a record, or whose record
//! sets no `rateLimit`, gets the tracker's default
//! (`TRACKER_CUSTOMER_RATE_LIMIT`, none when 0). Buckets are made on a
//! customer's first hit; there is at most one per customer of a cached
//! program, and a customer's settings changing starts its bucket full.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use adtrack_proto::customer::Customer;
use adtrack_proto::redis_layout::{
    CUSTOMER_KEY_PATTERN, CustomerChange, StoredCustomer, VERSION_KEY,
};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use metrics::Counter;
use redis::aio::ConnectionManager;

use crate::metric;

/// The tracker's default limit: events per second and bucket size (0: one
/// second's worth); a rate of 0 is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DefaultLimit {
    pub per_sec: u32,
    pub burst: u32,
}

/// A hit refused for its customer's rate: how long until the next one is
/// accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RateLimited(pub Duration);

impl RateLimited {
    /// The wait in whole seconds, at least 1 (as `Retry-After` says it).
    pub fn retry_after_secs(&self) -> u64 {
        (self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0)).max(1)
    }
}

/// One customer as this tracker knows it.
struct Slot {
    /// The record's version (a deleted record's tombstone version; 0 for a
    /// customer without a record).
    version: u64,
    enabled: bool,
    limiter: Option<DefaultDirectRateLimiter>,
}

impl Slot {
    fn new(customer: &Customer, default: DefaultLimit) -> Self {
        let (rate, burst) = match customer.rate_limit {
            Some(rate) => (rate, customer.rate_burst.unwrap_or(0)),
            None => (
                default.per_sec,
                customer.rate_burst.unwrap_or(default.burst),
            ),
        };
        Self {
            version: customer.version,
            enabled: customer.enabled,
            limiter: NonZeroU32::new(rate).map(|rate| {
                let burst = NonZeroU32::new(burst).unwrap_or(rate);
                RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
            }),
        }
    }
}

/// Every customer this tracker has settings or a bucket for.
pub struct Customers {
    default: DefaultLimit,
    /// Set once any customer has a slot: until then (no customer record,
    /// no default limit) a hit checks nothing, not even the lock.
    populated: AtomicBool,
    slots: RwLock<HashMap<i32, Arc<Slot>>>,
    clock: DefaultClock,
    disabled_hits: Counter,
    limited_hits: Counter,
}

/// What one load of the customer records did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CustomersLoaded {
    /// Records read (tombstones not counted).
    pub records: usize,
    /// Records this tracker held that Redis no longer has (reset to the
    /// defaults; never when Redis lost its data).
    pub vanished: usize,
}

impl Customers {
    pub fn new(default: DefaultLimit) -> Self {
        Self {
            default,
            populated: AtomicBool::new(false),
            slots: RwLock::new(HashMap::new()),
            clock: DefaultClock::default(),
            disabled_hits: metrics::counter!(metric::CUSTOMER_REFUSALS, "reason" => "disabled"),
            limited_hits: metrics::counter!(metric::CUSTOMER_REFUSALS, "reason" => "rate_limited"),
        }
    }

    fn slot(&self, customer_id: i32) -> Option<Arc<Slot>> {
        if !self.populated.load(Ordering::Acquire) {
            return None;
        }
        self.slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&customer_id)
            .cloned()
    }

    /// Whether the customer's programs may take hits (its kill switch is
    /// not thrown); counts a refusal.
    pub fn enabled(&self, customer_id: i32) -> bool {
        let enabled = self.slot(customer_id).is_none_or(|s| s.enabled);
        if !enabled {
            self.disabled_hits.increment(1);
        }
        enabled
    }

    /// Takes one event from the customer's bucket; the wait when it is
    /// empty (counted).
    pub fn admit(&self, customer_id: i32) -> Result<(), RateLimited> {
        let slot = match self.slot(customer_id) {
            Some(slot) => slot,
            None if self.default.per_sec == 0 => return Ok(()),
            None => {
                let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
                self.populated.store(true, Ordering::Release);
                slots
                    .entry(customer_id)
                    .or_insert_with(|| {
                        Arc::new(Slot::new(&Customer::default_for(customer_id), self.default))
                    })
                    .clone()
            }
        };
        match &slot.limiter {
            None => Ok(()),
            Some(limiter) => limiter.check().map_err(|not_until| {
                self.limited_hits.increment(1);
                RateLimited(not_until.wait_time_from(self.clock.now()))
            }),
        }
    }

    /// Applies a record (or its deletion) if it is newer than what is held;
    /// false when it was stale.
    pub fn apply(&self, change: &CustomerChange) -> bool {
        let customer = match change {
            CustomerChange::Upsert(c) => c.clone(),
            CustomerChange::Delete {
                customer_id,
                version,
            } => Customer {
                version: *version,
                ..Customer::default_for(*customer_id)
            },
        };
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        match slots.get(&customer.customer_id) {
            Some(held) if held.version >= customer.version => false,
            _ => {
                let slot = Slot::new(&customer, self.default);
                slots.insert(customer.customer_id, Arc::new(slot));
                self.populated.store(true, Ordering::Release);
                true
            }
        }
    }

    /// Loads every customer record in Redis (few: one SCAN, the hashes
    /// pipelined) through the version-checked [`Self::apply`]. Records
    /// this tracker holds that Redis no longer has take the defaults again,
    /// unless Redis lost its data (no version counter), when what is held
    /// is kept, or a push changed them while the load ran.
    pub async fn load(&self, conn: &mut ConnectionManager) -> redis::RedisResult<CustomersLoaded> {
        // What is held before the scan: only a slot still the very same
        // afterwards can have vanished (one a push wrote meanwhile is newer
        // than the scan).
        let before: HashMap<i32, Arc<Slot>> = self
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, slot)| slot.version > 0)
            .map(|(id, slot)| (*id, Arc::clone(slot)))
            .collect();
        let counter: Option<u64> = redis::cmd("GET").arg(VERSION_KEY).query_async(conn).await?;
        let mut keys: Vec<String> = Vec::new();
        {
            let mut scan = redis::AsyncCommands::scan_options::<String>(
                conn,
                redis::ScanOptions::default()
                    .with_pattern(CUSTOMER_KEY_PATTERN)
                    .with_count(1000),
            )
            .await?;
            while let Some(key) = scan.next_item().await {
                keys.push(key?);
            }
        }
        keys.sort();
        keys.dedup();
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.cmd("HGETALL").arg(key);
        }
        let hashes: Vec<BTreeMap<String, String>> = if keys.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(conn).await?
        };
        let mut loaded = CustomersLoaded::default();
        let mut seen = HashSet::with_capacity(hashes.len());
        for (key, hash) in keys.iter().zip(&hashes) {
            let change = match StoredCustomer::from_hash(hash) {
                Ok(StoredCustomer::Present(c)) => {
                    loaded.records += 1;
                    CustomerChange::Upsert(c)
                }
                Ok(StoredCustomer::Deleted { version }) => {
                    let Some(customer_id) = key.rsplit(':').next().and_then(|id| id.parse().ok())
                    else {
                        continue;
                    };
                    CustomerChange::Delete {
                        customer_id,
                        version,
                    }
                }
                Ok(StoredCustomer::Absent) => continue,
                Err(e) => {
                    tracing::warn!(key, error = %e, "ignoring an unreadable customer record");
                    continue;
                }
            };
            seen.insert(change.customer_id());
            self.apply(&change);
        }
        if counter.is_some() {
            let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
            let gone: Vec<i32> = before
                .iter()
                .filter(|(id, old)| {
                    !seen.contains(id) && slots.get(id).is_some_and(|now| Arc::ptr_eq(now, old))
                })
                .map(|(id, _)| *id)
                .collect();
            for id in &gone {
                slots.remove(id);
            }
            loaded.vanished = gone.len();
        }
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        id: i32,
        version: u64,
        enabled: bool,
        rate: Option<u32>,
        burst: Option<u32>,
    ) -> CustomerChange {
        CustomerChange::Upsert(Customer {
            customer_id: id,
            enabled,
            rate_limit: rate,
            rate_burst: burst,
            version,
        })
    }

    #[test]
    fn the_default_limit_applies_to_customers_without_a_record() {
        let c = Customers::new(DefaultLimit {
            per_sec: 1,
            burst: 3,
        });
        for _ in 0..3 {
            assert_eq!(c.admit(7), Ok(()));
        }
        let RateLimited(wait) = c.admit(7).expect_err("over the burst");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another customer has its own bucket.
        assert_eq!(c.admit(8), Ok(()));
        // No default: no limit.
        let open = Customers::new(DefaultLimit::default());
        assert!((0..1000).all(|_| open.admit(7).is_ok()));
    }

    #[test]
    fn a_record_overrides_the_default_and_switches_off() {
        let c = Customers::new(DefaultLimit {
            per_sec: 1,
            burst: 1,
        });
        assert!(c.apply(&record(7, 2, true, Some(0), None)));
        assert!(
            (0..1000).all(|_| c.admit(7).is_ok()),
            "rateLimit 0 is no limit"
        );
        assert!(c.enabled(7));
        assert!(c.apply(&record(7, 3, false, None, Some(2))));
        assert!(!c.enabled(7));
        assert!(c.admit(7).is_ok() && c.admit(7).is_ok() && c.admit(7).is_err());
        // An older change is refused; a deletion brings the defaults back.
        assert!(!c.apply(&record(7, 2, true, None, None)));
        assert!(!c.enabled(7));
        assert!(c.apply(&CustomerChange::Delete {
            customer_id: 7,
            version: 4
        }));
        assert!(c.enabled(7));
        assert!(
            !c.apply(&record(7, 3, false, None, None)),
            "older than the deletion"
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(RateLimited(Duration::from_millis(1)).retry_after_secs(), 1);
        assert_eq!(RateLimited(Duration::ZERO).retry_after_secs(), 1);
        assert_eq!(
            RateLimited(Duration::from_millis(1500)).retry_after_secs(),
            2
        );
        assert_eq!(RateLimited(Duration::from_secs(3)).retry_after_secs(), 3);
    }
}
