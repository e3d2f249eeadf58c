//! The servers a bench run starts and stops itself: the tracker against the
//! local stack, and nginx serving `empty_gif` on the same route. Optionally
//! pinned to one core with `taskset`, the load generator to another.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// `KEY=value` lines of `dev/.stack.env` (written by `./dev/run --detach`).
pub fn read_stack_env(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "{}: start the stack with ./dev/run --detach first",
            path.display()
        )
    })?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Cores to pin to: (load generator, server), when the machine has two or more.
pub fn pinning() -> Option<(usize, usize)> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let has_taskset = Command::new("taskset").arg("--version").output().is_ok();
    (cores >= 2 && has_taskset).then_some((0, 1))
}

/// Pins this process (all its threads) to `core`.
pub fn pin_self(core: usize) {
    let pid = std::process::id().to_string();
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", &core.to_string(), &pid])
        .stdout(Stdio::null())
        .status();
}

/// Pins the local stack's processes named in `dev/.stack.env` (Redis, the
/// stand-ins, the stack's own tracker and consumer) to `core` and runs them
/// there under `SCHED_IDLE` (every thread), so they take the load
/// generator's spare time rather than its turn: in AWS, Kinesis and Redis
/// are not on the task's machine, and a stand-in busy decoding the
/// tracker's PutRecords must not delay the load it is measured by (with
/// nice 19 alone it still did, by its time slice). Returns the names of
/// those pinned.
pub fn pin_stack(env: &HashMap<String, String>, core: usize) -> Vec<&'static str> {
    let mut pinned = Vec::new();
    for (key, name, program) in [
        ("REDIS_PID", "redis", "redis-server"),
        ("KINESIS_PID", "kinesis", "standin.js"),
        ("DYNAMODB_PID", "dynamodb", "standin.js"),
        ("TRACKER_PID", "stack tracker", "tracker"),
        ("CONSUMER_PID", "consumer", "consumer"),
    ] {
        let Some(pid) = env.get(key).filter(|p| p.parse::<u32>().is_ok()) else {
            continue;
        };
        // Only the stack's own process: a PID of one that ended may be reused.
        let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(program));
        if !ours {
            continue;
        }
        let ok = Command::new("taskset")
            .args(["-a", "-p", "-c", &core.to_string(), pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            let _ = Command::new("chrt")
                .args(["--idle", "-a", "-p", "0", pid])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            pinned.push(name);
        }
    }
    pinned
}

fn command(program: &Path, core: Option<usize>) -> Command {
    match core {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// A server started by the bench; killed on drop.
pub struct Server {
    pub addr: SocketAddr,
    pub admin: Option<String>,
    child: Child,
    _dir: tempfile::TempDir,
    pub ready_after: Duration,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The workspace binary next to this one (same profile).
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent()
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

async fn wait_http(url: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(status) = crate::http::http_get_status(url).await
            && status == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} did not answer 200 within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Settings that measure the tracker rather than the two-shard local
/// stream's write budget: the stand-in has no per-shard limits, and a deep
/// memory queue keeps a burst off the disk spool while it catches up.
pub const UNLIMITED_STREAM: &[(&str, &str)] = &[
    ("TRACKER_SHARD_RECORDS_PER_SEC", "100000"),
    ("TRACKER_SHARD_BYTES_PER_SEC", "1073741824"),
    ("TRACKER_QUEUE_BYTES", "1073741824"),
    ("TRACKER_QUEUE_EVENTS", "4000000"),
];

/// Starts the tracker against the stack in `env` with its defaults but for
/// `settings`, waits until it is ready.
pub async fn start_tracker(
    bin: &Path,
    env: &HashMap<String, String>,
    core: Option<usize>,
    settings: &[(&str, &str)],
) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let (port, admin) = (free_port()?, free_port()?);
    let mut cmd = command(bin, core);
    for k in [
        "REDIS_URL",
        "AWS_ENDPOINT_URL_KINESIS",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "EVENTS_STREAM",
    ] {
        if let Some(v) = env.get(k) {
            cmd.env(k, v);
        }
    }
    cmd.env("TRACKER_LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("TRACKER_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
        .env("TRACKER_SPOOL_DIR", dir.path().join("spool"))
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "warn")
        // As the image starts it (see the Dockerfile), unless the caller's
        // environment says otherwise.
        .env(
            "MIMALLOC_PURGE_DELAY",
            std::env::var("MIMALLOC_PURGE_DELAY").unwrap_or_else(|_| "0".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in settings {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let admin_url = format!("http://127.0.0.1:{admin}");
    let mut server = Server {
        addr: ([127, 0, 0, 1], port).into(),
        admin: Some(admin_url.clone()),
        child,
        _dir: dir,
        ready_after: Duration::ZERO,
    };
    wait_http(
        &format!("{admin_url}/health/ready"),
        Duration::from_secs(60),
    )
    .await?;
    server.ready_after = started.elapsed();
    Ok(server)
}

/// Starts nginx serving the GIF on `/v1/pixel/` (config in `bench/nginx.conf`).
pub async fn start_nginx(core: Option<usize>) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let template = include_str!("../nginx.conf");
    let conf = template
        .replace("@PORT@", &port.to_string())
        .replace("@PREFIX@", &dir.path().display().to_string());
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .context("nginx is not installed (apt-get install nginx-light; ./dev/test installs it)")?;
    let mut cmd = command(&nginx, core);
    cmd.arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg("stderr")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let started = Instant::now();
    let child = cmd.spawn().context("starting nginx")?;
    let mut server = Server {
        addr: ([127, 0, 0, 1], port).into(),
        admin: None,
        child,
        _dir: dir,
        ready_after: Duration::ZERO,
    };
    wait_http(
        &format!("http://127.0.0.1:{port}/v1/pixel/ready"),
        Duration::from_secs(10),
    )
    .await?;
    server.ready_after = started.elapsed();
    Ok(server)
}
