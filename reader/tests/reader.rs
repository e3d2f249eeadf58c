//! adtrack's Kinesis reader on the real Kinesis and DynamoDB stand-ins,
//! with a handler that records what it is handed: every record once and in
//! shard order, a restart resuming after the checkpoint, a page the handler
//! did not finish handed over again from the first record not done, reshard
//! order (a child only after its parents, both parents of a merge), and
//! lease writes refused once a lease has expired.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use adtrack_reader::{Handler, Leases, Reader, Record, Settings, StartPosition};
use adtrack_testkit::{
    CHECKPOINT_TABLE, EVENTS_STREAM, Stack, dynamodb_client, kinesis_client, wait_until,
};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One record as the handler saw it, with its place in the order of
/// handling across all shards.
#[derive(Debug, Clone)]
struct Seen {
    order: usize,
    shard: String,
    sequence: String,
    data: String,
}

/// Records everything; when `cut_once` is set, answers only half of the
/// first page of two or more records as done (as a handler stopped mid-page
/// does).
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<Seen>>,
    next: AtomicUsize,
    cut_once: AtomicBool,
}

impl Handler for Recorder {
    async fn handle(&self, records: &[Record], _stop: &CancellationToken) -> usize {
        let done = if records.len() >= 2 && self.cut_once.swap(false, Ordering::SeqCst) {
            records.len() / 2
        } else {
            records.len()
        };
        let mut seen = self.seen.lock().expect("lock");
        for r in &records[..done] {
            seen.push(Seen {
                order: self.next.fetch_add(1, Ordering::SeqCst),
                shard: r.shard_id.clone(),
                sequence: r.sequence_number.clone(),
                data: String::from_utf8_lossy(&r.data).into_owned(),
            });
        }
        done
    }
}

struct Running {
    reader: Arc<Reader<Recorder>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    fn start(stack: &Stack, recorder: Recorder) -> Self {
        let settings = Settings {
            stream: EVENTS_STREAM.to_owned(),
            checkpoint_table: CHECKPOINT_TABLE.to_owned(),
            lease_duration: Duration::from_secs(3),
            poll_interval: Duration::from_millis(200),
            max_records: 100,
            start_position: StartPosition::TrimHorizon,
            metric_prefix: "adtrack_reader_test",
        };
        let reader = Arc::new(Reader::new(
            kinesis_client(&stack.kinesis.url()),
            dynamodb_client(&stack.dynamodb.url()),
            adtrack_reader::owner_name("test"),
            settings,
            recorder,
        ));
        let stop = CancellationToken::new();
        let task = tokio::spawn(reader.clone().run(stop.clone()));
        Self { reader, stop, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.reader.handler().seen.lock().expect("lock").clone()
    }

    async fn wait_for(&self, what: &str, n: usize) {
        wait_until(what, Duration::from_secs(60), || async {
            self.seen().len() >= n
        })
        .await;
    }

    async fn stop(self) -> Vec<Seen> {
        self.stop.cancel();
        let Self { reader, task, .. } = self;
        task.await.expect("reader task");
        reader.handler().seen.lock().expect("lock").clone()
    }
}

/// Puts `n` records `{prefix}-{i}` with varied partition keys.
async fn put(stack: &Stack, prefix: &str, n: usize) {
    let client = kinesis_client(&stack.kinesis.url());
    let entries: Vec<PutRecordsRequestEntry> = (0..n)
        .map(|i| {
            PutRecordsRequestEntry::builder()
                .data(Blob::new(format!("{prefix}-{i}")))
                .partition_key(format!("key-{prefix}-{i}"))
                .build()
                .expect("entry")
        })
        .collect();
    for chunk in entries.chunks(500) {
        let out = client
            .put_records()
            .stream_name(EVENTS_STREAM)
            .set_records(Some(chunk.to_vec()))
            .send()
            .await
            .expect("put");
        assert_eq!(out.failed_record_count, Some(0));
    }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Each record seen once, and each shard's records in sequence order.
fn assert_once_in_order(seen: &[Seen], expected: &[String]) {
    let got: Vec<&str> = seen.iter().map(|s| s.data.as_str()).collect();
    let distinct: HashSet<&str> = got.iter().copied().collect();
    assert_eq!(distinct.len(), got.len(), "a record was handled twice");
    let want: HashSet<&str> = expected.iter().map(String::as_str).collect();
    let mut missing: Vec<&str> = want.difference(&distinct).copied().collect();
    let mut unexpected: Vec<&str> = distinct.difference(&want).copied().collect();
    missing.sort();
    unexpected.sort();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "{} put but not handled (first: {:?}); {} handled but not put now (first: {:?})",
        missing.len(),
        &missing[..missing.len().min(5)],
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)],
    );
    // Sequence numbers are decimal strings of up to 128 digits.
    let mut by_shard: HashMap<&str, Vec<(usize, &str)>> = HashMap::new();
    for s in seen {
        by_shard
            .entry(&s.shard)
            .or_default()
            .push((s.sequence.len(), &s.sequence));
    }
    for (shard, seqs) in by_shard {
        assert!(seqs.is_sorted(), "shard {shard} handled out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_once_in_order_and_a_restart_resumes_after_the_checkpoint() {
    let stack = Stack::start(2).expect("stack");
    put(&stack, "first", 300).await;
    let run = Running::start(&stack, Recorder::default());
    run.wait_for("the first records", 300).await;
    let first = run.stop().await;
    assert_once_in_order(&first, &names("first", 300));
    let shards: HashSet<&str> = first.iter().map(|s| s.shard.as_str()).collect();
    assert_eq!(shards.len(), 2, "both shards read");

    put(&stack, "second", 100).await;
    let run = Running::start(&stack, Recorder::default());
    run.wait_for("the second records", 100).await;
    // Give a reader that ignored its checkpoint time to hand the first
    // records over again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = run.stop().await;
    assert_once_in_order(&second, &names("second", 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_not_finished_is_handed_over_again_from_the_first_record_not_done() {
    let stack = Stack::start(1).expect("stack");
    put(&stack, "rec", 200).await;
    let recorder = Recorder::default();
    recorder.cut_once.store(true, Ordering::SeqCst);
    let run = Running::start(&stack, recorder);
    run.wait_for("every record", 200).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let seen = run.stop().await;
    // Half of the first page was not done: it comes again, and the half
    // that was done does not.
    assert_once_in_order(&seen, &names("rec", 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_shard_is_read_only_after_its_parents_are_read_to_their_end() {
    let stack = Stack::start(1).expect("stack");
    put(&stack, "parent", 150).await;
    // Split, then merge the two children: the merged shard has two parents.
    // Records go to every generation before the reader starts, so it could
    // read them in any order.
    adtrack_testkit::split_first_shard(&stack.kinesis.url()).await;
    put(&stack, "child", 300).await;
    adtrack_testkit::merge_split_children(&stack.kinesis.url()).await;
    put(&stack, "merged", 150).await;

    let run = Running::start(&stack, Recorder::default());
    run.wait_for("every generation", 600).await;
    let seen = run.stop().await;
    let mut expected = names("parent", 150);
    expected.extend(names("child", 300));
    expected.extend(names("merged", 150));
    assert_once_in_order(&seen, &expected);

    let span = |shard: &str| {
        let orders: Vec<usize> = seen
            .iter()
            .filter(|s| s.shard == shard)
            .map(|s| s.order)
            .collect();
        assert!(!orders.is_empty(), "{shard} had records");
        (
            *orders.iter().min().expect("min"),
            *orders.iter().max().expect("max"),
        )
    };
    let parent = span("shardId-000000000000");
    let (left, right) = (span("shardId-000000000001"), span("shardId-000000000002"));
    let merged = span("shardId-000000000003");
    assert!(left.0 > parent.1, "a split child before its parent's end");
    assert!(right.0 > parent.1, "a split child before its parent's end");
    assert!(
        merged.0 > left.1 && merged.0 > right.1,
        "the merged shard before both its parents' ends"
    );
}

/// Every write by a lease's holder needs the lease unexpired: a poller that
/// stalled past its lease cannot checkpoint or renew, even while no other
/// poller has taken the shard yet; it must acquire it again (and then reads
/// its checkpoint back with one consistent GetItem).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_under_an_expired_lease_are_refused() {
    let stack = Stack::start(1).expect("stack");
    let ddb = dynamodb_client(&stack.dynamodb.url());
    let leases = |owner: &str| {
        Leases::new(
            ddb.clone(),
            CHECKPOINT_TABLE.to_owned(),
            "lease-test".to_owned(),
            owner.to_owned(),
            Duration::from_secs(60),
        )
    };
    let (a, b) = (leases("a"), leases("b"));
    let shard = "shardId-000000000000";
    assert!(a.acquire(shard).await.expect("acquire"));
    assert!(a.checkpoint(shard, "100").await.expect("checkpoint"));
    assert_eq!(
        a.read_checkpoint(shard).await.expect("read").as_deref(),
        Some("100")
    );
    assert!(!b.acquire(shard).await.expect("acquire"), "held by a");
    assert!(
        !b.checkpoint(shard, "999").await.expect("checkpoint"),
        "not b's"
    );

    // a's lease runs out (it stalled) while it is still named the owner.
    ddb.update_item()
        .table_name(CHECKPOINT_TABLE)
        .key("shardKey", AttributeValue::S(format!("lease-test/{shard}")))
        .update_expression("SET leaseExpiresAt = :past")
        .expression_attribute_values(":past", AttributeValue::N("1".into()))
        .send()
        .await
        .expect("expire the lease");
    assert!(
        !a.checkpoint(shard, "200").await.expect("checkpoint"),
        "expired"
    );
    assert!(!a.renew(shard).await.expect("renew"), "expired");
    assert_eq!(
        a.read_checkpoint(shard).await.expect("read").as_deref(),
        Some("100")
    );

    // Acquired again (by anyone), the lease takes writes again.
    assert!(b.acquire(shard).await.expect("acquire"));
    assert!(
        !a.checkpoint(shard, "200").await.expect("checkpoint"),
        "now b's"
    );
    assert!(b.checkpoint(shard, "300").await.expect("checkpoint"));
    assert_eq!(
        b.read_checkpoint(shard).await.expect("read").as_deref(),
        Some("300")
    );
    assert_eq!(b.read_checkpoint("shardId-none").await.expect("read"), None);
}
