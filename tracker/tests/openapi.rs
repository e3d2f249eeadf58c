//! The published API contract (`tracker/openapi.yaml`) against the real
//! tracker: the admin port serves exactly that document, and schemathesis
//! (pinned in `dev/requirements-test.txt`) sends a bounded number of
//! generated requests to every operation: no 5xx, and every status, content
//! type, header and body matches the document.

mod support;

use std::path::PathBuf;
use std::process::Command;

use adtrack_testkit::{Http, Stack};
use support::{Tracker, load_programs};

/// The Python of the test tools, with schemathesis and PyYAML.
fn test_python() -> PathBuf {
    std::env::var_os("ADTRACK_TEST_PYTHON")
        .map(PathBuf::from)
        .expect("ADTRACK_TEST_PYTHON: ./dev/test installs the test tools (dev/requirements-test.txt) and sets it")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracker_keeps_its_published_contract() {
    let python = test_python();
    let stack = Stack::start(1).expect("stack");
    load_programs(&stack).await;
    let t = Tracker::start(
        &stack,
        &[("TRACKER_CORS_ORIGINS", "https://shop.example.com")],
    )
    .await;
    let http = Http::new();
    let spec_url = format!("{}/openapi.json", t.admin);
    let served = http.get(&spec_url).await.expect("openapi.json");
    assert_eq!(served.status, 200);
    assert_eq!(
        served.header("content-type").as_deref(),
        Some("application/json")
    );
    let yaml = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
    let converted = Command::new(&python)
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
            yaml,
        ])
        .output()
        .expect("python");
    assert!(
        converted.status.success(),
        "{}",
        String::from_utf8_lossy(&converted.stderr)
    );
    let from_yaml: serde_json::Value =
        serde_json::from_slice(&converted.stdout).expect("the YAML as JSON");
    assert_eq!(
        served.json(),
        from_yaml,
        "tracker/openapi.json is not tracker/openapi.yaml: run dev/openapi-json"
    );

    let schemathesis = python.with_file_name("schemathesis");
    let work = tempfile::tempdir().expect("dir");
    let out = Command::new(&schemathesis)
        .current_dir(work.path())
        .args(["run", &spec_url, "--url", &t.base])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "50",
            "--seed",
            "1",
            "--workers",
            "1",
        ])
        .env("NO_COLOR", "1")
        .output()
        .expect("schemathesis");
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains(" generated, "))
        .unwrap_or("(no summary)")
        .trim()
        .to_owned();
    println!("schemathesis: {summary}");
    assert!(
        out.status.success(),
        "schemathesis found responses the document does not allow:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(summary.contains("passed"), "{text}");
}
