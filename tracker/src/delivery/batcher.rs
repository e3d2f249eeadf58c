//! Grouping and aggregation: events are packed, in arrival order, into one
//! open KPL aggregate at a time; it is sealed when the next event does not
//! fit or when its oldest event has waited the linger, and takes the next
//! shard in turn (one with write budget left, when there is one). Every
//! event of an aggregate carries that shard's explicit hash key, so the
//! aggregate and each of its events belong to one shard, whatever a reshard
//! does later. Without aggregation every event is a record of its own, on
//! the shard its partition key hashes to.

use std::collections::VecDeque;
use std::time::Duration;

use adtrack_proto::kpl::{ShardAggregate, partition_hash};
use bytes::Bytes;
use tokio::time::Instant;

use super::budget::Budget;
use crate::outgoing::Outgoing;
use crate::shard_map::ShardMap;
use crate::spool::SegmentId;

/// Most records one PutRecords call may carry.
pub const MAX_RECORDS_PER_CALL: usize = 500;

/// One event inside the engine, with where it came from.
#[derive(Debug, Clone)]
pub struct Unit {
    pub ev: Outgoing,
    /// `None`: from memory (its bytes are released on delivery);
    /// `Some`: read from this spool segment (acknowledged on delivery).
    pub origin: Option<SegmentId>,
}

/// One Kinesis record: an aggregate or a plain event.
#[derive(Debug)]
pub struct KRecord {
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Bytes,
    pub units: Vec<Unit>,
    /// The hash Kinesis routes it by (explicit hash key or MD5 of the key);
    /// the shard owning it in the current map holds its write budget.
    pub hash: u128,
    pub attempts: u32,
    /// When its oldest event's linger is over: the record goes in the next
    /// call by then, even if that call is not full.
    pub due: Instant,
    /// When its oldest event reached the engine: how long memory has held
    /// it (events older than the memory age bound are moved to the spool).
    pub since: Instant,
}

impl KRecord {
    pub fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// The open group of events and how it becomes records.
pub struct Batcher {
    aggregate: bool,
    linger: Duration,
    agg: ShardAggregate,
    open: Vec<Unit>,
    open_since: Option<Instant>,
    next_shard: usize,
}

impl Batcher {
    pub fn new(aggregate: bool, max_aggregate_bytes: usize, linger: Duration) -> Self {
        Self {
            aggregate,
            linger,
            agg: ShardAggregate::new(max_aggregate_bytes),
            open: Vec::new(),
            open_since: None,
            next_shard: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// When the open group must be sealed.
    pub fn due(&self) -> Option<Instant> {
        self.open_since.map(|t| t + self.linger)
    }

    /// Adds an event; a group that is full is sealed into `ready` first.
    pub fn place(
        &mut self,
        unit: Unit,
        now: Instant,
        map: &ShardMap,
        budgets: &[Budget],
        ready: &mut VecDeque<KRecord>,
    ) {
        if self.aggregate {
            if !self.agg.push(&unit.ev.partition_key, &unit.ev.data) {
                self.seal(now, map, budgets, ready);
                // An empty aggregate takes any one event.
                self.agg.push(&unit.ev.partition_key, &unit.ev.data);
            }
        } else if self.open.len() >= MAX_RECORDS_PER_CALL {
            self.seal(now, map, budgets, ready);
        }
        self.open_since.get_or_insert(now);
        self.open.push(unit);
    }

    /// Seals the open group if its linger is over (or always, when `force`).
    pub fn seal_if_due(
        &mut self,
        force: bool,
        now: Instant,
        map: &ShardMap,
        budgets: &[Budget],
        ready: &mut VecDeque<KRecord>,
    ) {
        if self.due().is_some_and(|t| force || now >= t) {
            self.seal(now, map, budgets, ready);
        }
    }

    fn seal(
        &mut self,
        now: Instant,
        map: &ShardMap,
        budgets: &[Budget],
        ready: &mut VecDeque<KRecord>,
    ) {
        if self.open.is_empty() {
            return;
        }
        let units = std::mem::take(&mut self.open);
        let since = self.open_since.take().unwrap_or(now);
        let due = since + self.linger;
        if self.aggregate {
            let shard = self.pick_shard(now, map, budgets);
            let target = map.shard(shard);
            let ehk = target.explicit_hash_key();
            let data = self.agg.finish(&ehk);
            ready.push_back(KRecord {
                partition_key: units[0].ev.partition_key.clone(),
                explicit_hash_key: Some(ehk),
                data,
                hash: target.start,
                units,
                attempts: 0,
                due,
                since,
            });
        } else {
            for unit in units {
                let hash = partition_hash(&unit.ev.partition_key);
                ready.push_back(KRecord {
                    partition_key: unit.ev.partition_key.clone(),
                    explicit_hash_key: None,
                    data: unit.ev.data.clone(),
                    hash,
                    units: vec![unit],
                    attempts: 0,
                    due,
                    since,
                });
            }
        }
    }

    /// The next shard in turn that is not paused (any, if all are).
    fn pick_shard(&mut self, now: Instant, map: &ShardMap, budgets: &[Budget]) -> usize {
        let n = map.len().max(1);
        for k in 0..n {
            let idx = (self.next_shard + k) % n;
            if !budgets.get(idx).is_some_and(|b| b.is_paused(now)) {
                self.next_shard = idx + 1;
                return idx;
            }
        }
        let idx = self.next_shard % n;
        self.next_shard = idx + 1;
        idx
    }

    /// Gives up the open group (shutdown deadline).
    pub fn take_open(&mut self) -> Vec<Unit> {
        self.open_since = None;
        let units = std::mem::take(&mut self.open);
        if self.aggregate && !units.is_empty() {
            self.agg.finish("0");
        }
        units
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(i: usize, len: usize) -> Unit {
        Unit {
            ev: Outgoing {
                partition_key: format!("0190-{i:032}"),
                data: Bytes::from(vec![b'e'; len]),
            },
            origin: None,
        }
    }

    #[test]
    fn full_aggregates_seal_at_once_and_take_shards_in_turn() {
        let t0 = Instant::now();
        let m = ShardMap::even(3);
        let budgets: Vec<Budget> = (0..3).map(|_| Budget::new(1000, 1 << 20, t0)).collect();
        let mut b = Batcher::new(true, 4_096, Duration::from_millis(100));
        let mut ready = VecDeque::new();
        for i in 0..100 {
            b.place(unit(i, 300), t0, &m, &budgets, &mut ready);
        }
        assert!(ready.len() >= 5, "full aggregates wait for nothing");
        let shards: Vec<usize> = ready.iter().map(|r| m.index_for_hash(r.hash)).collect();
        assert_eq!(&shards[..3], &[0, 1, 2]);
        for r in &ready {
            assert!(r.data.len() <= 4_096);
            let s = m.shard(m.index_for_hash(r.hash));
            assert!(s.start <= r.hash && r.hash <= s.end);
            assert_eq!(
                r.explicit_hash_key.as_deref(),
                Some(s.start.to_string().as_str())
            );
        }
        let before = ready.len();
        b.seal_if_due(
            false,
            t0 + Duration::from_millis(99),
            &m,
            &budgets,
            &mut ready,
        );
        assert_eq!(ready.len(), before, "sealed before its linger");
        b.seal_if_due(
            false,
            t0 + Duration::from_millis(100),
            &m,
            &budgets,
            &mut ready,
        );
        assert_eq!(ready.len(), before + 1);
        assert!(b.is_empty());
        let events: usize = ready.iter().map(|r| r.units.len()).sum();
        assert_eq!(events, 100);
    }

    #[test]
    fn paused_shards_are_passed_over() {
        let t0 = Instant::now();
        let m = ShardMap::even(2);
        let mut budgets: Vec<Budget> = (0..2).map(|_| Budget::new(1000, 1 << 20, t0)).collect();
        budgets[0].throttled(t0);
        let mut b = Batcher::new(true, 51_200, Duration::ZERO);
        let mut ready = VecDeque::new();
        for i in 0..3 {
            b.place(unit(i, 10), t0, &m, &budgets, &mut ready);
            b.seal_if_due(false, t0, &m, &budgets, &mut ready);
        }
        assert!(ready.iter().all(|r| m.index_for_hash(r.hash) == 1));
    }

    #[test]
    fn plain_records_go_where_their_key_hashes() {
        let t0 = Instant::now();
        let m = ShardMap::even(4);
        let budgets: Vec<Budget> = (0..4).map(|_| Budget::new(1000, 1 << 20, t0)).collect();
        let mut b = Batcher::new(false, 51_200, Duration::from_millis(5));
        let mut ready = VecDeque::new();
        for i in 0..50 {
            b.place(unit(i, 10), t0, &m, &budgets, &mut ready);
        }
        b.seal_if_due(true, t0, &m, &budgets, &mut ready);
        assert_eq!(ready.len(), 50);
        for r in &ready {
            assert_eq!(m.index_for_hash(r.hash), m.index_for(&r.partition_key));
            assert!(r.explicit_hash_key.is_none());
        }
    }
}
