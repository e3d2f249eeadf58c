//! Starting the tracker process for tests.

#![allow(dead_code)]

use std::time::Duration;

pub use adtrack_testkit::wait_until;
use std::collections::HashMap;

use adtrack_proto::v1::TrackingEvent;
use adtrack_testkit::{Http, Proc, Stack, free_port, read_stream_events};
use prost::Message;

pub const PROGRAMS: &str = include_str!("../../../dev/programs.json");

pub struct Tracker {
    pub proc: Proc,
    pub spool_dir: std::path::PathBuf,
    _spool: tempfile::TempDir,
    pub port: u16,
    pub base: String,
    pub admin: String,
}

impl Tracker {
    /// Starts the tracker binary against `stack` without waiting for ready.
    pub fn spawn(stack: &Stack, extra: &[(&str, &str)]) -> Self {
        let cmd = adtrack_testkit::command(&adtrack_testkit::binary("tracker"));
        Self::spawn_command(cmd, stack, extra)
    }

    /// Starts it confined to one CPU (`taskset -c 0`), as on a task of one
    /// vCPU or less, and waits until it is ready.
    pub async fn start_on_one_core(stack: &Stack, extra: &[(&str, &str)]) -> Self {
        let inner = adtrack_testkit::command(&adtrack_testkit::binary("tracker"));
        let mut cmd = std::process::Command::new("taskset");
        cmd.args(["-c", "0"])
            .arg(inner.get_program())
            .args(inner.get_args());
        let t = Self::spawn_command(cmd, stack, extra);
        t.wait_ready().await;
        t
    }

    fn spawn_command(
        mut cmd: std::process::Command,
        stack: &Stack,
        extra: &[(&str, &str)],
    ) -> Self {
        let (port, admin_port) = (free_port(), free_port());
        let spool = tempfile::tempdir().expect("spool dir");
        cmd.envs(stack.env())
            .env("TRACKER_SPOOL_DIR", spool.path())
            .env("TRACKER_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("TRACKER_ADMIN_ADDR", format!("127.0.0.1:{admin_port}"))
            .env("LOG_FORMAT", "text")
            .env("RUST_LOG", "warn");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Self {
            proc: Proc::new(cmd.spawn().expect("spawn tracker")),
            spool_dir: spool.path().to_owned(),
            _spool: spool,
            port,
            base: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
        }
    }

    /// Starts it and waits until it is ready.
    pub async fn start(stack: &Stack, extra: &[(&str, &str)]) -> Self {
        let t = Self::spawn(stack, extra);
        t.wait_ready().await;
        t
    }

    pub async fn wait_ready(&self) {
        let http = Http::new();
        wait_until("tracker ready", Duration::from_secs(30), || async {
            http.get(&format!("{}/health/ready", self.admin))
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await;
    }

    pub async fn metrics(&self) -> String {
        let text = Http::new()
            .get(&format!("{}/metrics", self.admin))
            .await
            .map(|r| r.text())
            .unwrap_or_default();
        adtrack_testkit::log_metric_names("tracker", &text);
        text
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The names of the process's threads.
    pub fn thread_names(&self) -> Vec<String> {
        let dir = format!("/proc/{}/task", self.proc.pid());
        std::fs::read_dir(dir)
            .map(|tasks| {
                tasks
                    .flatten()
                    .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                    .map(|name| name.trim().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Loads `dev/programs.json` (the reference format) with the updater's store.
pub async fn load_programs(stack: &Stack) -> adtrack_updater::RedisPrograms {
    let store = adtrack_updater::RedisPrograms::connect(
        &stack.redis.url(),
        adtrack_updater::Counter::Create,
    )
    .await
    .expect("redis");
    store
        .load_atomic(&adtrack_proto::program::parse_program_file(PROGRAMS).expect("programs"))
        .await
        .expect("load");
    store
}

/// Runs one Redis command (`FLUSHALL`, `PUBLISH ...`) as an outsider would.
pub async fn redis_cmd(url: &str, args: &[&str]) {
    let client = redis::Client::open(url).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    let _: redis::Value = cmd.query_async(&mut conn).await.expect("command");
}

/// Waits until `url` answers `want`.
pub async fn wait_status(http: &Http, url: &str, want: u16) {
    wait_until(
        &format!("{url} to answer {want}"),
        Duration::from_secs(20),
        || async { http.get(url).await.is_ok_and(|r| r.status == want) },
    )
    .await;
}

impl Drop for Tracker {
    /// What it exposed by the end, for dev/check_metrics.py.
    fn drop(&mut self) {
        adtrack_testkit::log_exposed_metrics("tracker", &self.admin);
    }
}

/// The events in the stream, by id, once all of `ids` are there (20 s at
/// most).
pub async fn stream_events<S: AsRef<str>>(
    stack: &Stack,
    ids: &[S],
) -> HashMap<String, TrackingEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let found: HashMap<String, TrackingEvent> = read_stream_events(&stack.kinesis.url())
            .await
            .unwrap_or_default()
            .iter()
            .filter_map(|r| TrackingEvent::decode(r.data.as_slice()).ok())
            .map(|e| (e.message_id.clone(), e))
            .collect();
        if ids.iter().all(|id| found.contains_key(id.as_ref())) {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events never reached the stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
