//! The core-data stream end to end on the real stand-ins: records put on
//! the stream with the AWS SDK reach a running tracker through `updater
//! stream` (programs table, then Redis and its PUBLISH); a malformed record
//! is dead-lettered and the next record still applies; a delete turns hits
//! into 404; a customer record switches a customer's programs off and its
//! deletion on again; reading the whole stream again changes nothing; and records
//! put by boto3 (an operator's own producer) apply the same way.

mod support;

use std::time::Duration;

use adtrack_proto::program::{ProgramId, parse_program_file};
use adtrack_testkit::{
    CHECKPOINT_TABLE, CORE_DATA_STREAM, DEAD_LETTER_TABLE, Http, PROGRAMS_TABLE, Proc, Stack,
    attr_s, binary, dynamodb_client, kinesis_client, scan_table,
};
use adtrack_updater::{Counter, Entry, ProgramTable, Programs, RedisPrograms};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use support::{PROGRAMS, Tracker, wait_status, wait_until};

async fn put_record(stack: &Stack, data: &str) {
    kinesis_client(&stack.kinesis.url())
        .put_record()
        .stream_name(CORE_DATA_STREAM)
        .partition_key("core-data")
        .data(Blob::new(data.as_bytes()))
        .send()
        .await
        .expect("put a core-data record");
}

fn stream_updater(stack: &Stack) -> Proc {
    Proc::new(
        adtrack_testkit::command(&binary("updater"))
            .envs(stack.env())
            .env("UPDATER_LEASE_SECS", "3")
            .arg("stream")
            .spawn()
            .expect("spawn updater stream"),
    )
}

async fn dead_letters(stack: &Stack) -> Vec<std::collections::HashMap<String, AttributeValue>> {
    scan_table(&dynamodb_client(&stack.dynamodb.url()), DEAD_LETTER_TABLE)
        .await
        .expect("scan")
}

/// The reference programs loaded into the table and Redis; the store back.
/// Records put afterwards take their arrival (milliseconds x 1000) as their
/// version, so the load's microsecond versions must fall in an earlier
/// millisecond: it waits that out.
async fn load_reference(stack: &Stack) -> Programs {
    let store = Programs::new(
        ProgramTable::new(dynamodb_client(&stack.dynamodb.url()), PROGRAMS_TABLE),
        RedisPrograms::connect(&stack.redis.url(), Counter::KeepIfPresent)
            .await
            .expect("redis"),
    );
    store
        .load(&parse_program_file(PROGRAMS).expect("programs"))
        .await
        .expect("load");
    tokio::time::sleep(Duration::from_millis(2)).await;
    store
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_data_records_reach_a_running_tracker_and_bad_ones_never_block_the_next() {
    let stack = Stack::start(1).expect("stack");
    let table = load_reference(&stack).await.table;
    let tracker = Tracker::start(&stack, &[]).await;
    let mut updater = stream_updater(&stack);
    let http = Http::new();

    // A new program, in the operators' format, as any producer puts it.
    put_record(
        &stack,
        r#"{"programId":"streamed","programName":"from the stream","checksum":"7","customerId":"42","customerName":"Streamer","valid":true}"#,
    )
    .await;
    wait_status(&http, &tracker.url("/event/streamed"), 200).await;

    // A malformed record, then a change: the change still applies.
    put_record(&stack, r#"{"programId":"streamed","programName":"#).await;
    put_record(
        &stack,
        r#"{"programId":"streamed","programName":"from the stream","checksum":"7","customerId":"42","customerName":"Streamer","valid":false}"#,
    )
    .await;
    wait_status(&http, &tracker.url("/event/streamed"), 404).await;
    let dead = dead_letters(&stack).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(
        attr_s(&dead[0], "reason").contains("not a JSON object"),
        "{dead:?}"
    );
    assert_eq!(attr_s(&dead[0], "stream"), CORE_DATA_STREAM);

    // A delete on the stream turns hits into 404, and leaves a tombstone.
    put_record(&stack, r#"{"op":"delete","programId":"212312"}"#).await;
    wait_status(&http, &tracker.url("/event/212312"), 404).await;
    let id = |s: &str| ProgramId::parse(s).expect("id");
    assert!(matches!(
        table.get(&id("212312")).await.expect("get"),
        Some(Entry::Deleted { .. })
    ));
    // A record the validation refuses is dead-lettered too.
    put_record(&stack, r#"{"op":"upsert","programId":"x"}"#).await;
    put_record(
        &stack,
        r#"{"programId":"after-bad","programName":"n","checksum":"1","customerId":1,"customerName":"c"}"#,
    )
    .await;
    wait_status(&http, &tracker.url("/event/after-bad"), 200).await;
    assert_eq!(dead_letters(&stack).await.len(), 2);

    // A customer record switches every program of customer 9124 off; its
    // deletion switches them back on.
    put_record(
        &stack,
        r#"{"op":"customer","customerId":"9124","enabled":false}"#,
    )
    .await;
    wait_status(&http, &tracker.url("/event/212313"), 404).await;
    put_record(&stack, r#"{"op":"delete","customerId":9124}"#).await;
    wait_status(&http, &tracker.url("/event/212313"), 200).await;

    // Read everything again (as after a lost checkpoint): records without a
    // version take it from their arrival, so nothing changes.
    let before = table.scan_all().await.expect("scan");
    updater.kill();
    let ddb = dynamodb_client(&stack.dynamodb.url());
    ddb.delete_item()
        .table_name(CHECKPOINT_TABLE)
        .key(
            "shardKey",
            AttributeValue::S(format!("{CORE_DATA_STREAM}/shardId-000000000000")),
        )
        .send()
        .await
        .expect("forget the checkpoint");
    let _updater = stream_updater(&stack);
    wait_until(
        "the stream read again to its tip",
        Duration::from_secs(60),
        || async {
            ddb.get_item()
                .table_name(CHECKPOINT_TABLE)
                .key(
                    "shardKey",
                    AttributeValue::S(format!("{CORE_DATA_STREAM}/shardId-000000000000")),
                )
                .consistent_read(true)
                .send()
                .await
                .ok()
                .and_then(|o| o.item)
                .is_some_and(|i| i.contains_key("sequenceNumber"))
        },
    )
    .await;
    // The checkpoint moves after the last record's page is applied.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        table.scan_all().await.expect("scan"),
        before,
        "a replayed record changed the table"
    );
    assert_eq!(
        dead_letters(&stack).await.len(),
        2,
        "one dead letter per record"
    );
    assert_eq!(
        http.get(&tracker.url("/event/212312"))
            .await
            .expect("get")
            .status,
        404
    );
    assert_eq!(
        http.get(&tracker.url("/event/212313"))
            .await
            .expect("get")
            .status,
        200,
        "a replayed customer record switched the customer off again"
    );
}

/// An operator's own producer puts core-data records with boto3 (the AWS
/// SDK for Python, from `dev/requirements-test.txt`): a PutRecords batch of
/// two programs and a delete, as a script of theirs would, reaches a
/// running tracker through `updater stream`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_put_with_boto3_reach_a_running_tracker() {
    let python = std::env::var("ADTRACK_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let stack = Stack::start(1).expect("stack");
    load_reference(&stack).await;
    let tracker = Tracker::start(&stack, &[]).await;
    let _updater = stream_updater(&stack);
    let http = Http::new();

    let producer = r#"
import json, os, sys
import boto3
kinesis = boto3.client("kinesis", endpoint_url=sys.argv[1], region_name=os.environ["AWS_REGION"])
programs = [
    {"programId": "boto-1", "programName": "first", "checksum": "1",
     "customerId": "7", "customerName": "Operator", "valid": True},
    {"programId": "boto-2", "programName": "second", "checksum": "2",
     "customerId": "7", "customerName": "Operator", "valid": True},
]
answer = kinesis.put_records(StreamName=sys.argv[2], Records=[
    {"Data": json.dumps(p).encode(), "PartitionKey": "core-data"} for p in programs
])
assert answer["FailedRecordCount"] == 0, answer
kinesis.put_record(StreamName=sys.argv[2], PartitionKey="core-data",
                   Data=json.dumps({"op": "delete", "programId": "212312"}).encode())
print("put", len(programs) + 1)
"#;
    let out = std::process::Command::new(&python)
        .args(["-c", producer, &stack.kinesis.url(), CORE_DATA_STREAM])
        .envs(stack.env())
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e} (./dev/test sets ADTRACK_TEST_PYTHON)"));
    assert!(
        out.status.success(),
        "the boto3 producer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_status(&http, &tracker.url("/event/boto-1"), 200).await;
    wait_status(&http, &tracker.url("/event/boto-2"), 200).await;
    wait_status(&http, &tracker.url("/event/212312"), 404).await;
    assert!(
        dead_letters(&stack).await.is_empty(),
        "nothing dead-lettered"
    );
}
