//! The customer core-data model: the settings that apply to every program
//! of one customer (the `customerId` of a program record).
//!
//! Operators' JSON:
//!
//! ```json
//! {"customerId": 9123, "enabled": false}
//! {"customerId": "9124", "rateLimit": 500, "rateBurst": 2000}
//! ```
//!
//! | field | type | required | meaning |
//! |---|---|---|---|
//! | `customerId` | integer or string holding one | yes | a 32-bit signed integer, as on programs |
//! | `enabled` | bool | no (default `true`) | `false` is the kill switch: every tracker stops accepting the customer's programs as soon as the change reaches it |
//! | `rateLimit` | integer 0-10,000,000 | no | events per second each tracker accepts for the customer; `0` is no limit; absent: the tracker's `TRACKER_CUSTOMER_RATE_LIMIT` |
//! | `rateBurst` | integer 1-100,000,000 | no (default: one second at `rateLimit`) | events accepted at once after a quiet spell |
//! | `version` | positive integer | no | assigned by the updater when absent; an older version never overwrites a newer one |
//!
//! A customer without a record takes the defaults: enabled, limited by the
//! tracker's configuration. Unknown fields are rejected.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::program::FieldError;
use crate::program::record;

/// Highest `rateLimit`, in events per second.
pub const MAX_RATE_LIMIT: u32 = 10_000_000;
/// Highest `rateBurst`, in events.
pub const MAX_RATE_BURST: u32 = 100_000_000;

/// One customer's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Customer {
    pub customer_id: i32,
    pub enabled: bool,
    /// `None`: the tracker's default; `Some(0)`: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
    /// `None`: one second at the rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_burst: Option<u32>,
    /// 0 until the updater assigns one.
    #[serde(skip_serializing_if = "is_zero")]
    pub version: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a customer record (a JSON object)"
)]
struct CustomerRecord {
    #[serde(deserialize_with = "record::customer_id")]
    customer_id: i32,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    rate_limit: Option<u32>,
    #[serde(default)]
    rate_burst: Option<u32>,
    #[serde(default, deserialize_with = "record::version")]
    version: u64,
}

fn check_rate(rate: Option<u32>, burst: Option<u32>) -> Result<(), FieldError> {
    if rate.is_some_and(|r| r > MAX_RATE_LIMIT) {
        return Err(FieldError::new(
            "rateLimit",
            format!("must be 0-{MAX_RATE_LIMIT} events per second"),
        ));
    }
    if burst.is_some_and(|b| b == 0 || b > MAX_RATE_BURST) {
        return Err(FieldError::new(
            "rateBurst",
            format!("must be 1-{MAX_RATE_BURST} events"),
        ));
    }
    Ok(())
}

impl Customer {
    /// The settings of a customer without a record.
    pub fn default_for(customer_id: i32) -> Self {
        Self {
            customer_id,
            enabled: true,
            rate_limit: None,
            rate_burst: None,
            version: 0,
        }
    }

    /// Reads one operator record (a JSON object), naming the field on error.
    pub fn from_json(value: &Value) -> Result<Self, FieldError> {
        let r: CustomerRecord =
            serde_path_to_error::deserialize(value).map_err(FieldError::from_path)?;
        check_rate(r.rate_limit, r.rate_burst)?;
        Ok(Self {
            customer_id: r.customer_id,
            enabled: r.enabled.unwrap_or(true),
            rate_limit: r.rate_limit,
            rate_burst: r.rate_burst,
            version: r.version,
        })
    }

    /// The operator JSON (round-trips through [`Customer::from_json`]).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The Redis hash fields (see [`crate::redis_layout`]).
    pub fn to_redis_fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("customerId", self.customer_id.to_string()),
            ("enabled", self.enabled.to_string()),
        ];
        if let Some(rate) = self.rate_limit {
            f.push(("rateLimit", rate.to_string()));
        }
        if let Some(burst) = self.rate_burst {
            f.push(("rateBurst", burst.to_string()));
        }
        f
    }

    /// Reads a customer back from its Redis hash fields, with the same
    /// checks as the JSON form. Fields this version does not know are
    /// ignored.
    pub fn from_redis_fields(fields: &BTreeMap<String, String>) -> Result<Self, FieldError> {
        let get = |f: &str| fields.get(f).map(String::as_str);
        let customer_id = get("customerId")
            .ok_or_else(|| FieldError::new("customerId", "is required"))?
            .parse::<i32>()
            .map_err(|_| FieldError::new("customerId", "expected a 32-bit integer"))?;
        let number = |field: &str| -> Result<Option<u32>, FieldError> {
            get(field)
                .map(|v| {
                    v.parse::<u32>()
                        .map_err(|_| FieldError::new(field, "not an integer"))
                })
                .transpose()
        };
        let rate_limit = number("rateLimit")?;
        let rate_burst = number("rateBurst")?;
        check_rate(rate_limit, rate_burst)?;
        let version = match get("version") {
            None => 0,
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| FieldError::new("version", "not an integer"))?,
        };
        Ok(Self {
            customer_id,
            enabled: get("enabled") != Some("false"),
            rate_limit,
            rate_burst,
            version,
        })
    }
}

/// Reads a customer id given as JSON (an integer or a string holding one),
/// as a delete record names it.
pub fn customer_id_from_json(value: &Value) -> Result<i32, FieldError> {
    record::customer_id(value).map_err(|e| FieldError::new("customerId", e.to_string()))
}

/// Parses a customer id given on a command line.
pub fn parse_customer_id(s: &str) -> Result<i32, FieldError> {
    s.trim()
        .parse::<i32>()
        .map_err(|_| FieldError::new("customerId", format!("{s:?} is not a 32-bit integer")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_read_and_round_trip() {
        let c =
            Customer::from_json(&json!({"customerId": "9123", "enabled": false})).expect("reads");
        assert_eq!(
            c,
            Customer {
                enabled: false,
                ..Customer::default_for(9123)
            }
        );
        let c = Customer::from_json(
            &json!({"customerId": 7, "rateLimit": 500, "rateBurst": 2000, "version": 3}),
        )
        .expect("reads");
        assert_eq!(Customer::from_json(&c.to_json()), Ok(c.clone()));
        let fields: BTreeMap<String, String> = c
            .to_redis_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .chain([("version".to_owned(), "3".to_owned())])
            .collect();
        assert_eq!(Customer::from_redis_fields(&fields), Ok(c));
    }

    #[test]
    fn bad_records_name_the_field() {
        let err = |v: Value| Customer::from_json(&v).expect_err("refused").field;
        assert_eq!(err(json!({"customerId": 1, "enabeld": false})), "enabeld");
        assert_eq!(err(json!({"customerId": 1, "rateLimit": -1})), "rateLimit");
        assert_eq!(
            err(json!({"customerId": 1, "rateLimit": 10_000_001})),
            "rateLimit"
        );
        assert_eq!(err(json!({"customerId": 1, "rateBurst": 0})), "rateBurst");
        assert_eq!(err(json!({"customerId": "x"})), "customerId");
        assert_eq!(err(json!({"enabled": true})), "");
    }
}
