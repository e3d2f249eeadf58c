//! Test support: starts the real local stack (a `redis-server`, the Kinesis
//! and DynamoDB protocol stand-ins from `dev/`) on free loopback ports, with
//! data in a temporary directory, and stops exactly those processes on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The events stream the stand-in creates.
pub const EVENTS_STREAM: &str = "adtrack-events";
/// The core-data stream the stand-in creates (one shard).
pub const CORE_DATA_STREAM: &str = "adtrack-core-data";
/// The events table the stand-in creates (see `dev/tables.json`).
pub const EVENTS_TABLE: &str = "adtrack-events";
/// The checkpoint table the stand-in creates.
pub const CHECKPOINT_TABLE: &str = "adtrack-checkpoints";
/// The dead-letter table the stand-in creates.
pub const DEAD_LETTER_TABLE: &str = "adtrack-dead-letters";
/// The programs table (core data's source of truth) the stand-in creates.
pub const PROGRAMS_TABLE: &str = "adtrack-programs";
/// The conversions table the stand-in creates.
pub const CONVERSIONS_TABLE: &str = "adtrack-conversions";
/// The customers table (customer records of core data) the stand-in creates.
pub const CUSTOMERS_TABLE: &str = "adtrack-customers";

/// The repository's `dev/` folder.
pub fn dev_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dev")
}

/// Path of a workspace binary: built into the same target directory as the
/// running test (`cargo test --workspace` builds them all), or taken from
/// `ADTRACK_TEST_BIN_DIR` when that is set (`dev/cross-arm64 --test` points
/// it at the arm64 builds).
pub fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os("ADTRACK_TEST_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().expect("current exe");
            exe.parent()
                .and_then(|deps| deps.parent())
                .expect("target dir")
                .to_owned()
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A command that runs the workspace binary at `path`: directly, or under
/// `ADTRACK_TEST_BIN_RUNNER` when that is set (`dev/cross-arm64 --test`
/// runs the arm64 builds under qemu-user this way).
pub fn command(path: &Path) -> Command {
    match std::env::var_os("ADTRACK_TEST_BIN_RUNNER") {
        Some(runner) => {
            let mut cmd = Command::new(runner);
            cmd.arg(path);
            cmd
        }
        None => Command::new(path),
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon).
///
/// Taken from 20000-31999, below the kernel's ephemeral range (32768 and
/// up on Linux), where `bind(0)` and every outgoing connection take their
/// ports: a port handed out here cannot be taken by a client socket of the
/// tests or of the processes they started before its user binds it. Each
/// port is handed out once per process (the walk starts at a place set by
/// the process id, so test binaries run one after another start apart).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}-{}", LOW + SPAN - 1)
}

/// A child process this test started; killed and reaped on drop.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
}

impl Proc {
    pub fn new(child: Child) -> Self {
        Self { child: Some(child) }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (by number) to the process, e.g. 15 for SIGTERM.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Waits for the process to exit by itself, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `redis-server` on a free port, keeping nothing on disk.
#[derive(Debug)]
pub struct Redis {
    pub port: u16,
    proc: Proc,
}

impl Redis {
    pub fn start() -> Result<Self> {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Result<Self> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn redis-server (is it installed? ./dev/test installs it)")?;
        let proc = Proc::new(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if redis_ping(port) {
                return Ok(Self { port, proc });
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {port} did not answer PING");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Kills the server (its data is gone: it keeps nothing on disk).
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Empties it (FLUSHALL), as a failover to an empty replica or a
    /// mistaken command would.
    pub fn flushall(&self) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"FLUSHALL\r\n").expect("send FLUSHALL");
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).expect("FLUSHALL answered");
        assert_eq!(&buf, b"+OK\r\n", "FLUSHALL refused");
    }

    /// Starts a fresh server on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        *self = Self::start_on(self.port)?;
        Ok(())
    }
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// Which AWS service a stand-in speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Kinesis,
    DynamoDb,
}

/// A Kinesis or DynamoDB protocol stand-in (`dev/standin.js`) persisting to a
/// directory, so it can be stopped and started again with its data.
#[derive(Debug)]
pub struct Standin {
    pub service: Service,
    pub port: u16,
    pub data_dir: PathBuf,
    shards: u32,
    proc: Proc,
}

impl Standin {
    pub fn start(service: Service, data_dir: &Path, shards: u32) -> Result<Self> {
        Self::start_on(service, data_dir, shards, 0)
    }

    fn start_on(service: Service, data_dir: &Path, shards: u32, port: u16) -> Result<Self> {
        let dev = dev_dir();
        if !dev.join("node_modules/kinesalite").exists() {
            bail!("dev/node_modules is missing: run `npm ci` in dev/ (./dev/test does)");
        }
        std::fs::create_dir_all(data_dir)?;
        let mut cmd = Command::new("node");
        cmd.arg(dev.join("standin.js"));
        match service {
            Service::Kinesis => {
                cmd.args(["kinesis", "--stream", EVENTS_STREAM, "--shards"])
                    .arg(shards.to_string())
                    .args(["--extra-stream", CORE_DATA_STREAM]);
            }
            Service::DynamoDb => {
                cmd.arg("dynamodb");
            }
        }
        cmd.arg("--port").arg(port.to_string());
        cmd.arg("--path").arg(data_dir);
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("spawn node dev/standin.js")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut proc = Proc::new(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                proc.kill();
                bail!("{service:?} stand-in did not become ready");
            }
        };
        let port: u16 = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| format!("unexpected stand-in output: {line}"))?;
        Ok(Self {
            service,
            port,
            data_dir: data_dir.to_owned(),
            shards,
            proc,
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Kills the stand-in; its data stays in `data_dir`.
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::start_on(self.service, &self.data_dir.clone(), self.shards, self.port) {
                Ok(s) => {
                    *self = s;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// The whole local stack for one test.
#[derive(Debug)]
pub struct Stack {
    pub redis: Redis,
    pub kinesis: Standin,
    pub dynamodb: Standin,
    pub dir: tempfile::TempDir,
}

impl Stack {
    /// Starts Redis and both stand-ins; the events stream gets `shards` shards.
    pub fn start(shards: u32) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let redis = Redis::start()?;
        let kinesis = Standin::start(Service::Kinesis, &dir.path().join("kinesis"), shards)?;
        let dynamodb = Standin::start(Service::DynamoDb, &dir.path().join("dynamodb"), shards)?;
        Ok(Self {
            redis,
            kinesis,
            dynamodb,
            dir,
        })
    }

    /// Environment for a process that talks to this stack through the
    /// standard AWS SDK chain.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("REDIS_URL", self.redis.url()),
            ("AWS_ENDPOINT_URL_KINESIS", self.kinesis.url()),
            ("AWS_ENDPOINT_URL_DYNAMODB", self.dynamodb.url()),
            ("AWS_ACCESS_KEY_ID", "local".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "local".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("EVENTS_STREAM", EVENTS_STREAM.to_owned()),
            ("EVENTS_TABLE", EVENTS_TABLE.to_owned()),
            ("CHECKPOINT_TABLE", CHECKPOINT_TABLE.to_owned()),
            ("DEAD_LETTER_TABLE", DEAD_LETTER_TABLE.to_owned()),
            ("PROGRAMS_TABLE", PROGRAMS_TABLE.to_owned()),
            ("CONVERSIONS_TABLE", CONVERSIONS_TABLE.to_owned()),
            ("CUSTOMERS_TABLE", CUSTOMERS_TABLE.to_owned()),
            ("CORE_DATA_STREAM", CORE_DATA_STREAM.to_owned()),
            // A spool of this stack's own: trackers of tests running side
            // by side must not share one.
            (
                "TRACKER_SPOOL_DIR",
                self.dir.path().join("spool").display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// Polls `f` every 50 ms until it is true; panics naming `what` after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A keep-alive HTTP/1.1 client for tests.
#[derive(Clone)]
pub struct Http {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
}

/// A response read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: bytes::Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    pub fn new() -> Self {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(64)
                .build_http();
        Self { client }
    }

    pub async fn request(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Reply> {
        let mut req = hyper::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
            body,
        )))?;
        let resp = self.client.request(req).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    pub async fn get(&self, url: &str) -> Result<Reply> {
        self.request("GET", url, &[], b"").await
    }
}

/// The value of one Prometheus sample (`name{labels}` exactly as rendered,
/// labels in the exporter's order), or 0 when absent.
pub fn metric_value(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Sum of every sample of a metric whose labels contain all of `labels`
/// (each `key="value"`).
pub fn metric_sum(exposition: &str, name: &str, labels: &[&str]) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (series, ""),
            };
            (n == name && labels.iter().all(|lab| rest.contains(lab)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// One record read back from the Kinesis stand-in.
#[derive(Debug, Clone)]
pub struct StreamRecord {
    pub shard_id: String,
    pub sequence_number: String,
    pub partition_key: String,
    pub data: Vec<u8>,
}

/// A Kinesis client for the stand-in at `url`.
pub fn kinesis_client(url: &str) -> aws_sdk_kinesis::Client {
    use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
    let conf = aws_sdk_kinesis::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(url)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("local", "local", None, None, "test"))
        .build();
    aws_sdk_kinesis::Client::from_conf(conf)
}

/// Every record in the events stream, shard by shard, in order.
pub async fn read_stream(url: &str) -> Result<Vec<StreamRecord>> {
    use aws_sdk_kinesis::types::ShardIteratorType;
    let client = kinesis_client(url);
    let shards = client
        .list_shards()
        .stream_name(EVENTS_STREAM)
        .send()
        .await?
        .shards
        .unwrap_or_default();
    let mut out = Vec::new();
    for shard in shards {
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(EVENTS_STREAM)
            .shard_id(shard.shard_id())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await?
            .shard_iterator;
        while let Some(it) = iterator {
            let page = client
                .get_records()
                .shard_iterator(it)
                .limit(10_000)
                .send()
                .await?;
            let empty = page.records.is_empty();
            out.extend(page.records.into_iter().map(|r| StreamRecord {
                shard_id: shard.shard_id().to_owned(),
                sequence_number: r.sequence_number().to_owned(),
                partition_key: r.partition_key.clone().unwrap_or_default(),
                data: r.data.into_inner(),
            }));
            if empty || page.millis_behind_latest == Some(0) && page.next_shard_iterator.is_none() {
                break;
            }
            iterator = page.next_shard_iterator;
        }
    }
    Ok(out)
}

/// Waits until the events stream at `url` is ACTIVE again (after a reshard).
pub async fn wait_stream_active(url: &str) {
    let client = kinesis_client(url);
    wait_until("stream active", Duration::from_secs(30), || async {
        client
            .describe_stream_summary()
            .stream_name(EVENTS_STREAM)
            .send()
            .await
            .ok()
            .and_then(|o| o.stream_description_summary)
            .is_some_and(|d| d.stream_status == aws_sdk_kinesis::types::StreamStatus::Active)
    })
    .await;
}

/// Splits the events stream's first shard in two halves of its hash range
/// (children `shardId-000000000001` and `-000000000002`), then waits until
/// the stream is ACTIVE again.
pub async fn split_first_shard(url: &str) {
    kinesis_client(url)
        .split_shard()
        .stream_name(EVENTS_STREAM)
        .shard_to_split("shardId-000000000000")
        .new_starting_hash_key((1u128 << 127).to_string())
        .send()
        .await
        .expect("split the first shard");
    wait_stream_active(url).await;
}

/// Merges the two children of [`split_first_shard`] into one shard with two
/// parents (`shardId-000000000003`), then waits until the stream is ACTIVE.
pub async fn merge_split_children(url: &str) {
    kinesis_client(url)
        .merge_shards()
        .stream_name(EVENTS_STREAM)
        .shard_to_merge("shardId-000000000001")
        .adjacent_shard_to_merge("shardId-000000000002")
        .send()
        .await
        .expect("merge the split's children");
    wait_stream_active(url).await;
}

/// One user record (event) read back from the stream, deaggregated.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    pub shard_id: String,
    pub sequence_number: String,
    /// Partition key of the Kinesis record that carried it.
    pub record_partition_key: String,
    /// The user record's partition key (for adtrack's aggregates, the
    /// Kinesis record's; the event id is inside the event).
    pub partition_key: String,
    /// Events in the Kinesis record that carried it (1 for a plain record).
    pub record_events: usize,
    pub data: Vec<u8>,
}

/// Every event in the events stream: aggregated records are split by the
/// KCL's rules, plain records are one event each.
pub async fn read_stream_events(url: &str) -> Result<Vec<StreamEvent>> {
    use adtrack_proto::kpl::{Deaggregated, deaggregate};
    let mut out = Vec::new();
    for r in read_stream(url).await? {
        match deaggregate(&r.data)? {
            Deaggregated::Plain => out.push(StreamEvent {
                shard_id: r.shard_id,
                sequence_number: r.sequence_number,
                record_partition_key: r.partition_key.clone(),
                partition_key: r.partition_key,
                record_events: 1,
                data: r.data,
            }),
            Deaggregated::Records(users) => {
                let n = users.len();
                for u in users {
                    out.push(StreamEvent {
                        shard_id: r.shard_id.clone(),
                        sequence_number: r.sequence_number.clone(),
                        record_partition_key: r.partition_key.clone(),
                        partition_key: u.partition_key,
                        record_events: n,
                        data: u.data.to_vec(),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// A DynamoDB client for the stand-in at `url`.
pub fn dynamodb_client(url: &str) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::from_conf(dynamodb_config(url).build())
}

/// A DynamoDB client for the stand-in at `url` that calls as the binary
/// `app` does (its AWS app name, `adtrack-consumer-lambda` ...): for a test
/// that runs a binary's code in process, so the stand-ins' call log
/// (`ADTRACK_AWS_CALL_LOG`, checked against the IAM roles by
/// `dev/check_iam.py`) counts those calls as that binary's.
pub fn dynamodb_client_as(url: &str, app: &str) -> aws_sdk_dynamodb::Client {
    let app = aws_sdk_dynamodb::config::AppName::new(app.to_owned()).expect("a valid app name");
    aws_sdk_dynamodb::Client::from_conf(dynamodb_config(url).app_name(app).build())
}

fn dynamodb_config(url: &str) -> aws_sdk_dynamodb::config::Builder {
    use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
    aws_sdk_dynamodb::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(url)
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("local", "local", None, None, "test"))
}

/// Every item of a table (consistent scan).
pub async fn scan_table(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
) -> Result<Vec<std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>>> {
    client
        .scan()
        .table_name(table)
        .consistent_read(true)
        .into_paginator()
        .items()
        .send()
        .collect::<Result<Vec<_>, _>>()
        .await
        .map_err(Into::into)
}

/// A string attribute of an item, or "".
pub fn attr_s(
    item: &std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>,
    name: &str,
) -> String {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default()
}

/// Rewrites an answer's body.
pub type Patch = Box<dyn FnOnce(Vec<u8>) -> Vec<u8> + Send>;

/// What an [`intercepting_proxy`] does with one request.
pub struct Intercept {
    /// The body to forward upstream; `None` answers without forwarding.
    pub forward: Option<Vec<u8>>,
    /// The body answered when nothing is forwarded, with `status`.
    pub answer: Vec<u8>,
    /// The status answered when nothing is forwarded (usually 200).
    pub status: u16,
    /// Rewrites the body of a 200 answer, forwarded or not.
    pub patch: Option<Patch>,
}

impl Intercept {
    /// Forward the request unchanged.
    pub fn pass(body: &[u8]) -> Self {
        Self {
            forward: Some(body.to_vec()),
            answer: Vec::new(),
            status: 200,
            patch: None,
        }
    }

    /// Answer this JSON (status 200) without forwarding.
    pub fn answer(json: &serde_json::Value) -> Self {
        Self {
            forward: None,
            answer: serde_json::to_vec(json).unwrap_or_default(),
            status: 200,
            patch: None,
        }
    }

    /// Answer an AWS JSON-protocol error without forwarding (status 400).
    pub fn error(code: &str, message: &str) -> Self {
        Self {
            forward: None,
            answer: serde_json::to_vec(&serde_json::json!({
                "__type": format!("com.amazon.coral.validate#{code}"),
                "message": message,
            }))
            .unwrap_or_default(),
            status: 400,
            patch: None,
        }
    }
}

/// An HTTP proxy on a free loopback port in front of an AWS stand-in. `f`
/// sees each request's `X-Amz-Target` and body and decides what is
/// forwarded and how the answer is rewritten. Returns the port.
pub async fn intercepting_proxy<F>(upstream: String, f: F) -> u16
where
    F: Fn(&str, &[u8]) -> Intercept + Send + Sync + 'static,
{
    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let f = std::sync::Arc::new(f);
    tokio::spawn(async move {
        let http = Http::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (http, upstream, f) = (http.clone(), upstream.clone(), f.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (http, upstream, f) = (http.clone(), upstream.clone(), f.clone());
                    async move {
                        let target = req
                            .headers()
                            .get("x-amz-target")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        let headers: Vec<(String, String)> = req
                            .headers()
                            .iter()
                            .filter(|(k, _)| *k != "host" && *k != "content-length")
                            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_owned())))
                            .collect();
                        let body = req.into_body().collect().await.expect("body").to_bytes();
                        let intercept = f(&target, &body);
                        let hs: Vec<(&str, &str)> = headers
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect();
                        let content_type = headers
                            .iter()
                            .find(|(k, _)| k == "content-type")
                            .map(|(_, v)| v.clone())
                            .unwrap_or_else(|| "application/json".into());
                        let (status, mut resp_body) = match intercept.forward {
                            Some(b) => {
                                let r = http
                                    .request("POST", &upstream, &hs, &b)
                                    .await
                                    .expect("upstream");
                                (r.status, r.body.to_vec())
                            }
                            None => (intercept.status, intercept.answer),
                        };
                        if status == 200
                            && let Some(patch) = intercept.patch
                        {
                            resp_body = patch(resp_body);
                        }
                        let mut resp =
                            hyper::Response::new(Full::new(bytes::Bytes::from(resp_body)));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
                        resp.headers_mut()
                            .insert("content-type", content_type.parse().expect("content type"));
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    port
}

/// A TCP proxy on a free loopback port in front of `upstream` (Redis, for
/// the tracker's tests), with the faults a test must control exactly: cut
/// every connection and refuse new ones, and hold back the replies of one
/// connection (numbered in the order they were accepted, from 0).
pub struct TcpProxy {
    pub port: u16,
    state: std::sync::Arc<ProxyState>,
}

struct ProxyState {
    /// False while cut: new connections are closed at once.
    open: std::sync::atomic::AtomicBool,
    /// Bumped by every cut; connections of an older generation end.
    generation: tokio::sync::watch::Sender<u64>,
    /// The connection whose replies are held back, if any.
    held: tokio::sync::watch::Sender<Option<usize>>,
    /// Bytes held back so far.
    held_bytes: std::sync::atomic::AtomicU64,
    accepted: std::sync::atomic::AtomicUsize,
}

impl TcpProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = std::sync::Arc::new(ProxyState {
            open: std::sync::atomic::AtomicBool::new(true),
            generation: tokio::sync::watch::channel(0).0,
            held: tokio::sync::watch::channel(None).0,
            held_bytes: std::sync::atomic::AtomicU64::new(0),
            accepted: std::sync::atomic::AtomicUsize::new(0),
        });
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if !st.open.load(SeqCst) {
                    drop(client);
                    continue;
                }
                let n = st.accepted.fetch_add(1, SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let mut cut = st.generation.subscribe();
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::io::copy(&mut cr, &mut sw);
                    let down = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let read = sr.read(&mut buf).await?;
                            if read == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            let mut held = st.held.subscribe();
                            if *held.borrow() == Some(n) {
                                st.held_bytes.fetch_add(read as u64, SeqCst);
                            }
                            let _ = held.wait_for(|h| *h != Some(n)).await;
                            cw.write_all(&buf[..read]).await?;
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { port, state }
    }

    /// The proxy's address as a Redis URL.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Closes every connection and refuses new ones until [`Self::restore`].
    pub fn cut(&self) {
        self.state
            .open
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.state.generation.send_modify(|g| *g += 1);
    }

    pub fn restore(&self) {
        self.state
            .open
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Holds back what the upstream sends on connection `n` until
    /// [`Self::release`].
    pub fn hold_replies(&self, n: usize) {
        self.state.held.send_replace(Some(n));
    }

    pub fn release(&self) {
        self.state.held.send_replace(None);
    }

    /// Bytes held back so far (replies that arrived while holding).
    pub fn held_bytes(&self) -> u64 {
        self.state
            .held_bytes
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.state
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A Kinesis event as Lambda's event source mapping delivers it: one
/// record per `(sequence number, data)`, all from the first shard of
/// `stream`, arrived now (a retried batch is the same event again).
/// Read into the caller's event type (the Lambdas take the reader's
/// `KinesisBatch`).
pub fn lambda_kinesis_event<T: serde::de::DeserializeOwned>(
    stream: &str,
    records: &[(&str, &[u8])],
) -> T {
    serde_json::from_value(lambda_kinesis_event_json(stream, records)).expect("a Kinesis event")
}

/// [`lambda_kinesis_event`] as the JSON document Lambda hands the function.
pub fn lambda_kinesis_event_json(stream: &str, records: &[(&str, &[u8])]) -> serde_json::Value {
    use base64::Engine as _;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    let arrival = (now.as_millis() as f64) / 1000.0;
    let records: Vec<serde_json::Value> = records
        .iter()
        .map(|(seq, data)| {
            serde_json::json!({
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": "pk",
                    "sequenceNumber": seq,
                    "data": base64::engine::general_purpose::STANDARD.encode(data),
                    "approximateArrivalTimestamp": arrival
                },
                "eventSource": "aws:kinesis",
                "eventVersion": "1.0",
                "eventID": format!("shardId-000000000000:{seq}"),
                "eventName": "aws:kinesis:record",
                "invokeIdentityArn": "arn:aws:iam::123456789012:role/adtrack",
                "awsRegion": "us-east-1",
                "eventSourceARN": format!("arn:aws:kinesis:us-east-1:123456789012:stream/{stream}")
            })
        })
        .collect();
    serde_json::json!({ "Records": records })
}

/// A Lambda function run as Lambda runs it: the function's real binary
/// (`bootstrap`) polling a Lambda Runtime API emulator (cargo-lambda's,
/// `cargo lambda watch --only-lambda-apis`) for invocations, with the
/// answers taken off the emulator's invoke endpoint, on the wire.
pub struct LambdaRuntime {
    port: u16,
    stdout: PathBuf,
    function: Proc,
    _emulator: Proc,
    _dir: tempfile::TempDir,
}

impl LambdaRuntime {
    /// The emulator: `ADTRACK_CARGO_LAMBDA`, else `cargo-lambda` on the PATH
    /// (`./dev/test` installs it from `dev/requirements-test.txt`).
    fn emulator_command() -> Result<Command> {
        let program =
            std::env::var("ADTRACK_CARGO_LAMBDA").unwrap_or_else(|_| "cargo-lambda".into());
        let found = Command::new(&program)
            .args(["lambda", "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!(
                "{program} is missing: ./dev/test installs cargo-lambda (dev/requirements-test.txt) and sets ADTRACK_CARGO_LAMBDA"
            );
        }
        Ok(Command::new(program))
    }

    /// Starts the emulator on a free port, then `binary` as the function,
    /// with `env` on top of what the runtime sets.
    pub fn start(binary: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let emulator_log = std::fs::File::create(dir.path().join("emulator.log"))?;
        let emulator = Proc::new(
            Self::emulator_command()?
                .args(["lambda", "watch", "--only-lambda-apis", "--ignore-changes"])
                .args(["-A", "127.0.0.1", "-P", &port.to_string()])
                // It reads the workspace's metadata, though it builds nothing.
                .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
                .stdin(Stdio::null())
                .stdout(emulator_log.try_clone()?)
                .stderr(emulator_log)
                .spawn()
                .context("starting cargo-lambda")?,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(dir.path().join("emulator.log")).unwrap_or_default();
                bail!("the Lambda runtime emulator did not listen on {port}: {log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let stdout = dir.path().join("function.out");
        let out = std::fs::File::create(&stdout)?;
        let mut cmd = command(binary);
        cmd.env(
            "AWS_LAMBDA_RUNTIME_API",
            format!("http://127.0.0.1:{port}/.rt"),
        )
        // The emulator's one function when it starts none itself.
        .env("AWS_LAMBDA_FUNCTION_NAME", "_")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "local")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .env("LOG_FORMAT", "json");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let function = Proc::new(
            cmd.stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?,
        );
        Ok(Self {
            port,
            stdout,
            function,
            _emulator: emulator,
            _dir: dir,
        })
    }

    /// Invokes the function with `event` and waits for its answer: the
    /// HTTP status of the invoke call and the function's response document.
    pub async fn invoke(&self, event: &serde_json::Value) -> Result<(u16, serde_json::Value)> {
        let url = format!(
            "http://127.0.0.1:{}/2015-03-31/functions/_/invocations",
            self.port
        );
        let body = serde_json::to_vec(event)?;
        let reply = tokio::time::timeout(
            Duration::from_secs(120),
            Http::new().request("POST", &url, &[("content-type", "application/json")], &body),
        )
        .await
        .context("the invocation did not end within 120 s")??;
        let doc = serde_json::from_slice(&reply.body)
            .with_context(|| format!("the invocation answered {}", reply.text()))?;
        Ok((reply.status, doc))
    }

    /// What the function wrote to stdout and stderr so far (its log lines
    /// and embedded-metric-format documents).
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// The function's process id.
    pub fn pid(&self) -> u32 {
        self.function.pid()
    }

    /// The embedded-metric-format documents in [`Self::output`], in order.
    pub fn emf_documents(&self) -> Vec<serde_json::Value> {
        emf_documents(&self.output())
    }
}

/// The embedded-metric-format documents (JSON lines with `_aws`) in a
/// Lambda's output.
fn emf_documents(output: &str) -> Vec<serde_json::Value> {
    output
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|d| d.get("_aws").is_some())
        .collect()
}

/// With `ADTRACK_METRICS_LOG` set, appends each metric of a Prometheus
/// exposition that `binary` served, as `binary<TAB>name<TAB>label,names`,
/// to that file: `dev/check_metrics.py` checks the alarms and the
/// dashboard against what the binaries really expose.
pub fn log_metric_names(binary: &str, exposition: &str) {
    let mut lines = String::new();
    for line in exposition.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        let mut labels = Vec::new();
        if let Some(rest) = line[name_end..].strip_prefix('{') {
            let body = rest.rsplit_once('}').map_or(rest, |(b, _)| b);
            let mut in_value = false;
            let mut escaped = false;
            let mut key = String::new();
            for ch in body.chars() {
                if in_value {
                    match (escaped, ch) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => in_value = false,
                        _ => {}
                    }
                } else if ch == '"' {
                    in_value = true;
                    labels.push(std::mem::take(&mut key));
                } else if ch != '=' && ch != ',' {
                    key.push(ch);
                }
            }
        }
        labels.sort();
        lines.push_str(&format!("{binary}\t{name}\t{}\n", labels.join(",")));
    }
    append_metrics_log(&lines);
}

/// [`log_metric_names`] of what `binary` serves at `admin`
/// (`http://127.0.0.1:PORT`) `/metrics` now; blocking, for `Drop`.
pub fn log_exposed_metrics(binary: &str, admin: &str) {
    if std::env::var_os("ADTRACK_METRICS_LOG").is_none() {
        return;
    }
    let Some(addr) = admin.strip_prefix("http://") else {
        return;
    };
    let Ok(mut conn) = TcpStream::connect(addr) else {
        return;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    if conn
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .is_err()
    {
        return;
    }
    let mut reply = String::new();
    let _ = conn.read_to_string(&mut reply);
    if let Some((head, body)) = reply.split_once("\r\n\r\n")
        && head.split(' ').nth(1) == Some("200")
    {
        log_metric_names(binary, body);
    }
}

/// Each embedded-metric-format document in a Lambda's output, logged as
/// [`log_metric_names`] does: the function as the binary, the dimensions
/// besides `Function` as the labels.
fn log_emf_names(output: &str) {
    let mut lines = String::new();
    for doc in emf_documents(output) {
        let Some(function) = doc["Function"].as_str() else {
            continue;
        };
        for directive in doc["_aws"]["CloudWatchMetrics"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let mut labels: Vec<&str> = directive["Dimensions"][0]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d.as_str())
                .filter(|d| *d != "Function")
                .collect();
            labels.sort_unstable();
            for metric in directive["Metrics"].as_array().into_iter().flatten() {
                if let Some(name) = metric["Name"].as_str() {
                    lines.push_str(&format!("{function}\t{name}\t{}\n", labels.join(",")));
                }
            }
        }
    }
    append_metrics_log(&lines);
}

fn append_metrics_log(lines: &str) {
    let Some(path) = std::env::var_os("ADTRACK_METRICS_LOG") else {
        return;
    };
    if lines.is_empty() {
        return;
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(lines.as_bytes());
    }
}

impl Drop for LambdaRuntime {
    fn drop(&mut self) {
        log_emf_names(&self.output());
    }
}
