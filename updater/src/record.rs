//! What the store keeps: program records and customer records, each with its
//! own table, Redis hashes and change messages, written by one versioned
//! machinery ([`crate::table::Table`], [`crate::RedisPrograms`]).

use std::fmt::{Debug, Display};
use std::hash::Hash;

use adtrack_proto::customer::Customer;
use adtrack_proto::program::{Program, ProgramId};
use adtrack_proto::redis_layout::{
    CUSTOMER_KEY_PATTERN, CUSTOMER_KEY_PREFIX, PROGRAM_KEY_PATTERN, PROGRAM_KEY_PREFIX,
    customer_key, delete_body, program_key, upsert_body,
};
use aws_sdk_dynamodb::types::AttributeValue;
use serde::Serialize;
use serde_json::Value;

/// A kind of core-data record.
pub trait Record: Clone + PartialEq + Debug + Serialize + Send + Sync + 'static {
    type Id: Clone + Ord + Hash + Display + Debug + Send + Sync + 'static;
    /// `program` or `customer`: the key of the record in upsert messages,
    /// and its name in errors.
    const KIND: &'static str;
    /// The table's partition key attribute, and the id's field in delete
    /// messages.
    const KEY: &'static str;
    /// Prefix and `SCAN` pattern of the Redis hashes.
    const REDIS_PREFIX: &'static str;
    const REDIS_PATTERN: &'static str;

    fn id(&self) -> &Self::Id;
    fn version(&self) -> u64;
    fn set_version(&mut self, version: u64);
    /// The id as the table's key attribute.
    fn key_value(id: &Self::Id) -> AttributeValue;
    /// The id from the table's key attribute, or from a Redis key's tail.
    fn id_from_attr(value: &AttributeValue) -> Option<Self::Id>;
    fn id_from_str(s: &str) -> Option<Self::Id>;
    /// The record from its operator JSON (the table's item read as JSON).
    fn from_json(value: &Value) -> Result<Self, String>;
    fn to_json(&self) -> Value;
    fn redis_key(id: &Self::Id) -> String;
    fn redis_fields(&self) -> Vec<(&'static str, String)>;
    /// The id as JSON, as delete messages carry it.
    fn id_json(id: &Self::Id) -> String;

    /// The body of this record's upsert message (its JSON without version).
    fn upsert_body(&self) -> String {
        let mut unversioned = self.clone();
        unversioned.set_version(0);
        upsert_body(Self::KIND, &unversioned.to_json().to_string())
    }

    /// The body of a delete message for `id`.
    fn delete_body(id: &Self::Id) -> String {
        delete_body(Self::KEY, &Self::id_json(id))
    }
}

impl Record for Program {
    type Id = ProgramId;
    const KIND: &'static str = "program";
    const KEY: &'static str = "programId";
    const REDIS_PREFIX: &'static str = PROGRAM_KEY_PREFIX;
    const REDIS_PATTERN: &'static str = PROGRAM_KEY_PATTERN;

    fn id(&self) -> &ProgramId {
        &self.program_id
    }
    fn version(&self) -> u64 {
        self.version
    }
    fn set_version(&mut self, version: u64) {
        self.version = version;
    }
    fn key_value(id: &ProgramId) -> AttributeValue {
        AttributeValue::S(id.to_string())
    }
    fn id_from_attr(value: &AttributeValue) -> Option<ProgramId> {
        ProgramId::parse(value.as_s().ok()?).ok()
    }
    fn id_from_str(s: &str) -> Option<ProgramId> {
        ProgramId::parse(s).ok()
    }
    fn from_json(value: &Value) -> Result<Self, String> {
        Program::from_json(value).map_err(|e| e.to_string())
    }
    fn to_json(&self) -> Value {
        Program::to_json(self)
    }
    fn redis_key(id: &ProgramId) -> String {
        program_key(id)
    }
    fn redis_fields(&self) -> Vec<(&'static str, String)> {
        self.to_redis_fields()
    }
    fn id_json(id: &ProgramId) -> String {
        Value::String(id.to_string()).to_string()
    }
}

impl Record for Customer {
    type Id = i32;
    const KIND: &'static str = "customer";
    const KEY: &'static str = "customerId";
    const REDIS_PREFIX: &'static str = CUSTOMER_KEY_PREFIX;
    const REDIS_PATTERN: &'static str = CUSTOMER_KEY_PATTERN;

    fn id(&self) -> &i32 {
        &self.customer_id
    }
    fn version(&self) -> u64 {
        self.version
    }
    fn set_version(&mut self, version: u64) {
        self.version = version;
    }
    fn key_value(id: &i32) -> AttributeValue {
        AttributeValue::N(id.to_string())
    }
    fn id_from_attr(value: &AttributeValue) -> Option<i32> {
        value.as_n().ok()?.parse().ok()
    }
    fn id_from_str(s: &str) -> Option<i32> {
        s.parse().ok()
    }
    fn from_json(value: &Value) -> Result<Self, String> {
        Customer::from_json(value).map_err(|e| e.to_string())
    }
    fn to_json(&self) -> Value {
        Customer::to_json(self)
    }
    fn redis_key(id: &i32) -> String {
        customer_key(*id)
    }
    fn redis_fields(&self) -> Vec<(&'static str, String)> {
        self.to_redis_fields()
    }
    fn id_json(id: &i32) -> String {
        id.to_string()
    }
}
