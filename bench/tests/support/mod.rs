//! Starting the pipeline's processes for the end-to-end tests.

#![allow(dead_code)]

use std::time::Duration;

use adtrack_testkit::{
    CHECKPOINT_TABLE, Http, Proc, Stack, binary, dev_dir, free_port, scan_table, wait_until,
};

pub struct Service {
    pub proc: Proc,
    pub admin: String,
}

pub fn start(stack: &Stack, bin: &str, env: &[(&str, String)]) -> Service {
    let admin_port = free_port();
    let admin_var = if bin == "tracker" {
        "TRACKER_ADMIN_ADDR"
    } else {
        "CONSUMER_ADMIN_ADDR"
    };
    let mut cmd = adtrack_testkit::command(&binary(bin));
    cmd.envs(stack.env())
        .env(admin_var, format!("127.0.0.1:{admin_port}"))
        .env("LOG_FORMAT", "text")
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Service {
        proc: Proc::new(cmd.spawn().expect("spawn")),
        admin: format!("http://127.0.0.1:{admin_port}"),
    }
}

/// Loads the dev programs and starts a tracker and a consumer on the
/// stack; returns once the tracker is ready, with its public port.
pub async fn start_pipeline(stack: &Stack) -> (u16, Service, Service) {
    let load = adtrack_testkit::command(&binary("updater"))
        .envs(stack.env())
        .arg("load")
        .arg(dev_dir().join("programs.json"))
        .output()
        .expect("updater");
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );
    let port = free_port();
    let tracker = start(
        stack,
        "tracker",
        &[("TRACKER_LISTEN_ADDR", format!("127.0.0.1:{port}"))],
    );
    let consumer = start(
        stack,
        "consumer",
        &[("CONSUMER_POLL_INTERVAL_MS", "200".into())],
    );
    let http = Http::new();
    wait_until("tracker ready", Duration::from_secs(30), || async {
        http.get(&format!("{}/health/ready", tracker.admin))
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    (port, tracker, consumer)
}

pub async fn metrics(http: &Http, admin: &str) -> String {
    http.get(&format!("{admin}/metrics"))
        .await
        .map(|r| r.text())
        .unwrap_or_default()
}

/// Deletes the consumer's checkpoints, so the next consumer reads the
/// stream again from its start; returns how many there were (one per shard
/// read).
pub async fn forget_checkpoints(ddb: &aws_sdk_dynamodb::Client) -> usize {
    let checkpoints: Vec<_> = scan_table(ddb, CHECKPOINT_TABLE)
        .await
        .expect("scan")
        .into_iter()
        .filter(|c| c.contains_key("sequenceNumber"))
        .collect();
    let n = checkpoints.len();
    for c in checkpoints {
        ddb.delete_item()
            .table_name(CHECKPOINT_TABLE)
            .key("shardKey", c["shardKey"].clone())
            .send()
            .await
            .expect("delete checkpoint");
    }
    n
}
