//! The tracker's configuration: every setting from one environment variable
//! (or its flag), typed and checked once at start.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::cors::CorsPolicy;

fn parse_cors(s: &str) -> Result<CorsPolicy, String> {
    CorsPolicy::parse(s)
}

/// A cookie domain: empty, or a host name (letters, digits, `-`, `.`).
fn parse_cookie_domain(s: &str) -> Result<String, String> {
    let ok = s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(s.to_owned())
    } else {
        Err("expected a host name such as example.com".into())
    }
}

/// A path prefix: empty, or `/` and up to 63 of `A-Z a-z 0-9 - . _ ~ /`,
/// not ending in `/`.
fn parse_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Ok(String::new());
    }
    let ok = s.starts_with('/')
        && !s.ends_with('/')
        && s.len() <= 64
        && !s.contains("//")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err("expected empty or a path such as /t or /a/b (letters, digits, - . _ ~), without a trailing /".into())
    }
}

/// adtrack tracker: validates each hit against the program cache, replies at
/// once and ships the event to Kinesis in the background.
///
/// Every option is read from the environment variable shown; AWS endpoints,
/// region and credentials come from the standard AWS SDK chain
/// (`AWS_ENDPOINT_URL_KINESIS` points it at a local stand-in).
#[derive(Parser, Debug, Clone)]
#[command(name = "tracker", version)]
pub struct Config {
    /// Public HTTP address.
    #[arg(
        long,
        env = "TRACKER_LISTEN_ADDR",
        value_name = "TRACKER_LISTEN_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub listen_addr: SocketAddr,

    /// Admin HTTP address (metrics, health, cache stats).
    #[arg(
        long,
        env = "TRACKER_ADMIN_ADDR",
        value_name = "TRACKER_ADMIN_ADDR",
        default_value = "0.0.0.0:9090"
    )]
    pub admin_addr: SocketAddr,

    /// Redis holding the program core data.
    #[arg(
        long,
        env = "REDIS_URL",
        value_name = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: String,

    /// Longest wait for one Redis call on a cache miss, in milliseconds.
    #[arg(long, env = "TRACKER_REDIS_TIMEOUT_MS", value_name = "TRACKER_REDIS_TIMEOUT_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub redis_timeout_ms: u64,

    /// Kinesis stream the events go to.
    #[arg(
        long,
        env = "EVENTS_STREAM",
        value_name = "EVENTS_STREAM",
        default_value = "adtrack-events"
    )]
    pub events_stream: String,

    /// Most programs held in the in-process cache.
    #[arg(long, env = "TRACKER_CACHE_CAPACITY", value_name = "TRACKER_CACHE_CAPACITY", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub cache_capacity: u64,

    /// How long a known program stays cached without a push, in seconds;
    /// 0: until a push or the reconcile (TRACKER_RECONCILE_SECS) changes or
    /// drops it, which keeps it current anyway, with no expiry timer per
    /// cached program (less memory and work per program).
    #[arg(long, env = "TRACKER_CACHE_TTL_SECS", value_name = "TRACKER_CACHE_TTL_SECS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub cache_ttl_secs: u64,

    /// How long an unknown program id stays cached as unknown, in seconds.
    #[arg(long, env = "TRACKER_NEGATIVE_TTL_SECS", value_name = "TRACKER_NEGATIVE_TTL_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub negative_ttl_secs: u64,

    /// Most events waiting in memory for Kinesis.
    #[arg(long, env = "TRACKER_QUEUE_EVENTS", value_name = "TRACKER_QUEUE_EVENTS", default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub queue_events: u64,

    /// Most bytes of events waiting in memory for Kinesis.
    #[arg(long, env = "TRACKER_QUEUE_BYTES", value_name = "TRACKER_QUEUE_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..=4 * 1024 * 1024 * 1024))]
    pub queue_bytes: u64,

    /// Longest an event waits before its PutRecords call leaves, in
    /// milliseconds (a call that fills about 1 MiB leaves at once; the reply
    /// never waits for this).
    #[arg(long, env = "TRACKER_BATCH_LINGER_MS", value_name = "TRACKER_BATCH_LINGER_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub batch_linger_ms: u64,

    /// Pack events into KPL aggregated records (many events per Kinesis record).
    #[arg(long, env = "TRACKER_AGGREGATION", value_name = "TRACKER_AGGREGATION", default_value_t = true, action = clap::ArgAction::Set)]
    pub aggregation: bool,

    /// Largest aggregated record, in bytes (the KPL's default; at most 1 MiB).
    #[arg(long, env = "TRACKER_MAX_AGGREGATE_BYTES", value_name = "TRACKER_MAX_AGGREGATE_BYTES", default_value_t = 51_200, value_parser = clap::value_parser!(u64).range(1024..=1_048_000))]
    pub max_aggregate_bytes: u64,

    /// Write budget per shard, records per second (Kinesis allows 1,000).
    #[arg(long, env = "TRACKER_SHARD_RECORDS_PER_SEC", value_name = "TRACKER_SHARD_RECORDS_PER_SEC", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub shard_records_per_sec: u32,

    /// Write budget per shard, bytes per second (Kinesis allows 1 MiB).
    #[arg(long, env = "TRACKER_SHARD_BYTES_PER_SEC", value_name = "TRACKER_SHARD_BYTES_PER_SEC", default_value_t = 1_048_576, value_parser = clap::value_parser!(u32).range(1024..=1_073_741_824))]
    pub shard_bytes_per_sec: u32,

    /// Directory of the disk spool (events waiting while Kinesis is
    /// unreachable or the memory queue is full); empty disables it.
    #[arg(
        long,
        env = "TRACKER_SPOOL_DIR",
        value_name = "TRACKER_SPOOL_DIR",
        default_value = "/tmp/adtrack-spool"
    )]
    pub spool_dir: String,

    /// Longest an event Kinesis refuses or cannot take yet stays only in
    /// memory, in milliseconds: then it is moved to the spool, and new events
    /// go to the spool before they are answered until Kinesis delivers
    /// again, so a crash while Kinesis throttles or fails loses at most about
    /// this much of the newest traffic. Must be longer than
    /// TRACKER_BATCH_LINGER_MS. Without a spool there is no age bound, only
    /// TRACKER_QUEUE_BYTES.
    #[arg(long, env = "TRACKER_MEMORY_MAX_AGE_MS", value_name = "TRACKER_MEMORY_MAX_AGE_MS", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub memory_max_age_ms: u64,

    /// Largest size of the spool on disk, in bytes.
    #[arg(long, env = "TRACKER_SPOOL_MAX_BYTES", value_name = "TRACKER_SPOOL_MAX_BYTES", default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(65_536..))]
    pub spool_max_bytes: u64,

    /// Size at which a spool segment file is closed and a new one started.
    #[arg(long, env = "TRACKER_SPOOL_SEGMENT_BYTES", value_name = "TRACKER_SPOOL_SEGMENT_BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(4096..))]
    pub spool_segment_bytes: u64,

    /// Most PutRecords calls in flight at once.
    #[arg(long, env = "TRACKER_MAX_INFLIGHT_BATCHES", value_name = "TRACKER_MAX_INFLIGHT_BATCHES", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub max_inflight_batches: u64,

    /// Time allowed after SIGTERM to finish requests (the first half of it)
    /// and flush events, in seconds.
    #[arg(long, env = "TRACKER_DRAIN_DEADLINE_SECS", value_name = "TRACKER_DRAIN_DEADLINE_SECS", default_value_t = 25, value_parser = clap::value_parser!(u64).range(0..=3_600))]
    pub drain_deadline_secs: u64,

    /// Most client connections open at once; more wait in the accept queue.
    #[arg(long, env = "TRACKER_MAX_CONNECTIONS", value_name = "TRACKER_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,

    /// Longest time a client may take to send its request headers once it
    /// has started a request (then 408), and a new connection to send its
    /// first request head (then it is closed), in seconds.
    #[arg(long, env = "TRACKER_HEADER_TIMEOUT_SECS", value_name = "TRACKER_HEADER_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub header_timeout_secs: u64,

    /// Longest time a client may take to send a request body, in seconds (then 408).
    #[arg(long, env = "TRACKER_BODY_TIMEOUT_SECS", value_name = "TRACKER_BODY_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub body_timeout_secs: u64,

    /// Longest time a response may wait for the client to read it, in
    /// seconds (then the connection is closed).
    #[arg(long, env = "TRACKER_WRITE_TIMEOUT_SECS", value_name = "TRACKER_WRITE_TIMEOUT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub write_timeout_secs: u64,

    /// How long a keep-alive connection may sit idle between requests, in
    /// seconds; keep it above the load balancer's (ALB: 60).
    #[arg(long, env = "TRACKER_IDLE_TIMEOUT_SECS", value_name = "TRACKER_IDLE_TIMEOUT_SECS", default_value_t = 75, value_parser = clap::value_parser!(u64).range(1..=3_600))]
    pub idle_timeout_secs: u64,

    /// Longest request line target (path and query), in bytes (then 414).
    #[arg(long, env = "TRACKER_MAX_URI_BYTES", value_name = "TRACKER_MAX_URI_BYTES", default_value_t = 8192, value_parser = clap::value_parser!(u64).range(64..=65_000))]
    pub max_uri_bytes: u64,

    /// Longest request head (request line and headers), in bytes (then 431).
    #[arg(long, env = "TRACKER_MAX_HEADER_BYTES", value_name = "TRACKER_MAX_HEADER_BYTES", default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(1024..=1_048_576))]
    pub max_header_bytes: u64,

    /// Largest request body, in bytes (then 413).
    #[arg(long, env = "TRACKER_MAX_BODY_BYTES", value_name = "TRACKER_MAX_BODY_BYTES", default_value_t = 262_144, value_parser = clap::value_parser!(u64).range(256..=16_777_216))]
    pub max_body_bytes: u64,

    /// Most events in one batch POST (then 413).
    #[arg(long, env = "TRACKER_MAX_BATCH_EVENTS", value_name = "TRACKER_MAX_BATCH_EVENTS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_batch_events: u64,

    /// Browser origins allowed to POST batches: empty (none), `*`, or a
    /// comma-separated list such as `https://shop.example.com`.
    #[arg(long, env = "TRACKER_CORS_ORIGINS", value_name = "TRACKER_CORS_ORIGINS", default_value = "", value_parser = parse_cors)]
    pub cors_origins: CorsPolicy,

    /// Another prefix the public routes are also served under (`/t` serves
    /// `/t/v1/pixel/{id}`, `/t/v1/tag.js`, ...), for paths ad blockers do
    /// not list; the unprefixed paths keep working. Health paths have none.
    #[arg(long, env = "TRACKER_PATH_PREFIX", value_name = "TRACKER_PATH_PREFIX", default_value = "", value_parser = parse_prefix)]
    pub path_prefix: String,

    /// What `DNT: 1` or `Sec-GPC: 1` does: `strip` (drop client IP, user
    /// agent and identifier parameters), `skip` (ship no event), `ignore`.
    #[arg(long, env = "TRACKER_PRIVACY_SIGNALS", value_name = "TRACKER_PRIVACY_SIGNALS", default_value = "strip", value_parser = ["strip", "skip", "ignore"])]
    pub privacy_signals: String,

    /// What the IAB TCF v2 / GPP consent strings on a hit do: `record` the
    /// consent state on the event, or `enforce` (also drop the identifiers
    /// where the GDPR applies and storage or measurement is not consented).
    #[arg(long, env = "TRACKER_CONSENT", value_name = "TRACKER_CONSENT", default_value = "record", value_parser = ["record", "enforce"])]
    pub consent: String,

    /// Keep a first-party id: read the browser's `adtrack_uid` cookie, set a
    /// random one when it has none, and put it on the events (never with a
    /// DNT or GPC signal, or without consent where consent applies).
    #[arg(long, env = "TRACKER_USER_COOKIE", value_name = "TRACKER_USER_COOKIE", default_value_t = false, action = clap::ArgAction::Set)]
    pub user_cookie: bool,

    /// The first-party cookie's `Domain` (empty: the tracker's host only).
    #[arg(
        long,
        env = "TRACKER_USER_COOKIE_DOMAIN",
        value_name = "TRACKER_USER_COOKIE_DOMAIN",
        default_value = "",
        value_parser = parse_cookie_domain
    )]
    pub user_cookie_domain: String,

    /// Days the first-party cookie lives (browsers cap it at 400).
    #[arg(long, env = "TRACKER_USER_COOKIE_DAYS", value_name = "TRACKER_USER_COOKIE_DAYS", default_value_t = 390, value_parser = clap::value_parser!(u32).range(1..=400))]
    pub user_cookie_days: u32,

    /// Events per second this tracker accepts for one customer (all its
    /// programs together) unless the customer's core-data record sets its
    /// own `rateLimit`; 0: no limit. Over it the pixel and click still
    /// answer (the event is dropped and counted, cause `rate_limited`) and
    /// the JSON routes answer 429 with `Retry-After`. Each tracker counts
    /// its own hits: a fleet of N tasks accepts up to N times this.
    #[arg(long, env = "TRACKER_CUSTOMER_RATE_LIMIT", value_name = "TRACKER_CUSTOMER_RATE_LIMIT", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub customer_rate_limit: u32,

    /// Events one customer may send at once after a quiet spell (the token
    /// bucket's size) unless its record sets `rateBurst`; 0: one second's
    /// worth at the rate.
    #[arg(long, env = "TRACKER_CUSTOMER_RATE_BURST", value_name = "TRACKER_CUSTOMER_RATE_BURST", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100_000_000))]
    pub customer_rate_burst: u32,

    /// Query or batch parameters that identify a person, dropped under `strip`.
    #[arg(
        long,
        env = "TRACKER_IDENTIFIER_PARAMS",
        value_name = "TRACKER_IDENTIFIER_PARAMS",
        default_value = "uid,user_id,userid,client_id,device_id,idfa,gaid,adid,email"
    )]
    pub identifier_params: String,

    /// Seconds between full reconciliations of the cache with Redis (pub/sub
    /// is at-most-once; this bounds how long a missed change can live).
    #[arg(long, env = "TRACKER_RECONCILE_SECS", value_name = "TRACKER_RECONCILE_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub reconcile_secs: u64,

    /// Number of trusted proxies in front of the tracker (e.g. 1 behind an
    /// ALB): the client IP is taken from `X-Forwarded-For` through that many
    /// hops; 0 uses the socket address.
    #[arg(long, env = "TRACKER_TRUSTED_PROXY_HOPS", value_name = "TRACKER_TRUSTED_PROXY_HOPS", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=10))]
    pub trusted_proxy_hops: u8,

    /// Keep full client IPs instead of truncating them (IPv4 /24, IPv6 /48).
    #[arg(long, env = "TRACKER_KEEP_FULL_IP", value_name = "TRACKER_KEEP_FULL_IP", default_value_t = false, action = clap::ArgAction::Set)]
    pub keep_full_ip: bool,

    /// Probe this host's tracker: exit 0 when its admin port answers
    /// `/health/ready` with 200 (for container health checks), else 1.
    #[arg(long)]
    pub healthcheck: bool,

    /// Log format: `json` (one object per line) or `text`.
    #[arg(long, env = "LOG_FORMAT", value_name = "LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    pub log_format: String,
}

impl Config {
    /// Checks the settings that bound each other; the one line to print.
    pub fn check(&self) -> Result<(), String> {
        if !self.spool_dir.is_empty() && self.spool_max_bytes < 2 * self.spool_segment_bytes {
            return Err(format!(
                "TRACKER_SPOOL_MAX_BYTES ({}) must be at least twice TRACKER_SPOOL_SEGMENT_BYTES ({}): a segment's bytes come back only once it is sealed and delivered",
                self.spool_max_bytes, self.spool_segment_bytes
            ));
        }
        if !self.spool_dir.is_empty() && self.memory_max_age_ms <= self.batch_linger_ms {
            return Err(format!(
                "TRACKER_MEMORY_MAX_AGE_MS ({}) must be longer than TRACKER_BATCH_LINGER_MS ({}): every event waits the linger in memory",
                self.memory_max_age_ms, self.batch_linger_ms
            ));
        }
        Ok(())
    }

    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }
    /// `None`: known programs do not expire.
    pub fn cache_ttl(&self) -> Option<Duration> {
        (self.cache_ttl_secs > 0).then(|| Duration::from_secs(self.cache_ttl_secs))
    }
    pub fn negative_ttl(&self) -> Duration {
        Duration::from_secs(self.negative_ttl_secs)
    }
    pub fn batch_linger(&self) -> Duration {
        Duration::from_millis(self.batch_linger_ms)
    }
    pub fn memory_max_age(&self) -> Duration {
        Duration::from_millis(self.memory_max_age_ms)
    }
    pub fn drain_deadline(&self) -> Duration {
        Duration::from_secs(self.drain_deadline_secs)
    }
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }
    pub fn body_timeout(&self) -> Duration {
        Duration::from_secs(self.body_timeout_secs)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    pub fn reconcile_every(&self) -> Duration {
        Duration::from_secs(self.reconcile_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Config::command().debug_assert();
    }

    #[test]
    fn bad_value_names_the_variable() {
        let err = Config::try_parse_from(["tracker", "--cache-capacity", "lots"]).expect_err("bad");
        assert!(err.to_string().contains("TRACKER_CACHE_CAPACITY"), "{err}");
    }
}
