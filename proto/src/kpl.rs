//! KPL-compatible record aggregation: many user records in one Kinesis
//! record, in the format the Kinesis Producer Library writes and the KCL and
//! AWS's deaggregation libraries read:
//!
//! ```text
//! F3 89 9A C2 | AggregatedRecord protobuf | MD5(protobuf), 16 bytes
//! ```
//!
//! Reading follows the KCL's rules: a record without the magic prefix, too
//! short, with a wrong MD5 or a protobuf that does not decode is a plain
//! (non-aggregated) record and is returned whole.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use md5::{Digest, Md5};
use prost::Message;

/// Generated types of `proto/kpl/aggregated_record.proto`.
pub mod wire {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/kpl.rs"));
}

/// The 4 bytes every aggregated record starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// Length of the MD5 digest that ends an aggregated record.
pub const DIGEST_LEN: usize = 16;
/// The KPL's default bound on an aggregated record.
pub const DEFAULT_MAX_AGGREGATE_BYTES: usize = 51_200;
/// Kinesis's bound on one record (data and partition key).
pub const MAX_KINESIS_RECORD_BYTES: usize = 1024 * 1024;

/// One user record going into an aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub partition_key: String,
    pub explicit_hash_key: Option<String>,
    pub data: Bytes,
}

/// Builds one aggregated record at a time, never larger than its bound.
#[derive(Debug)]
pub struct Aggregator {
    max_bytes: usize,
    keys: HashMap<String, u64>,
    hash_keys: HashMap<String, u64>,
    message: wire::AggregatedRecord,
    /// Encoded length of `message` so far.
    encoded: usize,
}

impl Aggregator {
    /// `max_bytes` bounds the whole aggregated record (magic and digest
    /// included); it is capped at Kinesis's 1 MiB.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes: max_bytes.min(MAX_KINESIS_RECORD_BYTES - 256),
            keys: HashMap::new(),
            hash_keys: HashMap::new(),
            message: wire::AggregatedRecord::default(),
            encoded: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.message.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.message.records.is_empty()
    }

    /// Size of the aggregated record built so far (with magic and digest).
    pub fn size(&self) -> usize {
        MAGIC.len() + self.encoded + DIGEST_LEN
    }

    fn added_len(&self, rec: &UserRecord) -> usize {
        let mut added = 0;
        let pk_index = match self.keys.get(&rec.partition_key) {
            Some(i) => *i,
            None => {
                added += prost::encoding::string::encoded_len(1, &rec.partition_key);
                self.keys.len() as u64
            }
        };
        let ehk_index = rec
            .explicit_hash_key
            .as_ref()
            .map(|h| match self.hash_keys.get(h) {
                Some(i) => *i,
                None => {
                    added += prost::encoding::string::encoded_len(2, h);
                    self.hash_keys.len() as u64
                }
            });
        let record = wire::Record {
            partition_key_index: pk_index,
            explicit_hash_key_index: ehk_index,
            data: Bytes::new(),
            tags: Vec::new(),
        };
        // The record message with its data, as field 3 of the aggregate
        // (proto2 encodes the required `data` even when empty).
        let inner = record.encoded_len() - prost::encoding::bytes::encoded_len(3, &Bytes::new())
            + prost::encoding::bytes::encoded_len(3, &rec.data);
        added
            + prost::encoding::key_len(3)
            + prost::encoding::encoded_len_varint(inner as u64)
            + inner
    }

    /// Adds a record if the aggregate stays within its bound. A record too
    /// big to share an aggregate is accepted alone into an empty one.
    /// Returns the record back when it does not fit.
    pub fn push(&mut self, rec: UserRecord) -> Result<(), UserRecord> {
        let added = self.added_len(&rec);
        if !self.is_empty() && self.size() + added > self.max_bytes {
            return Err(rec);
        }
        let pk_index = match self.keys.get(&rec.partition_key) {
            Some(i) => *i,
            None => {
                let i = self.keys.len() as u64;
                self.keys.insert(rec.partition_key.clone(), i);
                self.message.partition_key_table.push(rec.partition_key);
                i
            }
        };
        let ehk_index = rec.explicit_hash_key.map(|h| match self.hash_keys.get(&h) {
            Some(i) => *i,
            None => {
                let i = self.hash_keys.len() as u64;
                self.hash_keys.insert(h.clone(), i);
                self.message.explicit_hash_key_table.push(h);
                i
            }
        });
        self.message.records.push(wire::Record {
            partition_key_index: pk_index,
            explicit_hash_key_index: ehk_index,
            data: rec.data,
            tags: Vec::new(),
        });
        self.encoded += added;
        Ok(())
    }

    /// The finished aggregated record; the aggregator starts over empty.
    pub fn finish(&mut self) -> Bytes {
        let message = std::mem::take(&mut self.message);
        self.keys.clear();
        self.hash_keys.clear();
        self.encoded = 0;
        encode(&message)
    }
}

/// Longest explicit hash key text (2^128 - 1 in decimal has 39 digits).
const MAX_EHK_LEN: usize = 39;

/// Builds an aggregate in one pass, straight into its final bytes, for
/// records that all go to one shard: all user records share one partition
/// key (the first record's, which is also the Kinesis record's; an event
/// carries its own id inside, so the key only routes) and one explicit hash
/// key, chosen when the aggregate is finished (protobuf lets the repeated
/// fields come in any order, so the table entry may follow the records). A
/// KCL consumer filtering user records by its shard's hash range reads that
/// explicit hash key, so every user record lands where the aggregate does.
#[derive(Debug)]
pub struct ShardAggregate {
    max_bytes: usize,
    buf: BytesMut,
    records: u64,
}

impl ShardAggregate {
    /// `max_bytes` bounds the finished record (magic, digest and explicit
    /// hash key included); it is capped at Kinesis's 1 MiB.
    pub fn new(max_bytes: usize) -> Self {
        let max_bytes = max_bytes.min(MAX_KINESIS_RECORD_BYTES - 256);
        let mut buf = BytesMut::with_capacity(max_bytes);
        buf.put_slice(&MAGIC);
        Self {
            max_bytes,
            buf,
            records: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.records as usize
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Size of the finished record if it were finished now, at most.
    pub fn size(&self) -> usize {
        self.buf.len() + 2 + MAX_EHK_LEN + DIGEST_LEN
    }

    fn added_len(&self, partition_key: &str, data: &[u8]) -> usize {
        let inner = record_inner_len(data.len());
        let key = if self.is_empty() {
            1 + prost::encoding::encoded_len_varint(partition_key.len() as u64)
                + partition_key.len()
        } else {
            0
        };
        key + 1 + prost::encoding::encoded_len_varint(inner as u64) + inner
    }

    /// Appends one user record if the aggregate stays within its bound; a
    /// record too big to share an aggregate is accepted alone into an empty
    /// one. Returns false when it does not fit. The partition key of the
    /// first record is the aggregate's; later ones share it.
    pub fn push(&mut self, partition_key: &str, data: &[u8]) -> bool {
        let added = self.added_len(partition_key, data);
        if !self.is_empty() && self.size() + added > self.max_bytes {
            return false;
        }
        if self.is_empty() {
            // The one partition_key_table entry (field 1).
            put_bytes_field(1, partition_key.as_bytes(), &mut self.buf);
        }
        // records entry (field 3): partition_key_index = 0, explicit_hash_key_index = 0, data.
        let inner = record_inner_len(data.len());
        prost::encoding::encode_key(3, prost::encoding::WireType::LengthDelimited, &mut self.buf);
        prost::encoding::encode_varint(inner as u64, &mut self.buf);
        prost::encoding::uint64::encode(1, &0, &mut self.buf);
        prost::encoding::uint64::encode(2, &0, &mut self.buf);
        put_bytes_field(3, data, &mut self.buf);
        self.records += 1;
        true
    }

    /// The finished record, its user records all under `explicit_hash_key`;
    /// the aggregate starts over empty.
    pub fn finish(&mut self, explicit_hash_key: &str) -> Bytes {
        put_bytes_field(2, explicit_hash_key.as_bytes(), &mut self.buf);
        let digest = Md5::digest(&self.buf[MAGIC.len()..]);
        self.buf.put_slice(&digest);
        let mut next = BytesMut::with_capacity(self.max_bytes);
        next.put_slice(&MAGIC);
        self.records = 0;
        std::mem::replace(&mut self.buf, next).freeze()
    }
}

/// A length-delimited field: key, length, bytes.
fn put_bytes_field(tag: u32, bytes: &[u8], buf: &mut BytesMut) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(bytes.len() as u64, buf);
    buf.put_slice(bytes);
}

/// Encoded length of a `Record` with both indexes 0 and `data_len` bytes.
fn record_inner_len(data_len: usize) -> usize {
    2 + 2 + 1 + prost::encoding::encoded_len_varint(data_len as u64) + data_len
}

/// Frames an `AggregatedRecord`: magic, protobuf, MD5 of the protobuf.
pub fn encode(message: &wire::AggregatedRecord) -> Bytes {
    let body = message.encode_to_vec();
    let mut out = BytesMut::with_capacity(MAGIC.len() + body.len() + DIGEST_LEN);
    out.put_slice(&MAGIC);
    out.put_slice(&body);
    out.put_slice(&Md5::digest(&body));
    out.freeze()
}

/// What one Kinesis record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deaggregated {
    /// Not an aggregate (or a corrupt one): the data is one record.
    Plain,
    /// The user records of an aggregate, in order.
    Records(Vec<UserRecord>),
}

/// An aggregate whose checksum holds but whose indexes do not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("aggregated record is inconsistent: {0}")]
pub struct BadAggregate(pub String);

/// Splits a Kinesis record into its user records, by the KCL's rules.
pub fn deaggregate(data: &[u8]) -> Result<Deaggregated, BadAggregate> {
    if data.len() < MAGIC.len() + DIGEST_LEN || data[..MAGIC.len()] != MAGIC {
        return Ok(Deaggregated::Plain);
    }
    let body = &data[MAGIC.len()..data.len() - DIGEST_LEN];
    let digest = &data[data.len() - DIGEST_LEN..];
    if Md5::digest(body).as_slice() != digest {
        return Ok(Deaggregated::Plain);
    }
    let Ok(message) = wire::AggregatedRecord::decode(body) else {
        return Ok(Deaggregated::Plain);
    };
    let mut out = Vec::with_capacity(message.records.len());
    for (i, r) in message.records.into_iter().enumerate() {
        let partition_key = message
            .partition_key_table
            .get(r.partition_key_index as usize)
            .cloned()
            .ok_or_else(|| BadAggregate(format!("record {i}: partition key index out of range")))?;
        let explicit_hash_key = match r.explicit_hash_key_index {
            None => None,
            Some(idx) => Some(
                message
                    .explicit_hash_key_table
                    .get(idx as usize)
                    .cloned()
                    .ok_or_else(|| {
                        BadAggregate(format!("record {i}: explicit hash key index out of range"))
                    })?,
            ),
        };
        out.push(UserRecord {
            partition_key,
            explicit_hash_key,
            data: r.data,
        });
    }
    Ok(Deaggregated::Records(out))
}

/// The 128-bit hash Kinesis maps a partition key to a shard with:
/// MD5 of its UTF-8 bytes, read as a big-endian unsigned integer.
pub fn partition_hash(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn user(pk: &str, ehk: Option<&str>, data: &[u8]) -> UserRecord {
        UserRecord {
            partition_key: pk.to_owned(),
            explicit_hash_key: ehk.map(str::to_owned),
            data: Bytes::copy_from_slice(data),
        }
    }

    fn aggregate_all(records: &[UserRecord], max: usize) -> Vec<Bytes> {
        let mut agg = Aggregator::new(max);
        let mut out = Vec::new();
        for r in records {
            if let Err(back) = agg.push(r.clone()) {
                out.push(agg.finish());
                agg.push(back).expect("fits an empty aggregate");
            }
        }
        if !agg.is_empty() {
            out.push(agg.finish());
        }
        out
    }

    /// Every user record of `aggregates`, checking that none is above
    /// `max` unless a single record needed more.
    fn read_all(aggregates: &[Bytes], max: usize) -> Result<Vec<UserRecord>, TestCaseError> {
        let mut out = Vec::new();
        for a in aggregates {
            let Deaggregated::Records(rs) = deaggregate(a).expect("consistent") else {
                panic!("not read as an aggregate");
            };
            prop_assert!(
                a.len() <= max || rs.len() == 1,
                "{} > {max} with {} records",
                a.len(),
                rs.len()
            );
            out.extend(rs);
        }
        Ok(out)
    }

    proptest! {
        #[test]
        fn aggregate_then_deaggregate_is_identity(
            records in prop::collection::vec(
                (
                    prop::sample::select(vec!["a", "b", "key-c", "0190-uuid-like"]),
                    prop::option::of(prop::sample::select(vec!["1", "170141183460469231731687303715884105728"])),
                    prop::collection::vec(any::<u8>(), 0..700),
                ),
                1..120,
            ),
            max in 200usize..60_000,
        ) {
            let input: Vec<UserRecord> = records.iter().map(|(pk, ehk, d)| user(pk, *ehk, d)).collect();
            let output = read_all(&aggregate_all(&input, max), max)?;
            prop_assert_eq!(output, input);
        }
    }

    proptest! {
        #[test]
        fn shard_aggregates_read_back_whole(
            records in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..900), 1..150),
            max in 200usize..60_000,
        ) {
            let ehk = "170141183460469231731687303715884105728";
            let mut agg = ShardAggregate::new(max);
            let mut finished = Vec::new();
            // The partition key each record should read back with: its aggregate's first.
            let mut keys = Vec::new();
            let mut first = String::new();
            for (i, d) in records.iter().enumerate() {
                let pk = format!("0190-event-{i}");
                if agg.is_empty() {
                    first = pk.clone();
                }
                if !agg.push(&pk, d) {
                    finished.push(agg.finish(ehk));
                    first = pk.clone();
                    prop_assert!(agg.push(&pk, d), "fits an empty aggregate");
                }
                keys.push(first.clone());
            }
            if !agg.is_empty() {
                finished.push(agg.finish(ehk));
            }
            let out = read_all(&finished, max)?;
            prop_assert_eq!(out.len(), records.len());
            for ((u, d), key) in out.iter().zip(&records).zip(&keys) {
                prop_assert_eq!(&u.partition_key, key);
                prop_assert_eq!(u.explicit_hash_key.as_deref(), Some(ehk));
                prop_assert_eq!(&u.data[..], &d[..]);
            }
        }
    }

    #[test]
    fn size_accounting_is_exact() {
        let mut agg = Aggregator::new(1 << 20);
        for i in 0..300 {
            agg.push(user(
                &format!("k{}", i % 17),
                (i % 3 == 0).then_some("42"),
                &vec![7u8; i],
            ))
            .expect("fits");
            assert_eq!(encode(&agg.message).len(), agg.size());
        }
    }

    #[test]
    fn corrupt_aggregates_are_plain_records() {
        let mut agg = Aggregator::new(DEFAULT_MAX_AGGREGATE_BYTES);
        agg.push(user("k", None, b"hello")).expect("fits");
        let good = agg.finish().to_vec();
        assert!(matches!(deaggregate(&good), Ok(Deaggregated::Records(r)) if r.len() == 1));
        let mut bad_magic = good.clone();
        bad_magic[0] ^= 1;
        assert_eq!(deaggregate(&bad_magic), Ok(Deaggregated::Plain));
        let mut bad_md5 = good.clone();
        let last = bad_md5.len() - 1;
        bad_md5[last] ^= 1;
        assert_eq!(deaggregate(&bad_md5), Ok(Deaggregated::Plain));
        let mut bad_body = good;
        bad_body[6] ^= 0xff;
        assert_eq!(deaggregate(&bad_body), Ok(Deaggregated::Plain));
        assert_eq!(
            deaggregate(b"plain protobuf bytes"),
            Ok(Deaggregated::Plain)
        );
        assert_eq!(deaggregate(&MAGIC), Ok(Deaggregated::Plain));
        // Checksum holds but an index points nowhere: an error, not a plain record.
        let bad_index = encode(&wire::AggregatedRecord {
            partition_key_table: vec![],
            explicit_hash_key_table: vec![],
            records: vec![wire::Record {
                partition_key_index: 3,
                explicit_hash_key_index: None,
                data: Bytes::from_static(b"x"),
                tags: vec![],
            }],
        });
        assert!(deaggregate(&bad_index).is_err());
    }

    #[test]
    fn partition_hash_matches_kinesis() {
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e.
        assert_eq!(partition_hash(""), 0xd41d8cd98f00b204e9800998ecf8427e);
    }
}
