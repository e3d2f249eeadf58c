//! Settings checked at start on the real binary: a bad value, or two
//! settings that contradict each other, stop the process with one line
//! naming the variable and exit code 2, before anything is started.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn start_with(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("dir");
    let mut cmd = adtrack_testkit::command(&adtrack_testkit::binary("tracker"));
    cmd.env("TRACKER_SPOOL_DIR", dir.path().join("spool"))
        .env("TRACKER_LISTEN_ADDR", "127.0.0.1:0")
        .env("TRACKER_ADMIN_ADDR", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the tracker");
    // A tracker that accepted the settings would run on: give it 30 s to
    // refuse them, then stop it (the test then fails on the exit code).
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        match child.try_wait().expect("wait") {
            Some(status) => break status.code(),
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    (code, stderr)
}

#[test]
fn a_spool_that_could_wedge_is_refused_at_start() {
    let (code, stderr) = start_with(&[
        ("TRACKER_SPOOL_MAX_BYTES", "1048576"),
        ("TRACKER_SPOOL_SEGMENT_BYTES", "1048576"),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("TRACKER_SPOOL_MAX_BYTES"), "{stderr}");
    assert!(stderr.contains("TRACKER_SPOOL_SEGMENT_BYTES"), "{stderr}");
}

#[test]
fn a_bad_value_names_its_variable() {
    let (code, stderr) = start_with(&[("TRACKER_MAX_CONNECTIONS", "many")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("TRACKER_MAX_CONNECTIONS"), "{stderr}");
}

#[test]
fn a_memory_age_bound_within_the_linger_is_refused_at_start() {
    let (code, stderr) = start_with(&[
        ("TRACKER_MEMORY_MAX_AGE_MS", "200"),
        ("TRACKER_BATCH_LINGER_MS", "200"),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("TRACKER_MEMORY_MAX_AGE_MS"), "{stderr}");
    assert!(stderr.contains("TRACKER_BATCH_LINGER_MS"), "{stderr}");
}

#[test]
fn a_bad_path_prefix_names_its_variable() {
    for bad in ["t", "/t/", "/a//b", "/t?x", "/t%20"] {
        let (code, stderr) = start_with(&[("TRACKER_PATH_PREFIX", bad)]);
        assert_eq!(code, Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("TRACKER_PATH_PREFIX"), "{stderr}");
    }
}
