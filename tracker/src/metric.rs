//! Every metric the tracker emits, by name, in one place. Labels are
//! low-cardinality only: never a program id or a user agent.

use std::sync::OnceLock;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::PrometheusHandle;

/// Requests answered, labels `route`, `status`.
pub const REQUESTS: &str = "adtrack_http_requests_total";
/// Request handling time in seconds, label `route`.
pub const REQUEST_DURATION: &str = "adtrack_http_request_duration_seconds";
/// Connections open now.
pub const CONNECTIONS_OPEN: &str = "adtrack_http_connections_open";
/// Hits by validation outcome, label `outcome` (`valid`, `invalid`, `unknown`, `unverified`, `malformed`).
pub const HITS: &str = "adtrack_hits_total";
/// Events put on the Kinesis queue (accepted for delivery).
pub const EVENTS_ACCEPTED: &str = "adtrack_events_accepted_total";
/// Events dropped, label `cause`.
pub const EVENTS_DROPPED: &str = "adtrack_events_dropped_total";
/// Events written to the disk spool, label `cause`: `ingress` (written before
/// the answer: memory full, Kinesis behind, or older events spooled) or
/// `aged` (held in memory past TRACKER_MEMORY_MAX_AGE_MS, moved by the engine).
pub const EVENTS_SPOOLED: &str = "adtrack_events_spooled_total";
/// Events waiting in the spool.
pub const SPOOL_EVENTS: &str = "adtrack_spool_events";
/// Bytes of the spool on disk.
pub const SPOOL_BYTES: &str = "adtrack_spool_bytes";
/// Events packed into each Kinesis record.
pub const EVENTS_PER_RECORD: &str = "adtrack_kinesis_events_per_record";
/// Events waiting for Kinesis, and their bytes.
pub const QUEUE_EVENTS: &str = "adtrack_queue_events";
pub const QUEUE_BYTES: &str = "adtrack_queue_bytes";
/// Program cache lookups, label `result` (`hit`, `negative_hit`, `miss`).
pub const CACHE_LOOKUPS: &str = "adtrack_cache_lookups_total";
/// Programs held in the cache.
pub const CACHE_ENTRIES: &str = "adtrack_cache_entries";
/// Redis errors (timeouts included), label `op`.
pub const REDIS_ERRORS: &str = "adtrack_redis_errors_total";
/// Pub/sub reconnects.
pub const PUBSUB_RECONNECTS: &str = "adtrack_pubsub_reconnects_total";
/// Pub/sub changes, label `result` (`applied`, `stale`, `invalid`).
pub const PUBSUB_CHANGES: &str = "adtrack_pubsub_changes_total";
/// Programs loaded by warm-up and resync.
pub const PROGRAMS_LOADED: &str = "adtrack_programs_loaded_total";
/// Cached programs dropped by a reload because Redis no longer has them.
pub const PROGRAMS_VANISHED: &str = "adtrack_programs_vanished_total";
/// PutRecords calls, label `result` (`ok`, `partial`, `error`).
pub const KINESIS_CALLS: &str = "adtrack_kinesis_put_records_calls_total";
/// Kinesis records acknowledged.
pub const KINESIS_RECORDS: &str = "adtrack_kinesis_records_total";
/// Events delivered to Kinesis.
pub const EVENTS_DELIVERED: &str = "adtrack_events_delivered_total";
/// Entries resent after a failure, label `cause` (`throttled`, `internal`, `call_failed`).
pub const KINESIS_RETRIES: &str = "adtrack_kinesis_retries_total";
/// 1 while Kinesis is not keeping up (unreachable, or refusing every entry
/// of a few calls in a row): new events go to the spool before the answer.
pub const KINESIS_BEHIND: &str = "adtrack_kinesis_behind";
/// PutRecords call time in seconds.
pub const KINESIS_CALL_DURATION: &str = "adtrack_kinesis_put_records_duration_seconds";
/// Request bounds breached, label `bound` (`uri_bytes`, `header_bytes`,
/// `body_bytes`, `batch_events`, `header_timeout`, `silent_connection`, `write_timeout`,
/// `body_timeout`, `connections`, `malformed_request`).
pub const BOUNDS_BREACHED: &str = "adtrack_bounds_breached_total";
/// Click redirects refused because the host is not allowed.
pub const REDIRECTS_REFUSED: &str = "adtrack_redirects_refused_total";
/// Top-level fields of batch events other than the known ones, kept as
/// extra parameters.
pub const BATCH_EXTRA_FIELDS: &str = "adtrack_batch_extra_fields_total";
/// Postbacks refused for their signature, timestamp or program, by `reason`
/// (missing_signature, bad_signature, expired_timestamp, postbacks_disabled).
pub const POSTBACKS_REFUSED: &str = "adtrack_postbacks_refused_total";
/// Hits refused for their customer, by `reason`: `disabled` (the kill
/// switch) or `rate_limited`.
pub const CUSTOMER_REFUSALS: &str = "adtrack_customer_refusals_total";
/// Customer records loaded from Redis by warm-up and resync.
pub const CUSTOMERS_LOADED: &str = "adtrack_customers_loaded_total";
/// Programs evicted from the cache, label `cause` (`size`, `expired`, `replaced`, `explicit`).
pub const CACHE_EVICTIONS: &str = "adtrack_cache_evictions_total";
/// Full reconciliations of the cache with Redis, label `result` (`ok`,
/// `error`, `redis_lost_data`).
pub const RECONCILES: &str = "adtrack_cache_reconciles_total";
/// 1 when ready to take traffic.
pub const READY: &str = "adtrack_ready";

/// Latency buckets (seconds): microseconds matter here.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0,
];
const CALL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const PER_RECORD_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 150.0, 250.0, 500.0, 1000.0,
];

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn install() -> PrometheusHandle {
    adtrack_service::metrics_endpoint::install(&[
        (REQUEST_DURATION, LATENCY_BUCKETS),
        (KINESIS_CALL_DURATION, CALL_BUCKETS),
        (EVENTS_PER_RECORD, PER_RECORD_BUCKETS),
    ])
}

/// The route a request took, as the `route` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Pixel,
    Click,
    Event,
    Batch,
    Postback,
    Tag,
    Health,
    Unknown,
    /// Refused before routing (bounds).
    None,
}

const ROUTES: [&str; 9] = [
    "pixel", "click", "event", "batch", "postback", "tag", "health", "unknown", "none",
];

/// Statuses, as the `status` label names them.
const STATUSES: [&str; 17] = [
    "200", "202", "204", "302", "304", "400", "401", "403", "404", "405", "408", "413", "414",
    "429", "431", "503", "other",
];

/// Index of a status in [`STATUSES`].
fn status_index(status: http::StatusCode) -> usize {
    match status.as_u16() {
        200 => 0,
        202 => 1,
        204 => 2,
        302 => 3,
        304 => 4,
        400 => 5,
        401 => 6,
        403 => 7,
        404 => 8,
        405 => 9,
        408 => 10,
        413 => 11,
        414 => 12,
        429 => 13,
        431 => 14,
        503 => 15,
        _ => 16,
    }
}

/// How a hit was judged, as the `outcome` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Valid,
    Invalid,
    Unknown,
    Unverified,
    Malformed,
}

const OUTCOMES: [&str; 5] = ["valid", "invalid", "unknown", "unverified", "malformed"];

/// Causes of dropped events, as the `cause` label names them.
const DROP_CAUSES: [&str; 6] = [
    "queue_full",
    "spool_full",
    "spool_io",
    "shutting_down",
    "privacy_opt_out",
    "rate_limited",
];

/// Handles for what every request records, each registered on its first
/// use and reused after: no key building or registry lookup per request.
#[derive(Default)]
pub struct RequestMeters {
    requests: [[OnceLock<Counter>; STATUSES.len()]; ROUTES.len()],
    durations: [OnceLock<Histogram>; ROUTES.len()],
    hits: [OnceLock<Counter>; OUTCOMES.len()],
    dropped: [OnceLock<Counter>; DROP_CAUSES.len()],
    postbacks_refused: [OnceLock<Counter>; POSTBACK_REFUSALS.len()],
    batch_extra_fields: OnceLock<Counter>,
}

/// Why postbacks are refused, as the `reason` label names them.
const POSTBACK_REFUSALS: [&str; 4] = [
    "missing_signature",
    "bad_signature",
    "expired_timestamp",
    "postbacks_disabled",
];

impl RequestMeters {
    /// One answered request and how long it took.
    pub fn request(&self, route: Route, status: http::StatusCode, seconds: f64) {
        let r = route as usize;
        let s = status_index(status);
        self.requests[r][s]
            .get_or_init(
                || metrics::counter!(REQUESTS, "route" => ROUTES[r], "status" => STATUSES[s]),
            )
            .increment(1);
        self.durations[r]
            .get_or_init(|| metrics::histogram!(REQUEST_DURATION, "route" => ROUTES[r]))
            .record(seconds);
    }

    /// One hit with its validation outcome.
    pub fn hit(&self, outcome: Outcome) {
        let o = outcome as usize;
        self.hits[o]
            .get_or_init(|| metrics::counter!(HITS, "outcome" => OUTCOMES[o]))
            .increment(1);
    }

    /// A postback refused for its signature, timestamp or program
    /// (`reason`, one of [`POSTBACK_REFUSALS`]).
    pub fn postback_refused(&self, reason: &'static str) {
        let i = POSTBACK_REFUSALS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.postbacks_refused[i]
            .get_or_init(|| metrics::counter!(POSTBACKS_REFUSED, "reason" => POSTBACK_REFUSALS[i]))
            .increment(1);
    }

    /// Top-level fields of batch events kept as extra parameters.
    pub fn batch_extra_fields(&self, n: u64) {
        self.batch_extra_fields
            .get_or_init(|| metrics::counter!(BATCH_EXTRA_FIELDS))
            .increment(n);
    }

    /// Events dropped, with their cause.
    pub fn dropped(&self, cause: &'static str, n: u64) {
        match DROP_CAUSES.iter().position(|c| *c == cause) {
            Some(i) => self.dropped[i]
                .get_or_init(|| metrics::counter!(EVENTS_DROPPED, "cause" => DROP_CAUSES[i]))
                .increment(n),
            None => metrics::counter!(EVENTS_DROPPED, "cause" => cause).increment(n),
        }
    }
}
