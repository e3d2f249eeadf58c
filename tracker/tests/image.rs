//! The service binaries under the image's runtime conditions, without a
//! container engine (`dev/in_image.py`): a root filesystem of the image's
//! Debian release built by following the Dockerfile's runtime stage, the
//! image's user (10001), a read-only root filesystem, and the VOLUME
//! directory a mounted host directory owned as the image's is, as an ECS
//! task volume is. The tracker becomes ready, takes hits, writes its spool
//! there and stops cleanly on SIGTERM; its health check command works; the
//! consumer writes the events; the updater loads and lists the programs.

mod support;

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use adtrack_proto::v1::TrackingEvent;
use adtrack_testkit::{
    EVENTS_TABLE, Http, PROGRAMS_TABLE, Proc, Stack, attr_s, dynamodb_client, free_port,
    read_stream_events, scan_table,
};
use prost::Message;
use support::{load_programs, wait_until};

/// The image's user.
const IMAGE_UID: u32 = 10001;
/// The tracker's spool in the task definition (cloudformation/tracker.yaml).
const SPOOL_DIR: &str = "/var/lib/adtrack/spool";

fn bin_dir() -> PathBuf {
    adtrack_testkit::binary("tracker")
        .parent()
        .expect("target dir")
        .to_owned()
}

/// `dev/in_image.py run`: `command` in the image, `volume` on its VOLUME.
fn in_image(volume: &Path, env: &[(String, String)], command: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(adtrack_testkit::dev_dir().join("in_image.py"))
        .arg("run")
        .arg("--volume")
        .arg(volume)
        .arg("--bin-dir")
        .arg(bin_dir());
    for (k, v) in env {
        cmd.arg("--env").arg(format!("{k}={v}"));
    }
    cmd.arg("--").args(command);
    cmd
}

fn owner_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .uid()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_run_as_the_image_runs_them() {
    let stack = Stack::start(1).expect("stack");
    load_programs(&stack).await;
    let volume = tempfile::tempdir().expect("volume");
    let (port, admin_port) = (free_port(), free_port());
    let mut env: Vec<(String, String)> = stack
        .env()
        .into_iter()
        .filter(|(k, _)| k != "TRACKER_SPOOL_DIR")
        .collect();
    env.extend(
        [
            ("TRACKER_LISTEN_ADDR", format!("127.0.0.1:{port}")),
            ("TRACKER_ADMIN_ADDR", format!("127.0.0.1:{admin_port}")),
            ("TRACKER_SPOOL_DIR", SPOOL_DIR.to_owned()),
            ("LOG_FORMAT", "json".to_owned()),
            ("RUST_LOG", "warn".to_owned()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let mut tracker = Proc::new(
        in_image(volume.path(), &env, &["tracker"])
            .spawn()
            .expect("the tracker in the image"),
    );
    let (base, admin) = (
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{admin_port}"),
    );
    let http = Http::new();
    wait_until(
        "the tracker in the image is ready",
        Duration::from_secs(120),
        || async {
            http.get(&format!("{admin}/health/ready"))
                .await
                .is_ok_and(|r| r.status == 200)
        },
    )
    .await;

    let mut ids = HashSet::new();
    for i in 0..20 {
        let r = http
            .get(&format!("{base}/event/212312?n={i}"))
            .await
            .expect("hit");
        assert_eq!(r.status, 200, "{}", r.text());
        ids.insert(r.json()["messageId"].as_str().expect("id").to_owned());
    }
    let kinesis = stack.kinesis.url();
    wait_until(
        "the hits in the stream",
        Duration::from_secs(60),
        || async {
            let seen: HashSet<String> = read_stream_events(&kinesis)
                .await
                .unwrap_or_default()
                .into_iter()
                .filter_map(|e| TrackingEvent::decode(e.data.as_slice()).ok())
                .map(|e| e.message_id)
                .collect();
            ids.is_subset(&seen)
        },
    )
    .await;
    // The spool lives on the volume, created there by the image's user.
    let spool = volume.path().join("spool");
    assert_eq!(
        owner_of(volume.path()),
        IMAGE_UID,
        "the volume is the image's user's"
    );
    assert_eq!(owner_of(&spool), IMAGE_UID);
    let written: Vec<_> = std::fs::read_dir(&spool)
        .expect("spool")
        .filter_map(Result::ok)
        .collect();
    assert!(!written.is_empty(), "the tracker made its spool files");
    for entry in &written {
        assert_eq!(owner_of(&entry.path()), IMAGE_UID, "{:?}", entry.path());
    }

    // The container health check command, in the image too.
    let check = in_image(volume.path(), &env, &["tracker", "--healthcheck"])
        .stdout(Stdio::null())
        .status()
        .expect("health check");
    assert!(
        check.success(),
        "tracker --healthcheck in the image: {check}"
    );

    tracker.signal(15);
    let status = tracker
        .wait_exit(Duration::from_secs(40))
        .expect("the tracker exits after SIGTERM");
    assert!(status.success(), "SIGTERM: {status}");

    // The consumer, in the image, writes what the tracker sent.
    let mut consumer_env = stack.env();
    consumer_env.push((
        "CONSUMER_ADMIN_ADDR".into(),
        format!("127.0.0.1:{}", free_port()),
    ));
    consumer_env.push(("RUST_LOG".into(), "warn".into()));
    let mut consumer = Proc::new(
        in_image(volume.path(), &consumer_env, &["consumer"])
            .spawn()
            .expect("the consumer in the image"),
    );
    let ddb = dynamodb_client(&stack.dynamodb.url());
    wait_until("the events written", Duration::from_secs(90), || async {
        let written: HashSet<String> = scan_table(&ddb, EVENTS_TABLE)
            .await
            .unwrap_or_default()
            .iter()
            .map(|i| attr_s(i, "eventId"))
            .collect();
        ids.is_subset(&written)
    })
    .await;
    consumer.signal(15);
    let status = consumer
        .wait_exit(Duration::from_secs(40))
        .expect("the consumer exits after SIGTERM");
    assert!(status.success(), "SIGTERM: {status}");

    // The updater, in the image, loads the programs into the table and
    // Redis (from stdin) and lists them.
    let mut load = in_image(
        volume.path(),
        &stack.env(),
        &["updater", "--programs-table", PROGRAMS_TABLE, "load", "-"],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("the updater in the image");
    load.stdin
        .take()
        .expect("stdin")
        .write_all(support::PROGRAMS.as_bytes())
        .expect("programs to the updater");
    let out = load.wait_with_output().expect("updater load");
    assert!(
        out.status.success(),
        "updater load in the image: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let out = in_image(
        volume.path(),
        &stack.env(),
        &["updater", "--programs-table", PROGRAMS_TABLE, "list"],
    )
    .output()
    .expect("the updater in the image");
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listed.contains("212312"),
        "updater list in the image: {}\n{listed}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
