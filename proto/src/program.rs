//! The program core-data model: what operators write, what Redis holds and
//! what the tracker validates hits against.
//!
//! Operators' JSON (the reference design's `data.json` loads unchanged):
//!
//! ```json
//! [{"programId":"212312","programName":"program1","checksum":"123",
//!   "customerId":"9123","customerName":"Customer1","valid":true}]
//! ```
//!
//! | field | type | required | meaning |
//! |---|---|---|---|
//! | `programId` | string or integer | yes | 1-64 chars of `A-Z a-z 0-9 . _ -` |
//! | `programName` | string | yes | shown in replies and events |
//! | `checksum` | string or integer | yes | carried into events |
//! | `customerId` | integer or string holding one | yes | a 32-bit signed integer |
//! | `customerName` | string | yes | |
//! | `valid` | bool | no (default `true`) | `false` disables the program |
//! | `validFrom`, `validUntil` | RFC 3339 | no | validity window, `[from, until)` |
//! | `allowedRedirectHosts` | array of host names | no | click redirects may go only there; `*.example.com` allows subdomains |
//! | `version` | positive integer | no | assigned by the updater when absent; an older version never overwrites a newer one |
//! | `postbackSecret` | string | no | the key of the advertiser's signed postbacks (16-256 visible ASCII characters); without it the program takes no postbacks. Never in a reply, event, log or metric |
//! | `attributionWindowDays` | integer 1-365 | no (default 30) | a conversion is attributed to a click at most this many days old |
//! | `clickIdParam` | string | no (default `adtrack_click_id`) | the query parameter click redirects add the click's event id as (1-64 of `A-Z a-z 0-9 . _ -`) |
//!
//! Unknown fields are rejected, so a typo (`"vaild": false`) is an error
//! rather than a silently active program.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Longest accepted program id, in bytes.
pub const MAX_PROGRAM_ID_LEN: usize = 64;
/// Longest accepted free-text field (names, checksum), in bytes.
pub const MAX_TEXT_LEN: usize = 512;
/// Most redirect hosts one program may allow.
pub const MAX_REDIRECT_HOSTS: usize = 64;
/// Attribution window of a program that names none, in days.
pub const DEFAULT_ATTRIBUTION_WINDOW_DAYS: u32 = 30;
/// Longest attribution window, in days.
pub const MAX_ATTRIBUTION_WINDOW_DAYS: u32 = 365;
/// The query parameter click redirects carry the click id in by default.
pub const DEFAULT_CLICK_ID_PARAM: &str = "adtrack_click_id";
/// Shortest and longest postback secret, in characters.
pub const POSTBACK_SECRET_LEN: std::ops::RangeInclusive<usize> = 16..=256;

/// The key a program's postbacks are signed with. Its `Debug` form is
/// masked, so a logged program never shows it; only [`Self::expose`]
/// (signature checks) and serialisation (the table, Redis and the
/// trackers' change messages, which must carry it) read it.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PostbackSecret(String);

impl PostbackSecret {
    /// Checks a secret: 16-256 visible ASCII characters.
    pub fn parse(s: &str) -> Result<Self, String> {
        if !POSTBACK_SECRET_LEN.contains(&s.len()) {
            return Err(format!(
                "must be {}-{} characters long",
                POSTBACK_SECRET_LEN.start(),
                POSTBACK_SECRET_LEN.end()
            ));
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be visible ASCII characters (no spaces)".into());
        }
        Ok(Self(s.to_owned()))
    }

    /// The key itself, for signing and checking signatures.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PostbackSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PostbackSecret(********)")
    }
}

/// Checks a click id parameter name: 1-64 of `A-Z a-z 0-9 . _ -`.
pub fn check_param_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} is not 1-64 of A-Z a-z 0-9 . _ -"))
    }
}

fn check_window(days: u32) -> Result<u32, String> {
    if (1..=MAX_ATTRIBUTION_WINDOW_DAYS).contains(&days) {
        Ok(days)
    } else {
        Err(format!("must be 1-{MAX_ATTRIBUTION_WINDOW_DAYS} days"))
    }
}

/// A validated program id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProgramId(String);

/// Why a program id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProgramIdError {
    #[error("program id is empty")]
    Empty,
    #[error("program id is longer than {MAX_PROGRAM_ID_LEN} bytes")]
    TooLong,
    #[error("program id may hold only letters, digits, '.', '_' and '-'")]
    BadChar,
}

impl ProgramId {
    /// Parses an id: 1-64 bytes of ASCII letters, digits, `.`, `_`, `-`.
    pub fn parse(s: &str) -> Result<Self, ProgramIdError> {
        if s.is_empty() {
            return Err(ProgramIdError::Empty);
        }
        if s.len() > MAX_PROGRAM_ID_LEN {
            return Err(ProgramIdError::TooLong);
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(ProgramIdError::BadChar);
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProgramId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for ProgramId {
    type Error = ProgramIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<ProgramId> for String {
    fn from(id: ProgramId) -> Self {
        id.0
    }
}

/// One program's core data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Program {
    pub program_id: ProgramId,
    pub program_name: String,
    pub checksum: String,
    pub customer_id: i32,
    pub customer_name: String,
    pub valid: bool,
    #[serde(skip_serializing_if = "Option::is_none", with = "rfc3339_opt")]
    pub valid_from: Option<OffsetDateTime>,
    #[serde(skip_serializing_if = "Option::is_none", with = "rfc3339_opt")]
    pub valid_until: Option<OffsetDateTime>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_redirect_hosts: Vec<String>,
    /// 0 until the updater assigns one.
    #[serde(skip_serializing_if = "is_zero")]
    pub version: u64,
    /// Postbacks are taken only when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postback_secret: Option<PostbackSecret>,
    #[serde(skip_serializing_if = "is_default_window")]
    pub attribution_window_days: u32,
    /// `None`: [`DEFAULT_CLICK_ID_PARAM`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub click_id_param: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_default_window(v: &u32) -> bool {
    *v == DEFAULT_ATTRIBUTION_WINDOW_DAYS
}

mod rfc3339_opt {
    use serde::Serializer;
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    pub fn serialize<S: Serializer>(v: &Option<OffsetDateTime>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(t) => {
                let text = t.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
                s.serialize_str(&text)
            }
            None => s.serialize_none(),
        }
    }
}

/// Whether a program with this `valid` flag and window accepts hits at `now`.
pub fn active_at(
    valid: bool,
    from: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> bool {
    valid && from.is_none_or(|from| now >= from) && until.is_none_or(|until| now < until)
}

/// Whether an allowed-redirect pattern (`host` or `*.suffix`) admits `host`
/// (already lower-cased).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => pattern == host,
    }
}

/// A field of a program record that is missing or wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FieldError {
    /// The path of the field (`customerId`, `allowedRedirectHosts[2]`);
    /// empty when the record as a whole is wrong (not an object, a required
    /// field missing).
    pub field: String,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "field `{}`: {}", self.field, self.reason)
        }
    }
}

impl FieldError {
    pub(crate) fn new(field: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    /// A record's deserialisation error, with the path of its field.
    pub(crate) fn from_path<E: std::error::Error>(e: serde_path_to_error::Error<E>) -> Self {
        let path = e.path().to_string();
        Self {
            field: if path == "." { String::new() } else { path },
            reason: e.into_inner().to_string(),
        }
    }
}

/// The operators' record as serde reads it: unknown fields refused, each
/// field checked as it is read (so an error carries the field's path); what
/// spans fields (the window's order) is checked in [`Program::from_record`].
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a program record (a JSON object)"
)]
struct ProgramRecord {
    #[serde(deserialize_with = "record::program_id")]
    program_id: ProgramId,
    #[serde(deserialize_with = "record::text")]
    program_name: String,
    #[serde(deserialize_with = "record::checksum")]
    checksum: String,
    #[serde(deserialize_with = "record::customer_id")]
    customer_id: i32,
    #[serde(deserialize_with = "record::text")]
    customer_name: String,
    #[serde(default)]
    valid: Option<bool>,
    #[serde(default, deserialize_with = "record::time")]
    valid_from: Option<OffsetDateTime>,
    #[serde(default, deserialize_with = "record::time")]
    valid_until: Option<OffsetDateTime>,
    #[serde(default, deserialize_with = "record::hosts")]
    allowed_redirect_hosts: Vec<String>,
    #[serde(default, deserialize_with = "record::version")]
    version: u64,
    #[serde(default, deserialize_with = "record::secret")]
    postback_secret: Option<PostbackSecret>,
    #[serde(default, deserialize_with = "record::window")]
    attribution_window_days: Option<u32>,
    #[serde(default, deserialize_with = "record::param_name")]
    click_id_param: Option<String>,
}

/// The field readers of [`ProgramRecord`].
pub(crate) mod record {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer};
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    use super::{
        MAX_REDIRECT_HOSTS, PostbackSecret, ProgramId, check_len, check_param_name, check_window,
        normalize_host_pattern,
    };

    /// Ids and checksums may be written as numbers (the reference data
    /// writes them as strings).
    #[derive(Deserialize)]
    #[serde(untagged, expecting = "a string or an integer")]
    enum StringOrInt {
        Text(String),
        Signed(i64),
        Unsigned(u64),
    }

    impl StringOrInt {
        fn into_text(self) -> String {
            match self {
                Self::Text(s) => s,
                Self::Signed(n) => n.to_string(),
                Self::Unsigned(n) => n.to_string(),
            }
        }
    }

    pub fn program_id<'de, D: Deserializer<'de>>(d: D) -> Result<ProgramId, D::Error> {
        ProgramId::parse(&StringOrInt::deserialize(d)?.into_text()).map_err(D::Error::custom)
    }

    pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let s = String::deserialize(d)?;
        check_len(&s).map_err(D::Error::custom)?;
        Ok(s)
    }

    pub fn checksum<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let s = StringOrInt::deserialize(d)?.into_text();
        check_len(&s).map_err(D::Error::custom)?;
        Ok(s)
    }

    #[derive(Deserialize)]
    #[serde(untagged, expecting = "an integer or a string holding one")]
    enum IntOrText {
        Int(i64),
        Text(String),
    }

    pub(crate) fn customer_id<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
        let raw = match IntOrText::deserialize(d)? {
            IntOrText::Int(n) => n,
            IntOrText::Text(s) => s
                .trim()
                .parse::<i64>()
                .map_err(|_| D::Error::custom(format_args!("expected an integer, got {s:?}")))?,
        };
        i32::try_from(raw).map_err(|_| D::Error::custom("out of the 32-bit integer range"))
    }

    pub fn time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OffsetDateTime>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| {
                OffsetDateTime::parse(&s, &Rfc3339).map_err(|e| {
                    D::Error::custom(format_args!("{s:?} is not an RFC 3339 time ({e})"))
                })
            })
            .transpose()
    }

    pub fn hosts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        let hosts = Option::<Vec<String>>::deserialize(d)?.unwrap_or_default();
        if hosts.len() > MAX_REDIRECT_HOSTS {
            return Err(D::Error::custom(format_args!(
                "at most {MAX_REDIRECT_HOSTS} hosts"
            )));
        }
        hosts
            .iter()
            .map(|h| normalize_host_pattern(h).map_err(D::Error::custom))
            .collect()
    }

    pub fn secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PostbackSecret>, D::Error> {
        // The error never repeats the value: it is a secret.
        Option::<String>::deserialize(d)?
            .map(|s| PostbackSecret::parse(&s).map_err(D::Error::custom))
            .transpose()
    }

    pub fn window<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        Option::<u32>::deserialize(d)?
            .map(|days| check_window(days).map_err(D::Error::custom))
            .transpose()
    }

    pub fn param_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| check_param_name(&s).map(|()| s).map_err(D::Error::custom))
            .transpose()
    }

    pub(crate) fn version<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Option::<u64>::deserialize(d)? {
            None => Ok(0),
            Some(v) if v > 0 && v < (1 << 53) => Ok(v),
            Some(_) => Err(D::Error::custom("expected a positive integer below 2^53")),
        }
    }
}

impl Program {
    /// Reads one operator record (a JSON object), naming the field on error.
    pub fn from_json(value: &Value) -> Result<Self, FieldError> {
        Self::from_record(serde_path_to_error::deserialize(value))
    }

    /// Reads one operator record from its JSON text, naming the field on
    /// error.
    pub fn from_json_slice(json: &[u8]) -> Result<Self, FieldError> {
        let mut d = serde_json::Deserializer::from_slice(json);
        let record = serde_path_to_error::deserialize(&mut d);
        let program = Self::from_record(record)?;
        d.end().map_err(|e| FieldError::new("", e.to_string()))?;
        Ok(program)
    }

    fn from_record<E: std::error::Error>(
        record: Result<ProgramRecord, serde_path_to_error::Error<E>>,
    ) -> Result<Self, FieldError> {
        let r = record.map_err(FieldError::from_path)?;
        if let (Some(from), Some(until)) = (r.valid_from, r.valid_until)
            && from >= until
        {
            return Err(FieldError::new(
                "validUntil",
                "must be later than validFrom",
            ));
        }
        Ok(Self {
            program_id: r.program_id,
            program_name: r.program_name,
            checksum: r.checksum,
            customer_id: r.customer_id,
            customer_name: r.customer_name,
            valid: r.valid.unwrap_or(true),
            valid_from: r.valid_from,
            valid_until: r.valid_until,
            allowed_redirect_hosts: r.allowed_redirect_hosts,
            version: r.version,
            postback_secret: r.postback_secret,
            attribution_window_days: r
                .attribution_window_days
                .unwrap_or(DEFAULT_ATTRIBUTION_WINDOW_DAYS),
            click_id_param: r.click_id_param,
        })
    }

    /// The operator JSON with the postback secret masked (what `updater
    /// get` shows).
    pub fn to_masked_json(&self) -> Value {
        let mut v = self.to_json();
        if let Some(secret) = v.get_mut("postbackSecret") {
            *secret = Value::String("********".into());
        }
        v
    }

    /// The query parameter click redirects carry the click id in.
    pub fn click_id_param(&self) -> &str {
        self.click_id_param
            .as_deref()
            .unwrap_or(DEFAULT_CLICK_ID_PARAM)
    }

    /// The operator JSON of this program (round-trips through [`Program::from_json`]).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// True when the program accepts hits at `now`: `valid` and inside its window.
    pub fn is_active_at(&self, now: OffsetDateTime) -> bool {
        active_at(self.valid, self.valid_from, self.valid_until, now)
    }

    /// True when a click may redirect to `host` (already lower-cased).
    pub fn allows_redirect_to(&self, host: &str) -> bool {
        self.allowed_redirect_hosts
            .iter()
            .any(|pattern| host_matches(pattern, host))
    }

    /// The Redis hash fields of this program (see [`crate::redis_layout`]).
    pub fn to_redis_fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("programId", self.program_id.to_string()),
            ("programName", self.program_name.clone()),
            ("checksum", self.checksum.clone()),
            ("customerId", self.customer_id.to_string()),
            ("customerName", self.customer_name.clone()),
            ("valid", self.valid.to_string()),
            (
                "allowedRedirectHosts",
                self.allowed_redirect_hosts.join(","),
            ),
        ];
        if let Some(t) = self.valid_from.and_then(|t| t.format(&Rfc3339).ok()) {
            f.push(("validFrom", t));
        }
        if let Some(t) = self.valid_until.and_then(|t| t.format(&Rfc3339).ok()) {
            f.push(("validUntil", t));
        }
        if let Some(secret) = &self.postback_secret {
            f.push(("postbackSecret", secret.expose().to_owned()));
        }
        if self.attribution_window_days != DEFAULT_ATTRIBUTION_WINDOW_DAYS {
            f.push((
                "attributionWindowDays",
                self.attribution_window_days.to_string(),
            ));
        }
        if let Some(param) = &self.click_id_param {
            f.push(("clickIdParam", param.clone()));
        }
        f
    }

    /// Reads a program back from its Redis hash fields (as written by
    /// [`Program::to_redis_fields`]), with the same checks as the JSON form
    /// but without building JSON. Fields this version does not know are
    /// ignored: a newer updater may write more.
    pub fn from_redis_fields(fields: &BTreeMap<String, String>) -> Result<Self, FieldError> {
        Self::from_redis_with(|field| fields.get(field).map(String::as_str))
    }

    /// [`Program::from_redis_fields`] over any lookup of the hash's fields
    /// (the tracker's warm start reads 100,000s of them positionally, from
    /// HMGET, without building a map per program).
    pub fn from_redis_with<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Self, FieldError> {
        let text = |field: &str| -> Result<String, FieldError> {
            let v = get(field).ok_or_else(|| FieldError::new(field, "is required"))?;
            check_len(v).map_err(|r| FieldError::new(field, r))?;
            Ok(v.to_owned())
        };
        let program_id = ProgramId::parse(get("programId").unwrap_or(""))
            .map_err(|e| FieldError::new("programId", e.to_string()))?;
        let customer_id = get("customerId")
            .ok_or_else(|| FieldError::new("customerId", "is required"))?
            .trim()
            .parse::<i32>()
            .map_err(|_| FieldError::new("customerId", "expected a 32-bit integer"))?;
        let time = |field: &str| -> Result<Option<OffsetDateTime>, FieldError> {
            get(field)
                .filter(|v| !v.is_empty())
                .map(|v| {
                    OffsetDateTime::parse(v, &Rfc3339)
                        .map_err(|e| FieldError::new(field, format!("not an RFC 3339 time ({e})")))
                })
                .transpose()
        };
        let mut allowed_redirect_hosts = Vec::new();
        for h in get("allowedRedirectHosts")
            .unwrap_or("")
            .split(',')
            .filter(|h| !h.is_empty())
        {
            allowed_redirect_hosts.push(
                normalize_host_pattern(h)
                    .map_err(|r| FieldError::new("allowedRedirectHosts", r))?,
            );
        }
        let version = match get("version") {
            None => 0,
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| FieldError::new("version", "not an integer"))?,
        };
        let postback_secret = get("postbackSecret")
            .map(|s| PostbackSecret::parse(s).map_err(|r| FieldError::new("postbackSecret", r)))
            .transpose()?;
        let attribution_window_days = match get("attributionWindowDays") {
            None => DEFAULT_ATTRIBUTION_WINDOW_DAYS,
            Some(v) => v
                .parse::<u32>()
                .map_err(|e| e.to_string())
                .and_then(check_window)
                .map_err(|r| FieldError::new("attributionWindowDays", r))?,
        };
        let click_id_param = get("clickIdParam")
            .map(|s| {
                check_param_name(s)
                    .map(|()| s.to_owned())
                    .map_err(|r| FieldError::new("clickIdParam", r))
            })
            .transpose()?;
        Ok(Self {
            program_id,
            program_name: text("programName")?,
            checksum: text("checksum")?,
            customer_id,
            customer_name: text("customerName")?,
            valid: get("valid") != Some("false"),
            valid_from: time("validFrom")?,
            valid_until: time("validUntil")?,
            allowed_redirect_hosts,
            version,
            postback_secret,
            attribution_window_days,
            click_id_param,
        })
    }
}

fn check_len(s: &str) -> Result<(), String> {
    if s.len() > MAX_TEXT_LEN {
        return Err(format!("longer than {MAX_TEXT_LEN} bytes"));
    }
    Ok(())
}

/// Lower-cases and checks a redirect host pattern: a host name, or `*.` and a
/// host name. No scheme, port, path or user info.
fn normalize_host_pattern(raw: &str) -> Result<String, String> {
    let host = raw.trim().to_ascii_lowercase();
    let bare = host.strip_prefix("*.").unwrap_or(&host);
    let ok = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(host)
    } else {
        Err(format!(
            "{raw:?} is not a host name (no scheme, port or path)"
        ))
    }
}

/// Parses operator input: a JSON array of records, or JSON lines (one record
/// per line, blank lines ignored). Every record is checked; the errors name
/// the record (1-based) and the field. Nothing is returned unless all pass.
pub fn parse_program_file(text: &str) -> Result<Vec<Program>, Vec<RecordError>> {
    let records: Vec<Result<Value, RecordError>> = if text.trim_start().starts_with('[') {
        match serde_json::from_str::<Vec<Value>>(text) {
            Ok(values) => values.into_iter().map(Ok).collect(),
            Err(e) => {
                return Err(vec![RecordError {
                    record: 0,
                    program_id: None,
                    reason: format!("not a JSON array of objects: {e}"),
                }]);
            }
        }
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str::<Value>(l).map_err(|e| RecordError {
                    record: i + 1,
                    program_id: None,
                    reason: format!("line {} is not JSON: {e}", i + 1),
                })
            })
            .collect()
    };
    let mut programs = Vec::with_capacity(records.len());
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, record) in records.into_iter().enumerate() {
        let value = match record {
            Ok(v) => v,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        let id_hint = value
            .get("programId")
            .map(|v| v.to_string().trim_matches('"').to_owned());
        match Program::from_json(&value) {
            Ok(p) => {
                if !seen.insert(p.program_id.clone()) {
                    errors.push(RecordError {
                        record: i + 1,
                        program_id: id_hint,
                        reason: "duplicate programId in the same input".into(),
                    });
                } else {
                    programs.push(p);
                }
            }
            Err(e) => errors.push(RecordError {
                record: i + 1,
                program_id: id_hint,
                reason: e.to_string(),
            }),
        }
    }
    if errors.is_empty() {
        Ok(programs)
    } else {
        Err(errors)
    }
}

/// One bad record in operator input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    /// 1-based record number (0: the input as a whole).
    pub record: usize,
    pub program_id: Option<String>,
    pub reason: String,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.program_id, self.record) {
            (_, 0) => write!(f, "{}", self.reason),
            (Some(id), n) => write!(f, "record {n} (programId {id}): {}", self.reason),
            (None, n) => write!(f, "record {n}: {}", self.reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const REFERENCE: &str = r#"[{"programId":"212312","programName":"program1","checksum":"123","customerId":"9123","customerName":"Customer1","valid":true},
        {"programId":"212313","programName":"program2","checksum":"124","customerId":9124,"customerName":"Customer2","valid":false}]"#;

    #[test]
    fn reference_file_loads_unchanged() {
        let programs = parse_program_file(REFERENCE).expect("loads");
        assert_eq!(programs.len(), 2);
        assert_eq!(programs[0].program_id.as_str(), "212312");
        assert_eq!(programs[0].customer_id, 9123);
        assert_eq!(programs[1].customer_id, 9124);
        assert!(!programs[1].valid);
    }

    #[test]
    fn json_lines_load() {
        let text = "{\"programId\":1,\"programName\":\"a\",\"checksum\":\"c\",\"customerId\":1,\"customerName\":\"n\"}\n\n{\"programId\":\"2\",\"programName\":\"b\",\"checksum\":7,\"customerId\":\"2\",\"customerName\":\"m\"}\n";
        let programs = parse_program_file(text).expect("loads");
        assert_eq!(programs.len(), 2);
        assert!(programs[0].valid, "valid defaults to true");
        assert_eq!(programs[1].checksum, "7");
    }

    #[test]
    fn errors_name_record_and_field() {
        let text = r#"[{"programId":"1","programName":"a","checksum":"c","customerId":"x1","customerName":"n"},
                      {"programId":"2","programName":"a","checksum":"c","customerId":1,"customerName":"n","vaild":false}]"#;
        let errors = parse_program_file(text).expect_err("bad");
        assert_eq!(errors.len(), 2);
        assert_eq!(
            errors[0].to_string(),
            "record 1 (programId 1): field `customerId`: expected an integer, got \"x1\""
        );
        assert!(
            errors[1]
                .to_string()
                .starts_with("record 2 (programId 2): field `vaild`: unknown field `vaild`"),
            "{}",
            errors[1]
        );
    }

    #[test]
    fn errors_carry_the_path_of_the_bad_field() {
        let base = json!({"programId":"p","programName":"a","checksum":"c","customerId":1,"customerName":"n"});
        let with = |field: &str, value: Value| {
            let mut v = base.clone();
            v[field] = value;
            Program::from_json(&v).expect_err(field)
        };
        let e = with("allowedRedirectHosts", json!(["a.example", 7]));
        assert_eq!(e.field, "allowedRedirectHosts[1]", "{e}");
        let e = with(
            "allowedRedirectHosts",
            json!(["a.example", "https://b.example/"]),
        );
        assert_eq!(e.field, "allowedRedirectHosts", "{e}");
        assert_eq!(with("valid", json!("yes")).field, "valid");
        assert_eq!(with("validFrom", json!("tomorrow")).field, "validFrom");
        assert_eq!(with("version", json!(0)).field, "version");
        assert_eq!(with("programName", json!(null)).field, "programName");
        assert_eq!(with("checksum", json!("x".repeat(513))).field, "checksum");
        let mut missing = base.clone();
        missing
            .as_object_mut()
            .expect("object")
            .remove("customerName");
        let e = Program::from_json(&missing).expect_err("missing");
        assert_eq!(e.to_string(), "missing field `customerName`");
        let e = Program::from_json(&json!("p")).expect_err("not an object");
        assert!(
            e.to_string().contains("a program record (a JSON object)"),
            "{e}"
        );
        let text = br#"{"programId":"p","programName":"a","checksum":"c","customerId":1,"customerName":"n"} x"#;
        assert!(Program::from_json_slice(text).is_err(), "trailing text");
        assert_eq!(
            Program::from_json_slice(&text[..text.len() - 2]).expect("parses"),
            Program::from_json(&base).expect("parses")
        );
    }

    #[test]
    fn bad_ids_and_windows_are_refused() {
        let base = json!({"programName":"a","checksum":"c","customerId":1,"customerName":"n"});
        let mut bad_id = base.clone();
        bad_id["programId"] = json!("has space");
        assert_eq!(
            Program::from_json(&bad_id).expect_err("bad").field,
            "programId"
        );
        let mut window = base.clone();
        window["programId"] = json!("p");
        window["validFrom"] = json!("2026-02-01T00:00:00Z");
        window["validUntil"] = json!("2026-01-01T00:00:00Z");
        assert_eq!(
            Program::from_json(&window).expect_err("bad").field,
            "validUntil"
        );
        let mut big = base;
        big["programId"] = json!("p");
        big["customerId"] = json!(1_i64 << 40);
        assert_eq!(
            Program::from_json(&big).expect_err("bad").field,
            "customerId"
        );
    }

    #[test]
    fn validity_window_and_redirects() {
        let p = Program::from_json(&json!({
            "programId":"p","programName":"a","checksum":"c","customerId":1,"customerName":"n",
            "validFrom":"2026-01-01T00:00:00Z","validUntil":"2026-02-01T00:00:00Z",
            "allowedRedirectHosts":["Shop.Example.com","*.ads.example"]
        }))
        .expect("ok");
        let jan = OffsetDateTime::parse("2026-01-15T00:00:00Z", &Rfc3339).expect("t");
        let mar = OffsetDateTime::parse("2026-03-01T00:00:00Z", &Rfc3339).expect("t");
        assert!(p.is_active_at(jan));
        assert!(!p.is_active_at(mar));
        assert!(p.allows_redirect_to("shop.example.com"));
        assert!(p.allows_redirect_to("x.ads.example"));
        assert!(!p.allows_redirect_to("ads.example"));
        assert!(!p.allows_redirect_to("evilads.example"));
        assert!(!p.allows_redirect_to("shop.example.com.evil"));
    }

    #[test]
    fn redis_fields_round_trip() {
        let mut p = parse_program_file(REFERENCE).expect("ok").remove(0);
        p.allowed_redirect_hosts = vec!["a.example".into(), "*.b.example".into()];
        p.valid_until = Some(OffsetDateTime::parse("2027-01-01T00:00:00Z", &Rfc3339).expect("t"));
        p.postback_secret = Some(PostbackSecret::parse("0123456789abcdef!").expect("secret"));
        p.attribution_window_days = 7;
        p.click_id_param = Some("clk".into());
        let mut fields: BTreeMap<String, String> = p
            .to_redis_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        fields.insert("version".into(), "42".into());
        let back = Program::from_redis_fields(&fields).expect("reads");
        assert_eq!(back.version, 42);
        p.version = 42;
        assert_eq!(back, p);
        assert_eq!(
            Program::from_json(&p.to_json()).expect("json round trip"),
            p
        );
    }

    #[test]
    fn conversion_settings_load_and_the_secret_stays_hidden() {
        let p = Program::from_json(&json!({
            "programId": "p", "programName": "n", "checksum": "c", "customerId": 1,
            "customerName": "c", "postbackSecret": "s3cret-s3cret-s3cret",
            "attributionWindowDays": 14, "clickIdParam": "clickref"
        }))
        .expect("loads");
        assert_eq!(p.attribution_window_days, 14);
        assert_eq!(p.click_id_param(), "clickref");
        assert_eq!(
            p.postback_secret.as_ref().map(PostbackSecret::expose),
            Some("s3cret-s3cret-s3cret")
        );
        assert!(
            !format!("{p:?}").contains("s3cret"),
            "Debug masks the secret"
        );
        let masked = p.to_masked_json().to_string();
        assert!(!masked.contains("s3cret") && masked.contains("********"));
        assert_eq!(
            Program::from_json(&p.to_json()).expect("round trip"),
            p,
            "the unmasked form carries the secret to the table and Redis"
        );
        // Defaults: 30 days, adtrack_click_id, no postbacks; left out of the JSON.
        let d = parse_program_file(REFERENCE).expect("ok").remove(0);
        assert_eq!(d.attribution_window_days, DEFAULT_ATTRIBUTION_WINDOW_DAYS);
        assert_eq!(d.click_id_param(), "adtrack_click_id");
        assert!(d.postback_secret.is_none());
        let j = d.to_json();
        assert!(j.get("attributionWindowDays").is_none() && j.get("clickIdParam").is_none());
        // Refusals name the field and never echo the secret.
        for (field, value, why) in [
            ("postbackSecret", json!("short-secret"), "16-256"),
            ("postbackSecret", json!("has spaces in it, long"), "visible"),
            ("attributionWindowDays", json!(0), "1-365"),
            ("attributionWindowDays", json!(366), "1-365"),
            ("clickIdParam", json!("a=b"), "A-Z"),
        ] {
            let mut rec = json!({"programId": "p", "programName": "n", "checksum": "c",
                "customerId": 1, "customerName": "c"});
            rec[field] = value.clone();
            let e = Program::from_json(&rec).expect_err(field);
            assert_eq!(e.field, field);
            assert!(e.reason.contains(why), "{e}");
            if field == "postbackSecret" {
                assert!(!e.to_string().contains(value.as_str().unwrap_or("?")));
            }
        }
    }
}
