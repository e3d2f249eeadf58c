//! Replays every committed corpus input (`fuzz/corpus/<target>/`) through
//! its target's checks, so the inputs the fuzzers found keep passing on
//! every `cargo test`, with or without cargo fuzz.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).expect("read");
        check(&data);
        n += 1;
    }
    assert!(n > 0, "{} has no inputs", dir.display());
}

#[test]
fn query_corpus() {
    replay("query", adtrack_fuzz::query);
}

#[test]
fn batch_body_corpus() {
    replay("batch_body", adtrack_fuzz::batch_body);
}

#[test]
fn request_head_corpus() {
    replay("request_head", adtrack_fuzz::request_head);
}
