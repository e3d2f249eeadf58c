//! How program core data lives in Redis and how changes are announced.
//!
//! # Keys
//!
//! - `adtrack:program:{programId}`: one hash per program. Fields are the
//!   operator JSON fields as strings (`programId`, `programName`, `checksum`,
//!   `customerId`, `customerName`, `valid` = `true`/`false`, optional
//!   `validFrom`/`validUntil` in RFC 3339, `allowedRedirectHosts` as a
//!   comma-separated list, and when set `postbackSecret`,
//!   `attributionWindowDays` and `clickIdParam`) plus `version`. A deleted program keeps a tombstone
//!   hash holding only `version` and `deleted` = `1`, so a late, older write
//!   cannot bring it back.
//! - `adtrack:program-version`: the highest version handed out, and the mark
//!   that Redis holds every program: it is gone after Redis lost its data
//!   (a failover to an empty replica, a FLUSHALL), and only the sync that
//!   restores every program from the programs table sets it again
//!   ([`COMPLETE_SCRIPT`]). A tracker is not ready while it is absent, and a
//!   running one keeps what it cached. Versions normally come from the
//!   programs table (the updater passes them explicitly); a write that asks
//!   Redis for one takes the largest of the counter plus one, the stored
//!   version plus one, and Redis's clock in microseconds, so versions only
//!   grow.
//!
//! Every write goes through [`UPSERT_SCRIPT`] or [`DELETE_SCRIPT`], which
//! refuse a version not newer than the stored one and PUBLISH the change in
//! the same atomic step.
//!
//! - `adtrack:customer:{customerId}`: one hash per customer record (see
//!   [`crate::customer`]): `customerId`, `enabled` = `true`/`false`, when
//!   set `rateLimit` and `rateBurst`, plus `version`; a deleted record
//!   leaves a tombstone as programs do. Customers share the version counter
//!   and its completeness mark: the sync restores customers before it marks
//!   Redis complete, so a switched-off customer is never switched on again
//!   by a Redis that lost its data.
//!
//! # Channel
//!
//! `adtrack:programs` carries one JSON [`CoreChange`] per change, for
//! programs and customers alike (one channel, so a subscriber sees them in
//! the order they were made):
//!
//! ```json
//! {"op":"upsert","version":7,"program":{"programId":"212312", ...}}
//! {"op":"delete","version":8,"programId":"212312"}
//! {"op":"upsert","version":9,"customer":{"customerId":9123,"enabled":false}}
//! {"op":"delete","version":10,"customerId":9123}
//! ```
//!
//! Pub/sub is at-most-once: a subscriber that reconnects must re-read the
//! hashes it holds (the tracker does).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::customer::Customer;
use crate::program::{FieldError, Program, ProgramId};

/// Prefix of the per-program hashes.
pub const PROGRAM_KEY_PREFIX: &str = "adtrack:program:";
/// The version counter.
pub const VERSION_KEY: &str = "adtrack:program-version";
/// The pub/sub channel for changes and deletions.
pub const CHANGES_CHANNEL: &str = "adtrack:programs";
/// `SCAN MATCH` pattern for all program hashes.
pub const PROGRAM_KEY_PATTERN: &str = "adtrack:program:*";

/// Prefix of the per-customer hashes.
pub const CUSTOMER_KEY_PREFIX: &str = "adtrack:customer:";
/// `SCAN MATCH` pattern for all customer hashes.
pub const CUSTOMER_KEY_PATTERN: &str = "adtrack:customer:*";

/// The Redis key of one program's hash.
pub fn program_key(id: &ProgramId) -> String {
    format!("{PROGRAM_KEY_PREFIX}{id}")
}

/// The Redis key of one customer's hash.
pub fn customer_key(customer_id: i32) -> String {
    format!("{CUSTOMER_KEY_PREFIX}{customer_id}")
}

/// The part of an upsert message that names what changed, without the
/// version: `"program":{...}` or `"customer":{...}` (`json` is the
/// record's JSON without its version).
pub fn upsert_body(kind: &str, json: &str) -> String {
    format!("\"{kind}\":{json}")
}

/// The part of a delete message that names what was deleted:
/// `"programId":"212312"` or `"customerId":9123`.
pub fn delete_body(key: &str, id_json: &str) -> String {
    format!("\"{key}\":{id_json}")
}

/// The Lua both write scripts start with: the version a write takes
/// (`requested`, or when 0 the largest of the counter plus one, Redis's
/// clock in microseconds and the stored version plus one) and the counter
/// rule (`KEYS[2]` raised to it; created only in mode `create`, so a write
/// into an emptied Redis does not mark it complete). Returns the version
/// as a number and as the decimal string stored.
macro_rules! take_version_lua {
    () => {
        r#"
local function take_version(requested, stored, mode)
  local counter = redis.call('GET', KEYS[2])
  local v = requested
  if v == 0 then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    v = math.max(tonumber(counter or '0') + 1, now, stored + 1)
  end
  local vs = string.format('%.0f', v)
  if (counter or mode == 'create') and tonumber(counter or '0') < v then redis.call('SET', KEYS[2], vs) end
  return v, vs
end
"#
    };
}

/// Upsert, atomically: `KEYS[1]` program (or customer) hash, `KEYS[2]`
/// version counter; `ARGV[1]` requested version (0: take the next one, see
/// the module docs), `ARGV[2]` channel, `ARGV[3]` the message's body
/// ([`upsert_body`]), `ARGV[4]`
/// counter mode (`create`: set the counter, creating it when absent;
/// `keep`: raise it only if it exists, so a write into an emptied Redis
/// does not mark it complete), `ARGV[5..]` field/value pairs. Returns
/// `{1, version}` when written and published, `{0, stored_version}` when
/// the stored version is not older (versions as decimal strings).
pub const UPSERT_SCRIPT: &str = concat!(
    take_version_lua!(),
    r#"
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local v, vs = take_version(tonumber(ARGV[1]), stored, ARGV[4])
if v <= stored then return {0, string.format('%.0f', stored)} end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', vs, unpack(ARGV, 5))
redis.call('PUBLISH', ARGV[2], '{"op":"upsert","version":' .. vs .. ',' .. ARGV[3] .. '}')
return {1, vs}
"#
);

/// Delete, atomically: `KEYS[1]` program (or customer) hash, `KEYS[2]`
/// version counter; `ARGV[1]` channel, `ARGV[2]` the message's body
/// ([`delete_body`]), `ARGV[3]`
/// requested version (0: take the next one), `ARGV[4]` counter mode (as for
/// [`UPSERT_SCRIPT`]). Leaves a versioned tombstone and publishes the
/// deletion, also for an id Redis does not hold (so a late write of an
/// older version cannot create it). Returns `{1, version, existed}`
/// (`existed` 1 when a program was there); `{0, version, 0}` when it was
/// already deleted at that version or later; `{0, version, 1}` when Redis
/// holds a newer version of the program than the one requested.
pub const DELETE_SCRIPT: &str = concat!(
    take_version_lua!(),
    r#"
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
local deleted = redis.call('HGET', KEYS[1], 'deleted') == '1'
local requested = tonumber(ARGV[3])
if deleted and requested <= stored then return {0, string.format('%.0f', stored), 0} end
if requested > 0 and requested <= stored then return {0, string.format('%.0f', stored), 1} end
local existed = 0
if not deleted then existed = redis.call('EXISTS', KEYS[1]) end
local v, vs = take_version(requested, stored, ARGV[4])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'version', vs, 'deleted', '1')
redis.call('PUBLISH', ARGV[1], '{"op":"delete","version":' .. vs .. ',' .. ARGV[2] .. '}')
return {1, vs, existed}
"#
);

/// Marks Redis complete (it holds every program of the table): `KEYS[1]`
/// version counter, `ARGV[1]` the table's highest version. Raises the
/// counter to at least that (creating it); returns the counter.
pub const COMPLETE_SCRIPT: &str = r#"
local c = tonumber(redis.call('GET', KEYS[1]) or '0')
local v = math.max(c, tonumber(ARGV[1]), 1)
local vs = string.format('%.0f', v)
redis.call('SET', KEYS[1], vs)
return vs
"#;

/// A change announced on [`CHANGES_CHANNEL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProgramChange {
    Upsert(Program),
    Delete { program_id: ProgramId, version: u64 },
}

/// A change of a customer record announced on [`CHANGES_CHANNEL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerChange {
    Upsert(Customer),
    Delete { customer_id: i32, version: u64 },
}

impl CustomerChange {
    pub fn customer_id(&self) -> i32 {
        match self {
            Self::Upsert(c) => c.customer_id,
            Self::Delete { customer_id, .. } => *customer_id,
        }
    }

    pub fn version(&self) -> u64 {
        match self {
            Self::Upsert(c) => c.version,
            Self::Delete { version, .. } => *version,
        }
    }
}

/// Any change announced on [`CHANGES_CHANNEL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreChange {
    Program(ProgramChange),
    Customer(CustomerChange),
}

#[derive(Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
enum WireChange {
    Upsert {
        version: u64,
        #[serde(default)]
        program: Option<Value>,
        #[serde(default)]
        customer: Option<Value>,
    },
    Delete {
        version: u64,
        #[serde(rename = "programId", default)]
        program_id: Option<String>,
        #[serde(rename = "customerId", default)]
        customer_id: Option<i32>,
    },
}

fn message_error(reason: impl Into<String>) -> FieldError {
    FieldError {
        field: "(message)".into(),
        reason: reason.into(),
    }
}

impl CoreChange {
    /// Parses a pub/sub message.
    pub fn parse(payload: &[u8]) -> Result<Self, FieldError> {
        let wire: WireChange =
            serde_json::from_slice(payload).map_err(|e| message_error(e.to_string()))?;
        match wire {
            WireChange::Upsert {
                version,
                program: Some(program),
                customer: None,
            } => {
                let mut p = Program::from_json(&program)?;
                p.version = version;
                Ok(Self::Program(ProgramChange::Upsert(p)))
            }
            WireChange::Upsert {
                version,
                program: None,
                customer: Some(customer),
            } => {
                let mut c = Customer::from_json(&customer)?;
                c.version = version;
                Ok(Self::Customer(CustomerChange::Upsert(c)))
            }
            WireChange::Delete {
                version,
                program_id: Some(program_id),
                customer_id: None,
            } => Ok(Self::Program(ProgramChange::Delete {
                program_id: ProgramId::parse(&program_id).map_err(|e| FieldError {
                    field: "programId".into(),
                    reason: e.to_string(),
                })?,
                version,
            })),
            WireChange::Delete {
                version,
                program_id: None,
                customer_id: Some(customer_id),
            } => Ok(Self::Customer(CustomerChange::Delete {
                customer_id,
                version,
            })),
            _ => Err(message_error(
                "a change names exactly one program or one customer",
            )),
        }
    }
}

impl ProgramChange {
    /// Parses a pub/sub message about a program (a customer's is an error).
    pub fn parse(payload: &[u8]) -> Result<Self, FieldError> {
        match CoreChange::parse(payload)? {
            CoreChange::Program(change) => Ok(change),
            CoreChange::Customer(_) => Err(message_error("a customer change, not a program's")),
        }
    }

    pub fn program_id(&self) -> &ProgramId {
        match self {
            Self::Upsert(p) => &p.program_id,
            Self::Delete { program_id, .. } => program_id,
        }
    }

    pub fn version(&self) -> u64 {
        match self {
            Self::Upsert(p) => p.version,
            Self::Delete { version, .. } => *version,
        }
    }
}

/// What a program hash read from Redis holds.
#[expect(
    clippy::large_enum_variant,
    reason = "one value per hash read, moved once: boxing would cost an allocation for nothing"
)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredProgram {
    /// No hash at all.
    Absent,
    /// A tombstone left by a delete.
    Deleted {
        version: u64,
    },
    Present(Program),
}

/// The fields of a program hash a reader asks for with `HMGET`, in the
/// order [`StoredProgram::from_hmget`] reads them.
pub const HASH_FIELDS: [&str; 14] = [
    "programId",
    "programName",
    "checksum",
    "customerId",
    "customerName",
    "valid",
    "validFrom",
    "validUntil",
    "allowedRedirectHosts",
    "version",
    "deleted",
    "postbackSecret",
    "attributionWindowDays",
    "clickIdParam",
];

/// What a customer hash read from Redis holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredCustomer {
    Absent,
    Deleted { version: u64 },
    Present(Customer),
}

impl StoredCustomer {
    /// Interprets the result of `HGETALL adtrack:customer:{id}`.
    pub fn from_hash(
        fields: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, FieldError> {
        if fields.is_empty() {
            return Ok(Self::Absent);
        }
        if fields.get("deleted").map(String::as_str) == Some("1") {
            let version = fields
                .get("version")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return Ok(Self::Deleted { version });
        }
        Customer::from_redis_fields(fields).map(Self::Present)
    }

    pub fn version(&self) -> u64 {
        match self {
            Self::Absent => 0,
            Self::Deleted { version } => *version,
            Self::Present(c) => c.version,
        }
    }
}

impl StoredProgram {
    /// Interprets the result of `HGETALL adtrack:program:{id}`.
    pub fn from_hash(
        fields: &std::collections::BTreeMap<String, String>,
    ) -> Result<Self, FieldError> {
        if fields.is_empty() {
            return Ok(Self::Absent);
        }
        Self::from_lookup(|f| fields.get(f).map(String::as_str))
    }

    /// Interprets the result of `HMGET adtrack:program:{id}` with
    /// [`HASH_FIELDS`]: one value (or nil) per field, in that order.
    pub fn from_hmget(values: &[Option<String>]) -> Result<Self, FieldError> {
        if values.iter().all(Option::is_none) {
            return Ok(Self::Absent);
        }
        Self::from_lookup(|f| {
            let i = HASH_FIELDS.iter().position(|h| *h == f)?;
            values.get(i)?.as_deref()
        })
    }

    fn from_lookup<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Self, FieldError> {
        if get("deleted") == Some("1") {
            let version = get("version").and_then(|v| v.parse().ok()).unwrap_or(0);
            return Ok(Self::Deleted { version });
        }
        Program::from_redis_with(get).map(Self::Present)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_messages_parse() {
        let up = br#"{"op":"upsert","version":7,"program":{"programId":"212312","programName":"p","checksum":"1","customerId":"9","customerName":"c","valid":false}}"#;
        let ProgramChange::Upsert(p) = ProgramChange::parse(up).expect("parses") else {
            panic!("not an upsert")
        };
        assert_eq!(p.version, 7);
        assert!(!p.valid);
        let del = br#"{"op":"delete","version":8,"programId":"212312"}"#;
        let change = ProgramChange::parse(del).expect("parses");
        assert_eq!(change.version(), 8);
        assert_eq!(change.program_id().as_str(), "212312");
        assert!(ProgramChange::parse(b"{\"op\":\"flush\"}").is_err());
    }

    #[test]
    fn customer_change_messages_parse() {
        let up = br#"{"op":"upsert","version":9,"customer":{"customerId":9123,"enabled":false}}"#;
        let Ok(CoreChange::Customer(CustomerChange::Upsert(c))) = CoreChange::parse(up) else {
            panic!("not a customer upsert")
        };
        assert_eq!((c.customer_id, c.enabled, c.version), (9123, false, 9));
        let del = br#"{"op":"delete","version":10,"customerId":9123}"#;
        assert_eq!(
            CoreChange::parse(del),
            Ok(CoreChange::Customer(CustomerChange::Delete {
                customer_id: 9123,
                version: 10
            }))
        );
        // Both, or neither, is refused; so is a customer change read as a program's.
        let both = br#"{"op":"delete","version":1,"customerId":1,"programId":"p"}"#;
        assert!(CoreChange::parse(both).is_err());
        assert!(CoreChange::parse(br#"{"op":"delete","version":1}"#).is_err());
        assert!(ProgramChange::parse(del).is_err());
    }

    #[test]
    fn scripts_publish_what_parses() {
        // The Lua concatenates these; the result must parse.
        let up = format!(
            "{{\"op\":\"upsert\",\"version\":5,{}}}",
            upsert_body("customer", r#"{"customerId":3,"enabled":true}"#)
        );
        assert!(matches!(
            CoreChange::parse(up.as_bytes()),
            Ok(CoreChange::Customer(CustomerChange::Upsert(_)))
        ));
        let del = format!(
            "{{\"op\":\"delete\",\"version\":5,{}}}",
            delete_body("programId", "\"p1\"")
        );
        assert!(matches!(
            CoreChange::parse(del.as_bytes()),
            Ok(CoreChange::Program(ProgramChange::Delete { .. }))
        ));
    }
}
