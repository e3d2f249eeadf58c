//! The programs table and the customers table: the source of truth for core
//! data (Redis is the trackers' copy of it, see [`crate::redis_copy`]).
//! Both work alike ([`Table`] over a [`Record`]); the customers table holds
//! one item per customer record, key `customerId` (N), with `enabled`
//! (BOOL), `rateLimit` and `rateBurst` (N, when set), `version`, `deleted`
//! and `updatedAt` as below.
//!
//! One item per program, partition key `programId`:
//!
//! | attribute | type | |
//! |---|---|---|
//! | `programId` | S | the key |
//! | `version` | N | grows with every write of the program |
//! | `programName`, `checksum`, `customerName` | S | |
//! | `customerId` | N | |
//! | `valid` | BOOL | |
//! | `validFrom`, `validUntil` | S | RFC 3339, only when set |
//! | `allowedRedirectHosts` | L of S | only when set |
//! | `postbackSecret`, `clickIdParam` | S | only when set |
//! | `attributionWindowDays` | N | only when not the default 30 |
//! | `deleted` | BOOL | `true` on a tombstone, which holds only the key, `version` and `updatedAt` |
//! | `updatedAt` | N | epoch milliseconds of the write |
//!
//! Every write is conditional on the version: an older write never
//! overwrites a newer one, and a delete leaves a versioned tombstone that a
//! late write of an older version cannot undo. A write without a version
//! takes the larger of the clock in microseconds and the stored version
//! plus one, so versions only grow; the table can be a DynamoDB global
//! table (last writer wins between regions, and a region's writes carry
//! the same versions into its Redis).

use std::collections::BTreeMap;
use std::marker::PhantomData;

use adtrack_proto::program::Program;
use anyhow::{Context, Result, anyhow, bail};
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use futures_util::{StreamExt, TryStreamExt};

use crate::record::Record;
use crate::{DeleteOutcome, WriteOutcome};

/// A record's item as the table holds it (one value per item read, moved
/// once: not boxed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry<R = Program> {
    Present(R),
    Deleted { version: u64 },
}

impl<R: Record> Entry<R> {
    pub fn version(&self) -> u64 {
        match self {
            Self::Present(p) => p.version(),
            Self::Deleted { version } => *version,
        }
    }
}

/// Segments of a full scan, read in parallel.
const SCAN_SEGMENTS: i32 = 4;
/// Conditional writes retried when a version raced another writer.
const VERSION_ATTEMPTS: usize = 8;

type Item = std::collections::HashMap<String, AttributeValue>;

/// A table of records of one kind.
#[derive(Debug)]
pub struct Table<R> {
    client: Client,
    table: String,
    kind: PhantomData<fn() -> R>,
}

impl<R> Clone for Table<R> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            table: self.table.clone(),
            kind: PhantomData,
        }
    }
}

/// The programs table.
pub type ProgramTable = Table<Program>;
/// The customers table.
pub type CustomerTable = Table<adtrack_proto::customer::Customer>;

fn now_us() -> u64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000) as u64
}

fn now_ms() -> String {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).to_string()
}

fn err<E: std::error::Error + Send + Sync + 'static>(
    e: aws_sdk_dynamodb::error::SdkError<E>,
) -> anyhow::Error {
    anyhow!("{}", aws_sdk_dynamodb::error::DisplayErrorContext(&e))
}

fn condition_failed(
    e: &aws_sdk_dynamodb::error::SdkError<aws_sdk_dynamodb::operation::put_item::PutItemError>,
) -> bool {
    e.as_service_error()
        .is_some_and(|s| s.is_conditional_check_failed_exception())
}

/// The item of a record at `version`.
fn record_item<R: Record>(record: &R, version: u64) -> Result<Item> {
    let mut r = record.clone();
    r.set_version(version);
    let mut item: Item =
        serde_dynamo::to_item(&r).with_context(|| format!("{} as an item", R::KIND))?;
    item.insert("updatedAt".into(), AttributeValue::N(now_ms()));
    Ok(item)
}

/// Reads an item back (record or tombstone).
pub fn entry_of<R: Record>(mut item: Item) -> Result<Entry<R>> {
    let version = item
        .get("version")
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| anyhow!("item without a version"))?;
    if item.get("deleted").and_then(|v| v.as_bool().ok()) == Some(&true) {
        return Ok(Entry::Deleted { version });
    }
    item.remove("updatedAt");
    let value: serde_json::Value = serde_dynamo::from_item(item).context("reading the item")?;
    let record = R::from_json(&value).map_err(|e| anyhow!("{e}"))?;
    Ok(Entry::Present(record))
}

impl<R: Record> Table<R> {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            kind: PhantomData,
        }
    }

    pub fn name(&self) -> &str {
        &self.table
    }

    /// One record's item (consistent read).
    pub async fn get(&self, id: &R::Id) -> Result<Option<Entry<R>>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(R::KEY, R::key_value(id))
            .consistent_read(true)
            .send()
            .await
            .map_err(err)
            .with_context(|| format!("reading {} {id} from table {}", R::KIND, self.table))?;
        out.item
            .map(entry_of)
            .transpose()
            .with_context(|| format!("{} {id} in table {}", R::KIND, self.table))
    }

    /// Writes a record. With version 0 it takes the next version (see the
    /// module docs); with an explicit one, it is written only if newer than
    /// the stored one.
    pub async fn put(&self, record: &R) -> Result<WriteOutcome> {
        let explicit = record.version() != 0;
        let mut version = if explicit { record.version() } else { now_us() };
        for _ in 0..VERSION_ATTEMPTS {
            let result = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(record_item(record, version)?))
                .condition_expression("attribute_not_exists(#k) OR version < :v")
                .expression_attribute_names("#k", R::KEY)
                .expression_attribute_values(":v", AttributeValue::N(version.to_string()))
                .send()
                .await;
            match result {
                Ok(_) => return Ok(WriteOutcome::Written(version)),
                Err(e) if condition_failed(&e) => {
                    let stored = self
                        .get(record.id())
                        .await?
                        .map(|e| e.version())
                        .unwrap_or(0);
                    if explicit && stored >= version {
                        return Ok(WriteOutcome::Stale(stored));
                    }
                    version = now_us().max(stored + 1);
                }
                Err(e) => {
                    return Err(err(e)).with_context(|| {
                        format!(
                            "writing {} {} to table {}",
                            R::KIND,
                            record.id(),
                            self.table
                        )
                    });
                }
            }
        }
        bail!(
            "{} {}: other writers kept winning the version race",
            R::KIND,
            record.id()
        )
    }

    /// Deletes a record, leaving a versioned tombstone (also when there was
    /// no such record, so an older write cannot create it later).
    pub async fn delete(&self, id: &R::Id) -> Result<DeleteOutcome> {
        self.delete_at(id, 0).await
    }

    /// Deletes a record at `requested` (0: the next version): refused as
    /// [`DeleteOutcome::Stale`] when the table holds a newer version.
    pub async fn delete_at(&self, id: &R::Id, requested: u64) -> Result<DeleteOutcome> {
        let explicit = requested != 0;
        let mut version = if explicit { requested } else { now_us() };
        for _ in 0..VERSION_ATTEMPTS {
            let result = self
                .client
                .put_item()
                .table_name(&self.table)
                .item(R::KEY, R::key_value(id))
                .item("version", AttributeValue::N(version.to_string()))
                .item("deleted", AttributeValue::Bool(true))
                .item("updatedAt", AttributeValue::N(now_ms()))
                .condition_expression(
                    "attribute_not_exists(#k) OR (version < :v AND attribute_not_exists(deleted))",
                )
                .expression_attribute_names("#k", R::KEY)
                .expression_attribute_values(":v", AttributeValue::N(version.to_string()))
                .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
                .send()
                .await;
            match result {
                Ok(out) => {
                    return Ok(if out.attributes.is_some_and(|a| !a.is_empty()) {
                        DeleteOutcome::Deleted(version)
                    } else {
                        DeleteOutcome::Tombstoned(version)
                    });
                }
                Err(e) if condition_failed(&e) => match self.get(id).await? {
                    Some(Entry::Deleted { version }) => {
                        return Ok(DeleteOutcome::AlreadyDeleted(version));
                    }
                    Some(Entry::Present(p)) if explicit && p.version() >= version => {
                        return Ok(DeleteOutcome::Stale(p.version()));
                    }
                    Some(Entry::Present(p)) => version = now_us().max(p.version() + 1),
                    None => version = now_us(),
                },
                Err(e) => {
                    return Err(err(e)).with_context(|| {
                        format!("deleting {} {id} in table {}", R::KIND, self.table)
                    });
                }
            }
        }
        bail!(
            "{} {id}: other writers kept winning the version race",
            R::KIND
        )
    }

    /// Every item: records and tombstones (a consistent parallel scan).
    pub async fn scan_all(&self) -> Result<BTreeMap<R::Id, Entry<R>>> {
        let segments = futures_util::stream::iter(0..SCAN_SEGMENTS)
            .map(|segment| self.scan_segment(segment))
            .buffer_unordered(SCAN_SEGMENTS as usize)
            .try_collect::<Vec<_>>()
            .await?;
        let mut all = BTreeMap::new();
        for part in segments {
            all.extend(part);
        }
        Ok(all)
    }

    async fn scan_segment(&self, segment: i32) -> Result<Vec<(R::Id, Entry<R>)>> {
        let mut out = Vec::new();
        let mut items = self
            .client
            .scan()
            .table_name(&self.table)
            .consistent_read(true)
            .segment(segment)
            .total_segments(SCAN_SEGMENTS)
            .into_paginator()
            .items()
            .send();
        while let Some(item) = items.next().await {
            let item = item
                .map_err(err)
                .with_context(|| format!("scanning table {}", self.table))?;
            let key = item
                .get(R::KEY)
                .ok_or_else(|| anyhow!("an item of table {} has no {}", self.table, R::KEY))?;
            let id = R::id_from_attr(key).ok_or_else(|| {
                anyhow!("table {}: {} {key:?} is not a valid id", self.table, R::KEY)
            })?;
            let entry = entry_of(item)
                .with_context(|| format!("{} {id} in table {}", R::KIND, self.table))?;
            out.push((id, entry));
        }
        Ok(out)
    }
}
