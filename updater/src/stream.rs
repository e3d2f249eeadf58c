//! The core-data stream (the reference design's way in for program
//! changes): each Kinesis record is one program as JSON in the operators'
//! format, or `{"op":"delete","programId":"..."}`; customer records come
//! as `{"op":"customer","customerId":9123,"enabled":false, ...}` (the
//! fields of [`adtrack_proto::customer`]) and are deleted with
//! `{"op":"delete","customerId":9123}`. Records are applied in
//! shard order through the same table-first store as the command line, with
//! the same validation; a record that cannot be applied goes to the
//! dead-letter table with its reason and never blocks the records after it.
//!
//! A record without a version takes one from its arrival in the stream
//! (milliseconds × 1000, plus its rank among the records of its page that
//! arrived in the same millisecond), so a record read twice (Kinesis
//! delivers at least once) writes the same version, or an older one, and
//! changes nothing the second time, and a later write made elsewhere (the
//! command line) is not undone by a replay. (The one case this does not
//! cover: two changes of one program within one millisecond, with the
//! reader stopped between them, can lose the second on the replay.)
//!
//! Read by adtrack's Kinesis reader (`updater stream`: leases, checkpoints,
//! reshard order) or by Lambda behind an event source mapping
//! (`updater-lambda`), with [`CoreData`] as the handler of both.

use adtrack_proto::customer::{Customer, customer_id_from_json};
use adtrack_proto::program::{Program, ProgramId};
use adtrack_reader::dead_letter::DeadLetter;
use adtrack_reader::{Handler, Record};
use adtrack_service::retry::CALLS;
use anyhow::Result;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::{DeleteOutcome, Programs, WriteOutcome};

/// Core-data records handled, by `outcome`: `written`, `stale` (already
/// there or older than the table's), `deleted`, `dead_lettered`, and
/// `not_applied` (the store failed past the attempts; retried).
pub const RECORDS: &str = "adtrack_updater_records";

/// One record's meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Program),
    Delete { program_id: ProgramId, version: u64 },
    PutCustomer(Customer),
    DeleteCustomer { customer_id: i32, version: u64 },
}

/// A delete record's fields besides `op`: one of the two ids.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteRecord {
    #[serde(rename = "programId", default)]
    program_id: Option<String>,
    #[serde(rename = "customerId", default)]
    customer_id: Option<serde_json::Value>,
    #[serde(default)]
    version: u64,
}

/// The versions records without one take (see the module docs), in order;
/// 0 where the arrival is unknown (the store then takes the next version).
pub fn arrival_versions(records: &[Record]) -> Vec<u64> {
    let mut rank = 0u64;
    let mut last = None;
    records
        .iter()
        .map(|r| {
            rank = if r.arrival_ms == last { rank + 1 } else { 0 };
            last = r.arrival_ms;
            r.arrival_ms
                .and_then(|ms| u64::try_from(ms).ok())
                .map_or(0, |ms| ms * 1000 + rank.min(999))
        })
        .collect()
}

/// Reads one record: a program, or a delete; `arrival` is the version it
/// takes when it names none. The error says why not.
pub fn parse(record: &Record, arrival: u64) -> Result<Change, String> {
    let value: serde_json::Value =
        serde_json::from_slice(&record.data).map_err(|e| format!("not a JSON object: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| "not a JSON object".to_owned())?;
    let version = |given: u64| if given != 0 { given } else { arrival };
    match obj.get("op") {
        None => {
            let mut program = Program::from_json(&value).map_err(|e| e.to_string())?;
            program.version = version(program.version);
            Ok(Change::Put(program))
        }
        Some(serde_json::Value::String(op)) if op == "customer" => {
            let mut fields = obj.clone();
            fields.remove("op");
            let mut customer = Customer::from_json(&fields.into())
                .map_err(|e| format!("a customer record: {e}"))?;
            customer.version = version(customer.version);
            Ok(Change::PutCustomer(customer))
        }
        Some(serde_json::Value::String(op)) if op == "delete" => {
            let mut fields = obj.clone();
            fields.remove("op");
            let d: DeleteRecord = serde_json::from_value(fields.into())
                .map_err(|e| format!("a delete record: {e}"))?;
            match (d.program_id, d.customer_id) {
                (Some(id), None) => Ok(Change::Delete {
                    program_id: ProgramId::parse(&id)
                        .map_err(|e| format!("field `programId`: {e}"))?,
                    version: version(d.version),
                }),
                (None, Some(id)) => Ok(Change::DeleteCustomer {
                    customer_id: customer_id_from_json(&id)
                        .map_err(|e| format!("a delete record: {e}"))?,
                    version: version(d.version),
                }),
                _ => Err("a delete record names either `programId` or `customerId`".into()),
            }
        }
        Some(other) => Err(format!(
            "field `op`: {other} is not \"delete\" or \"customer\" (a program record has no `op`)"
        )),
    }
}

/// What became of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Written(u64),
    /// Already there, or older than what the table holds.
    Stale(u64),
    Deleted(u64),
    DeadLettered,
}

/// The core-data handler: the store, where bad records go, and how long an
/// unavailable store is waited out.
pub struct CoreData {
    pub store: Programs,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub stream: String,
    pub dead_letter_table: String,
    /// Attempts per record while the table or Redis fails (0: until
    /// stopped, as the long-running reader does; Lambda gives up sooner and
    /// lets the mapping retry).
    pub max_attempts: u32,
}

impl CoreData {
    async fn apply(&self, record: &Record, arrival: u64) -> Result<Applied> {
        let change = match parse(record, arrival) {
            Ok(c) => c,
            Err(reason) => {
                self.dead_letter(record, &reason).await?;
                return Ok(Applied::DeadLettered);
            }
        };
        let store = &self.store;
        Ok(match change {
            Change::Put(program) => match store.put(&program).await? {
                WriteOutcome::Written(v) => Applied::Written(v),
                WriteOutcome::Stale(v) => Applied::Stale(v),
            },
            Change::Delete {
                program_id,
                version,
            } => match store.delete_at(&program_id, version).await? {
                DeleteOutcome::Deleted(v) | DeleteOutcome::Tombstoned(v) => Applied::Deleted(v),
                DeleteOutcome::AlreadyDeleted(v) | DeleteOutcome::Stale(v) => Applied::Stale(v),
            },
            Change::PutCustomer(customer) => match store.put_customer(&customer).await? {
                WriteOutcome::Written(v) => Applied::Written(v),
                WriteOutcome::Stale(v) => Applied::Stale(v),
            },
            Change::DeleteCustomer {
                customer_id,
                version,
            } => match store.delete_customer_at(customer_id, version).await? {
                DeleteOutcome::Deleted(v) | DeleteOutcome::Tombstoned(v) => Applied::Deleted(v),
                DeleteOutcome::AlreadyDeleted(v) | DeleteOutcome::Stale(v) => Applied::Stale(v),
            },
        })
    }

    async fn dead_letter(&self, record: &Record, reason: &str) -> Result<()> {
        let mut dead = DeadLetter::new(
            format!(
                "{}/{}/{}",
                self.stream, record.shard_id, record.sequence_number
            ),
            record,
            reason,
        );
        dead.stream = Some(&self.stream);
        self.dynamodb
            .put_item()
            .table_name(&self.dead_letter_table)
            .set_item(Some(dead.item()))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}", aws_sdk_dynamodb::error::DisplayErrorContext(&e)))?;
        tracing::warn!(
            shard = %record.shard_id,
            sequence = %record.sequence_number,
            reason,
            "core-data record dead-lettered"
        );
        Ok(())
    }
}

impl Handler for CoreData {
    async fn handle(&self, records: &[Record], stop: &CancellationToken) -> usize {
        let arrivals = arrival_versions(records);
        for (i, (record, arrival)) in records.iter().zip(arrivals).enumerate() {
            let mut attempt = 0;
            loop {
                match self.apply(record, arrival).await {
                    Ok(applied) => {
                        tracing::debug!(sequence = %record.sequence_number, ?applied, "core-data record applied");
                        let outcome = match applied {
                            Applied::Written(_) => "written",
                            Applied::Stale(_) => "stale",
                            Applied::Deleted(_) => "deleted",
                            Applied::DeadLettered => "dead_lettered",
                        };
                        metrics::counter!(RECORDS, "outcome" => outcome).increment(1);
                        break;
                    }
                    Err(e) => {
                        attempt += 1;
                        tracing::warn!(
                            sequence = %record.sequence_number,
                            attempt,
                            error = %format!("{e:#}"),
                            "applying a core-data record failed; retrying"
                        );
                        if self.max_attempts != 0 && attempt >= self.max_attempts {
                            metrics::counter!(RECORDS, "outcome" => "not_applied").increment(1);
                            return i;
                        }
                        if CALLS.sleep(attempt, stop).await.is_err() {
                            return i;
                        }
                    }
                }
            }
        }
        records.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(data: &str, arrival_ms: Option<i64>) -> Record {
        Record {
            shard_id: "shardId-000000000000".into(),
            sequence_number: "1".into(),
            data: bytes::Bytes::copy_from_slice(data.as_bytes()),
            arrival_ms,
        }
    }

    #[test]
    fn records_without_a_version_take_their_arrival_in_order() {
        let rs = [
            record("{}", Some(5)),
            record("{}", Some(5)),
            record("{}", Some(7)),
            record("{}", None),
        ];
        assert_eq!(arrival_versions(&rs), vec![5000, 5001, 7000, 0]);
    }

    #[test]
    fn parses_programs_and_deletes_and_names_what_is_wrong() {
        let p = record(
            r#"{"programId":"p1","programName":"n","checksum":"1","customerId":1,"customerName":"c"}"#,
            Some(1),
        );
        assert!(matches!(parse(&p, 1000), Ok(Change::Put(p)) if p.version == 1000));
        let versioned = record(
            r#"{"programId":"p1","programName":"n","checksum":"1","customerId":1,"customerName":"c","version":7}"#,
            Some(1),
        );
        assert!(matches!(parse(&versioned, 1000), Ok(Change::Put(p)) if p.version == 7));
        let del = record(r#"{"op":"delete","programId":"p1"}"#, Some(2));
        assert_eq!(
            parse(&del, 2000),
            Ok(Change::Delete {
                program_id: ProgramId::parse("p1").expect("id"),
                version: 2000
            })
        );
        let customer = record(
            r#"{"op":"customer","customerId":"9","enabled":false}"#,
            Some(3),
        );
        assert!(matches!(
            parse(&customer, 3000),
            Ok(Change::PutCustomer(c)) if c.customer_id == 9 && !c.enabled && c.version == 3000
        ));
        let del = record(r#"{"op":"delete","customerId":9,"version":4}"#, Some(3));
        assert_eq!(
            parse(&del, 3000),
            Ok(Change::DeleteCustomer {
                customer_id: 9,
                version: 4
            })
        );
        for (bad, says) in [
            (
                r#"{"op":"customer","customerId":1,"rateLimit":-5}"#,
                "rateLimit",
            ),
            (r#"{"op":"delete","customerId":"x"}"#, "customerId"),
            (
                r#"{"op":"delete","customerId":1,"programId":"p"}"#,
                "either",
            ),
            ("{", "not a JSON object"),
            ("[1]", "not a JSON object"),
            (r#"{"op":"flush"}"#, "field `op`"),
            (r#"{"op":"delete","programId":"a b"}"#, "programId"),
            (
                r#"{"op":"delete","programId":"p1","extra":1}"#,
                "unknown field",
            ),
            (r#"{"programId":"p1"}"#, "programName"),
        ] {
            let err = parse(&record(bad, Some(1)), 1).expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
