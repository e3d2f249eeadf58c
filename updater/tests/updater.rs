//! The Redis copy against a real redis-server: atomic loads, versions,
//! deletes, the published changes; and the command line's bad input that
//! writes nothing (the table-first store is in `store.rs`).

use adtrack_proto::program::{ProgramId, parse_program_file};
use adtrack_proto::redis_layout::{CHANGES_CHANNEL, ProgramChange, StoredProgram};
use adtrack_testkit::{PROGRAMS_TABLE, Redis, Stack, binary, dynamodb_client, scan_table};
use adtrack_updater::{Counter, DeleteOutcome, RedisPrograms, WriteOutcome};

const REFERENCE: &str = r#"[{"programId":"212312","programName":"program1","checksum":"123","customerId":"9123","customerName":"Customer1","valid":true},
{"programId":"212313","programName":"program2","checksum":"124","customerId":"9124","customerName":"Customer2","valid":true}]"#;

fn key_count(url: &str) -> usize {
    let client = redis::Client::open(url).expect("client");
    let mut conn = client.get_connection().expect("conn");
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).expect("keys");
    keys.len()
}

#[tokio::test]
async fn load_put_delete_get_and_versions() {
    let mut redis = Redis::start().expect("redis");
    let client = redis::Client::open(redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe(CHANGES_CHANNEL).await.expect("subscribe");
    let mut messages = pubsub.into_on_message();

    let store = RedisPrograms::connect(&redis.url(), Counter::Create)
        .await
        .expect("connect");
    let programs = parse_program_file(REFERENCE).expect("valid");
    let outcomes = store.load_atomic(&programs).await.expect("load");
    let (WriteOutcome::Written(v1), WriteOutcome::Written(v2)) = (outcomes[0], outcomes[1]) else {
        panic!("both written: {outcomes:?}")
    };
    assert!(v2 > v1, "versions grow");

    use futures_util::StreamExt;
    for expected in ["212312", "212313"] {
        let msg = messages.next().await.expect("message");
        let change = ProgramChange::parse(msg.get_payload_bytes()).expect("parses");
        assert_eq!(change.program_id().as_str(), expected);
    }

    let id = ProgramId::parse("212312").expect("id");
    let StoredProgram::Present(p) = store.get(&id).await.expect("get") else {
        panic!("missing")
    };
    assert_eq!((p.customer_id, p.version), (9123, v1));

    // An explicit older version is refused; a newer one wins.
    let mut older = p.clone();
    older.version = 1;
    older.valid = false;
    assert_eq!(
        store.put(&older).await.expect("put"),
        WriteOutcome::Stale(v1)
    );
    let far = v2 + 10_000_000_000;
    older.version = far;
    assert_eq!(
        store.put(&older).await.expect("put"),
        WriteOutcome::Written(far)
    );
    // Versions handed out later stay above explicit ones.
    let mut next = older.clone();
    next.version = 0;
    assert_eq!(
        store.put(&next).await.expect("put"),
        WriteOutcome::Written(far + 1)
    );

    assert_eq!(
        store.delete(&id, 0).await.expect("delete"),
        DeleteOutcome::Deleted(far + 2)
    );
    assert_eq!(
        store.get(&id).await.expect("get"),
        StoredProgram::Deleted { version: far + 2 }
    );
    assert_eq!(
        store.delete(&id, 0).await.expect("delete again"),
        DeleteOutcome::AlreadyDeleted(far + 2)
    );
    // A late write carrying an older version cannot resurrect it.
    older.version = far + 1;
    assert_eq!(
        store.put(&older).await.expect("put"),
        WriteOutcome::Stale(far + 2)
    );

    let kinds: Vec<(String, u64)> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let msg = messages.next().await.expect("message");
            let c = ProgramChange::parse(msg.get_payload_bytes()).expect("parses");
            let kind = match c {
                ProgramChange::Upsert(_) => "upsert",
                ProgramChange::Delete { .. } => "delete",
            };
            v.push((kind.to_owned(), c.version()));
        }
        v
    };
    assert_eq!(
        kinds,
        vec![
            ("upsert".to_owned(), far),
            ("upsert".to_owned(), far + 1),
            ("delete".to_owned(), far + 2)
        ]
    );

    // Deleting an id Redis never held still records (and announces) the
    // deletion, so a late write of an older version cannot create it.
    let never = ProgramId::parse("never-written").expect("id");
    let DeleteOutcome::Tombstoned(tomb) = store.delete(&never, 0).await.expect("delete") else {
        panic!("an absent program's delete leaves a tombstone");
    };
    let msg = messages.next().await.expect("message");
    assert_eq!(
        ProgramChange::parse(msg.get_payload_bytes()).expect("parses"),
        ProgramChange::Delete {
            program_id: never.clone(),
            version: tomb
        }
    );
    let mut late = programs[0].clone();
    late.program_id = never.clone();
    late.version = 5;
    assert_eq!(
        store.put(&late).await.expect("put"),
        WriteOutcome::Stale(tomb)
    );
    assert_eq!(
        store.get(&never).await.expect("get"),
        StoredProgram::Deleted { version: tomb }
    );
    // A new write (the store picks the version) creates it again.
    late.version = 0;
    assert!(matches!(
        store.put(&late).await.expect("put"),
        WriteOutcome::Written(v) if v > tomb
    ));

    // After Redis loses everything, a reload still carries newer versions.
    redis.restart().expect("restart");
    let store = RedisPrograms::connect(&redis.url(), Counter::Create)
        .await
        .expect("connect");
    let outcomes = store.load_atomic(&programs).await.expect("load");
    assert!(
        matches!(outcomes[0], WriteOutcome::Written(v) if v > v2),
        "{outcomes:?}"
    );
}

#[test]
fn malformed_input_writes_nothing_and_names_the_problem() {
    let stack = Stack::start(1).expect("stack");
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("bad.json");
    std::fs::write(
        &file,
        r#"[{"programId":"1","programName":"ok","checksum":"1","customerId":1,"customerName":"a"},
            {"programId":"2","programName":"bad","checksum":"1","customerId":"twelve","customerName":"b"}]"#,
    )
    .expect("write");
    let updater = |args: &[&str]| {
        adtrack_testkit::command(&binary("updater"))
            .envs(stack.env())
            .args(args)
            .arg(&file)
            .output()
            .expect("run updater")
    };
    let out = updater(&["load"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("record 2 (programId 2): field `customerId`"),
        "stderr: {stderr}"
    );
    assert!(stderr.contains("nothing written"), "stderr: {stderr}");
    assert_eq!(key_count(&stack.redis.url()), 0, "nothing may be written");
    let table_items = || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(scan_table(
            &dynamodb_client(&stack.dynamodb.url()),
            PROGRAMS_TABLE,
        ))
        .expect("scan")
        .len()
    };
    assert_eq!(table_items(), 0, "nothing may be written to the table");

    // Not JSON at all.
    std::fs::write(&file, "[{").expect("write");
    assert_eq!(updater(&["load"]).status.code(), Some(2));
    assert_eq!(key_count(&stack.redis.url()), 0);

    // A good file loads through the binary; loading it again changes nothing.
    std::fs::write(&file, REFERENCE).expect("write");
    let out = updater(&["load"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "loaded 2 program(s): 2 added, 0 changed, 0 unchanged, 0 stale; 2 written to Redis"
    );
    assert_eq!(table_items(), 2);
    let out = updater(&["load"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "loaded 2 program(s): 0 added, 0 changed, 2 unchanged, 0 stale; 0 written to Redis"
    );
}
