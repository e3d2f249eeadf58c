//! The table-first program store on real Redis and the DynamoDB stand-in:
//! writes reach the table, then Redis with the same version; concurrent
//! writers never make a version go backwards; the sync restores an emptied
//! Redis and marks it complete; and the operators' commands (load, export,
//! diff, prune, list, --dry-run) through the binary.

use std::collections::HashMap;
use std::process::Output;

use adtrack_proto::program::{Program, ProgramId, parse_program_file};
use adtrack_proto::redis_layout::{CHANGES_CHANNEL, ProgramChange, StoredProgram};
use adtrack_testkit::{PROGRAMS_TABLE, Stack, binary, dynamodb_client};
use adtrack_updater::{
    Counter, DeleteOutcome, Entry, ProgramTable, Programs, RedisPrograms, WriteOutcome,
};
use futures_util::StreamExt;

const REFERENCE: &str = r#"[{"programId":"212312","programName":"program1","checksum":"123","customerId":"9123","customerName":"Customer1","valid":true},
{"programId":"212313","programName":"program2","checksum":"124","customerId":"9124","customerName":"Customer2","valid":true}]"#;

fn table(stack: &Stack) -> ProgramTable {
    ProgramTable::new(dynamodb_client(&stack.dynamodb.url()), PROGRAMS_TABLE)
}

async fn programs(stack: &Stack) -> Programs {
    let redis = RedisPrograms::connect(&stack.redis.url(), Counter::KeepIfPresent)
        .await
        .expect("redis");
    Programs::new(table(stack), redis)
}

fn id(s: &str) -> ProgramId {
    ProgramId::parse(s).expect("id")
}

fn reference() -> Vec<Program> {
    parse_program_file(REFERENCE).expect("valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_to_the_table_first_then_to_redis_with_the_same_version() {
    let stack = Stack::start(1).expect("stack");
    let client = redis::Client::open(stack.redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe(CHANGES_CHANNEL).await.expect("subscribe");
    let mut messages = pubsub.into_on_message();
    let mut next_change = async || {
        let msg = messages.next().await.expect("message");
        ProgramChange::parse(msg.get_payload_bytes()).expect("parses")
    };
    let store = programs(&stack).await;
    let p = reference().remove(0);

    let WriteOutcome::Written(v1) = store.put(&p).await.expect("put") else {
        panic!("a new program is written")
    };
    let Some(Entry::Present(in_table)) = store.table.get(&p.program_id).await.expect("get") else {
        panic!("not in the table")
    };
    assert_eq!(in_table.version, v1);
    let StoredProgram::Present(in_redis) = store.redis.get(&p.program_id).await.expect("get")
    else {
        panic!("not in Redis")
    };
    assert_eq!(
        in_redis, in_table,
        "Redis holds the table's program and version"
    );
    assert_eq!(next_change().await.version(), v1);

    // An explicit older version changes nothing, in either place.
    let mut older = p.clone();
    older.version = 5;
    older.program_name = "older".into();
    assert_eq!(
        store.put(&older).await.expect("put"),
        WriteOutcome::Stale(v1)
    );
    assert_eq!(
        store.table.get(&p.program_id).await.expect("get"),
        Some(Entry::Present(in_table.clone()))
    );
    assert_eq!(
        store.redis.get(&p.program_id).await.expect("get"),
        StoredProgram::Present(in_redis)
    );

    // A delete leaves the same versioned tombstone in both; a late write of
    // an older version cannot undo it.
    let DeleteOutcome::Deleted(v2) = store.delete(&p.program_id).await.expect("delete") else {
        panic!("deleted")
    };
    assert!(v2 > v1);
    assert_eq!(
        store.table.get(&p.program_id).await.expect("get"),
        Some(Entry::Deleted { version: v2 })
    );
    assert_eq!(
        store.redis.get(&p.program_id).await.expect("get"),
        StoredProgram::Deleted { version: v2 }
    );
    assert_eq!(next_change().await.version(), v2);
    let mut late = p.clone();
    late.version = v1 + 1;
    assert_eq!(
        store.put(&late).await.expect("put"),
        WriteOutcome::Stale(v2)
    );
    assert_eq!(
        store.delete(&p.program_id).await.expect("delete"),
        DeleteOutcome::AlreadyDeleted(v2)
    );

    // Deleting an id never written records the deletion in both.
    let never = id("never-written");
    let DeleteOutcome::Tombstoned(v3) = store.delete(&never).await.expect("delete") else {
        panic!("an absent program's delete leaves a tombstone")
    };
    assert_eq!(
        store.redis.get(&never).await.expect("get"),
        StoredProgram::Deleted { version: v3 }
    );
    // A new write without a version creates it again, above the tombstone.
    let mut again = p.clone();
    again.program_id = never.clone();
    assert!(matches!(
        store.put(&again).await.expect("put"),
        WriteOutcome::Written(v) if v > v3
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_never_make_a_version_go_backwards() {
    let stack = Stack::start(1).expect("stack");
    let client = redis::Client::open(stack.redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe(CHANGES_CHANNEL).await.expect("subscribe");
    let mut messages = pubsub.into_on_message();
    let base = reference().remove(0);

    // Four writers at once on one program, each with its own connections;
    // one of them also writes explicit old versions, which must all lose.
    let mut writers = Vec::new();
    for w in 0..4 {
        let store = programs(&stack).await;
        let base = base.clone();
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..25 {
                let mut p = base.clone();
                p.program_name = format!("writer {w} write {i}");
                if w == 3 && i % 2 == 0 {
                    p.version = 1 + i as u64;
                }
                if let WriteOutcome::Written(v) = store.put(&p).await.expect("put") {
                    written.push((v, p.program_name.clone()));
                }
            }
            written
        }));
    }
    let mut written = Vec::new();
    for w in writers {
        written.extend(w.await.expect("writer"));
    }
    let (newest, newest_name) = written.iter().max().cloned().expect("some write won");
    assert!(
        written.iter().all(|(v, _)| *v > 25),
        "an explicit old version was written"
    );

    let store = programs(&stack).await;
    let Some(Entry::Present(in_table)) = store.table.get(&base.program_id).await.expect("get")
    else {
        panic!("in the table")
    };
    assert_eq!(
        (in_table.version, &in_table.program_name),
        (newest, &newest_name),
        "the table ends at the newest write"
    );
    let store = store;
    assert_eq!(
        store.redis.get(&base.program_id).await.expect("get"),
        StoredProgram::Present(in_table),
        "Redis ends at the table's version and content"
    );
    // What the trackers were told only ever moves forward.
    let mut published = Vec::new();
    while let Ok(Some(msg)) =
        tokio::time::timeout(std::time::Duration::from_millis(500), messages.next()).await
    {
        published.push(
            ProgramChange::parse(msg.get_payload_bytes())
                .expect("parses")
                .version(),
        );
    }
    assert!(!published.is_empty());
    assert!(
        published.windows(2).all(|w| w[0] < w[1]),
        "a published version went backwards: {published:?}"
    );
    assert_eq!(published.last(), Some(&newest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_restores_an_emptied_redis_from_the_table_and_marks_it_complete() {
    let stack = Stack::start(1).expect("stack");
    let store = programs(&stack).await;
    let mut all = reference();
    let mut third = all[0].clone();
    third.program_id = id("third");
    all.push(third);
    // A load into a Redis that is not complete (here: new) leaves it
    // holding the whole table, marked complete.
    store.load(&all).await.expect("load");
    assert!(store.redis.is_complete().await.expect("complete"));
    let first = store.sync(true).await.expect("sync");
    assert_eq!((first.written, first.redis_was_incomplete), (0, false));
    let DeleteOutcome::Deleted(tomb) = store.delete(&id("third")).await.expect("delete") else {
        panic!("deleted")
    };

    // Redis loses everything; a stray program appears that the table never
    // held.
    stack.redis.flushall();
    assert!(!store.redis.is_complete().await.expect("complete"));
    let mut stray = all[0].clone();
    stray.program_id = id("only-in-redis");
    store.redis.put(&stray).await.expect("put");
    assert!(
        !store.redis.is_complete().await.expect("complete"),
        "one write into an emptied Redis marked it complete"
    );

    let client = redis::Client::open(stack.redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe(CHANGES_CHANNEL).await.expect("subscribe");
    let mut messages = pubsub.into_on_message();
    // Without pruning, the stray stays; with it, it goes.
    let report = store.sync(false).await.expect("sync");
    assert_eq!(
        (
            report.written,
            report.deleted,
            report.pruned,
            report.only_in_redis,
            report.redis_was_incomplete
        ),
        (2, 1, 0, 1, true),
        "{report:?}"
    );
    assert!(matches!(
        store.redis.get(&id("only-in-redis")).await.expect("get"),
        StoredProgram::Present(_)
    ));
    let report = store.sync(true).await.expect("sync");
    assert_eq!(
        (report.written, report.pruned, report.redis_was_incomplete),
        (0, 1, false),
        "{report:?}"
    );
    assert!(store.redis.is_complete().await.expect("complete"));
    let stored = store.table.scan_all().await.expect("scan");
    for p in &all[..2] {
        assert_eq!(
            store.redis.get(&p.program_id).await.expect("get"),
            StoredProgram::Present(match &stored[&p.program_id] {
                Entry::Present(p) => p.clone(),
                e => panic!("{e:?}"),
            }),
            "restored at the table's version"
        );
    }
    assert_eq!(
        store.redis.get(&id("third")).await.expect("get"),
        StoredProgram::Deleted { version: tomb }
    );
    assert!(matches!(
        store.redis.get(&id("only-in-redis")).await.expect("get"),
        StoredProgram::Deleted { .. }
    ));
    // Every change was published, so running trackers apply it.
    let mut announced: HashMap<String, u64> = HashMap::new();
    for _ in 0..4 {
        let msg = messages.next().await.expect("message");
        let change = ProgramChange::parse(msg.get_payload_bytes()).expect("parses");
        announced.insert(change.program_id().to_string(), change.version());
    }
    assert_eq!(announced.len(), 4, "{announced:?}");

    // In step: nothing to do.
    let again = store.sync(true).await.expect("sync");
    assert_eq!(
        (
            again.written,
            again.deleted,
            again.pruned,
            again.redis_was_incomplete
        ),
        (0, 0, 0, false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_table_never_prunes_redis() {
    let stack = Stack::start(1).expect("stack");
    let redis_only = RedisPrograms::connect(&stack.redis.url(), Counter::Create)
        .await
        .expect("redis");
    redis_only.load_atomic(&reference()).await.expect("load");
    let store = programs(&stack).await;
    let report = store.sync(true).await.expect("sync");
    assert_eq!(
        (report.table_items, report.pruned, report.only_in_redis),
        (0, 0, 2)
    );
    assert!(matches!(
        store.redis.get(&id("212312")).await.expect("get"),
        StoredProgram::Present(_)
    ));
}

struct Cli<'a> {
    stack: &'a Stack,
    dir: tempfile::TempDir,
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> Output {
        adtrack_testkit::command(&binary("updater"))
            .envs(self.stack.env())
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run updater")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "updater {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.dir.path().join(name), text).expect("write");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_export_diff_prune_list_and_dry_run_through_the_binary() {
    let stack = Stack::start(1).expect("stack");
    let cli = Cli {
        stack: &stack,
        dir: tempfile::tempdir().expect("tmp"),
    };
    cli.write("reference.json", REFERENCE);
    let t = table(&stack);

    // A dry run writes nothing.
    let out = cli.ok(&["--dry-run", "load", "reference.json"]);
    assert!(out.contains("2 to add, 0 to change, 0 unchanged"), "{out}");
    assert!(t.scan_all().await.expect("scan").is_empty());
    cli.ok(&["load", "reference.json"]);
    assert_eq!(t.scan_all().await.expect("scan").len(), 2);

    // What export prints, load takes back unchanged.
    let exported = cli.ok(&["export"]);
    assert_eq!(exported.lines().count(), 2, "{exported}");
    cli.write("exported.jsonl", &exported);
    let out = cli.ok(&["load", "exported.jsonl"]);
    assert!(
        out.contains("0 added, 0 changed, 2 unchanged, 0 stale; 0 written to Redis"),
        "{out}"
    );

    // diff names what a load would change and what prune would delete.
    cli.write(
        "next.jsonl",
        concat!(
            r#"{"programId":"212312","programName":"renamed","checksum":"123","customerId":9123,"customerName":"Customer1"}"#,
            "\n",
            r#"{"programId":"new-one","programName":"n","checksum":"1","customerId":1,"customerName":"c"}"#,
            "\n"
        ),
    );
    let out = cli.ok(&["diff", "next.jsonl"]);
    assert!(out.contains("change 212312"), "{out}");
    assert!(out.contains("add new-one"), "{out}");
    assert!(out.contains("prune would delete): 212313"), "{out}");
    let before = t.scan_all().await.expect("scan");

    // prune asks for --yes, and a dry run only lists.
    let out = cli.run(&["prune", "next.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("would delete 212313"));
    let out = cli.ok(&["--dry-run", "prune", "next.jsonl", "--yes"]);
    assert!(out.contains("would delete 212313"), "{out}");
    assert_eq!(t.scan_all().await.expect("scan"), before, "nothing changed");
    cli.ok(&["prune", "next.jsonl", "--yes"]);
    assert!(matches!(
        t.get(&id("212313")).await.expect("get"),
        Some(Entry::Deleted { .. })
    ));
    let out = cli.run(&["get", "212313"]);
    assert_eq!(out.status.code(), Some(4));

    let list = cli.ok(&["list"]);
    let states: Vec<(&str, &str)> = list
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0], f[2])
        })
        .collect();
    assert_eq!(states, vec![("212312", "active"), ("212313", "deleted")]);
    let got = cli.ok(&["get", "212312"]);
    assert!(got.contains(r#""programName":"program1""#), "{got}");
}

// Heavy (the stand-in spends about 0.3 ms of CPU per conditional write):
// `./dev/test` runs it on its own, after the other tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "heavy: run alone by ./dev/test (cargo test -- --ignored)"]
async fn a_file_of_100000_programs_loads_whole_and_one_invalid_record_writes_nothing() {
    const N: usize = 100_000;
    let stack = Stack::start(1).expect("stack");
    let cli = Cli {
        stack: &stack,
        dir: tempfile::tempdir().expect("tmp"),
    };
    let mut lines: String = (0..N)
        .map(|i| {
            format!(
                "{{\"programId\":\"bulk-{i}\",\"programName\":\"Program {i}\",\"checksum\":\"{i}\",\"customerId\":{},\"customerName\":\"Customer\"}}\n",
                i % 5000
            )
        })
        .collect();
    cli.write("valid.jsonl", &lines);
    // One bad record, last in the file: nothing at all is written.
    lines.push_str(r#"{"programId":"bulk-bad","programName":"x","checksum":"1","customerId":"many","customerName":"c"}"#);
    cli.write("invalid.jsonl", &lines);
    let out = cli.run(&["load", "invalid.jsonl"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "record {} (programId bulk-bad): field `customerId`",
            N + 1
        )),
        "{stderr}"
    );
    let t = table(&stack);
    assert!(
        t.scan_all().await.expect("scan").is_empty(),
        "the table got writes"
    );
    let store = programs(&stack).await;
    assert!(store.redis.all_versions().await.expect("redis").is_empty());

    let out = cli.ok(&["load", "valid.jsonl"]);
    assert!(out.contains(&format!("{N} added")), "{out}");
    assert_eq!(t.scan_all().await.expect("scan").len(), N);
    assert_eq!(store.redis.all_versions().await.expect("redis").len(), N);
    // Idempotent: a second run finds everything in place.
    let out = cli.ok(&["load", "valid.jsonl"]);
    assert!(
        out.contains(&format!("0 added, 0 changed, {N} unchanged")),
        "{out}"
    );
}
