//! A short smoke of every bench mode against the real local stack (the
//! figures in the README come from full runs; this only proves each mode
//! runs end to end and writes its results).

use std::path::Path;
use std::process::Command;

use adtrack_testkit::{Http, Proc, Stack, binary, free_port};

fn bench(stack_env: &Path, out: &Path, args: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_adtrack-bench"))
        .arg("--stack")
        .arg(stack_env)
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .expect("run adtrack-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("$ adtrack-bench {}\n{stdout}", args.join(" "));
    assert!(
        output.status.success(),
        "adtrack-bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_runs() {
    let stack = Stack::start(1).expect("stack");
    let (port, admin, consumer_admin) = (free_port(), free_port(), free_port());
    let spawn = |bin: &str, extra: Vec<(String, String)>| {
        let mut cmd = adtrack_testkit::command(&binary(bin));
        cmd.envs(stack.env())
            .env("LOG_FORMAT", "text")
            .env("RUST_LOG", "warn");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        Proc::new(cmd.spawn().expect("spawn"))
    };
    // The sync marks the (empty) Redis complete, as a deployment's does; the
    // bench seeds its own programs.
    let synced = adtrack_testkit::command(&binary("updater"))
        .envs(stack.env())
        .arg("sync")
        .output()
        .expect("run updater sync");
    assert!(
        synced.status.success(),
        "{}",
        String::from_utf8_lossy(&synced.stderr)
    );
    let tracker = spawn(
        "tracker",
        vec![
            ("TRACKER_LISTEN_ADDR".into(), format!("127.0.0.1:{port}")),
            ("TRACKER_ADMIN_ADDR".into(), format!("127.0.0.1:{admin}")),
            (
                "TRACKER_SPOOL_DIR".into(),
                stack.dir.path().join("spool").display().to_string(),
            ),
        ],
    );
    let _consumer = spawn(
        "consumer",
        vec![(
            "CONSUMER_ADMIN_ADDR".into(),
            format!("127.0.0.1:{consumer_admin}"),
        )],
    );
    let http = Http::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !http
        .get(&format!("http://127.0.0.1:{admin}/health/ready"))
        .await
        .is_ok_and(|r| r.status == 200)
    {
        assert!(tokio::time::Instant::now() < deadline, "tracker not ready");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut env: Vec<String> = stack
        .env()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    env.push(format!("TRACKER_URL=http://127.0.0.1:{port}"));
    env.push(format!("TRACKER_ADMIN_URL=http://127.0.0.1:{admin}"));
    env.push(format!("TRACKER_PID={}", tracker.pid()));
    let env_file = stack.dir.path().join("stack.env");
    std::fs::write(&env_file, env.join("\n")).expect("write stack env");
    let out = stack.dir.path().join("results");

    let p = ["--programs", "500"];
    bench(&env_file, &out, &["seed", p[0], p[1]]);
    bench(
        &env_file,
        &out,
        &[
            "load",
            "--rate",
            "200",
            "--duration",
            "2",
            "--connections",
            "4",
            p[0],
            p[1],
        ],
    );
    bench(
        &env_file,
        &out,
        &[
            "max",
            "--start",
            "100",
            "--step",
            "100",
            "--max",
            "200",
            "--duration",
            "1",
            "--p99-ms",
            "1000",
            "--connections",
            "4",
            p[0],
            p[1],
        ],
    );
    bench(
        &env_file,
        &out,
        &[
            "e2e",
            "--rate",
            "100",
            "--duration",
            "2",
            "--connections",
            "4",
            p[0],
            p[1],
        ],
    );
    bench(&env_file, &out, &["startup", p[0], p[1]]);
    bench(&env_file, &out, &["update-latency", "--samples", "5"]);
    bench(
        &env_file,
        &out,
        &[
            "compare",
            "--rounds",
            "1",
            "--duration",
            "1",
            "--latency-duration",
            "1",
            "--rate",
            "200",
            "--connections",
            "4",
            p[0],
            p[1],
        ],
    );
    for f in [
        "load-200.json",
        "load-200.svg",
        "max.json",
        "max.svg",
        "e2e-100.json",
        "startup.json",
        "update-latency.json",
        "compare.json",
        "compare.svg",
    ] {
        assert!(out.join(f).exists(), "{f} written");
    }
    let e2e: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("e2e-100.json")).expect("read"))
            .expect("json");
    assert_eq!(e2e["e2e"]["lost"], 0);
    assert_eq!(e2e["e2e"]["duplicated_in_stream"], 0);
}
