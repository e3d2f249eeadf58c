//! The updater Lambda's handler on real Redis and the DynamoDB stand-in,
//! fed Kinesis events as the event source mapping delivers them: a batch
//! is applied in order through the table and Redis, a bad record is
//! dead-lettered without stopping the ones after it, a retried batch
//! changes nothing, and a record the store cannot take (Redis down) is
//! named in the partial batch response and applied when retried; and the
//! same from the real `bootstrap` binary through the Lambda runtime API.

use adtrack_proto::program::{ProgramId, parse_program_file};
use adtrack_proto::redis_layout::{StoredCustomer, StoredProgram};
use adtrack_reader::lambda::KinesisBatch;
use adtrack_testkit::{
    CORE_DATA_STREAM, CUSTOMERS_TABLE, DEAD_LETTER_TABLE, LambdaRuntime, PROGRAMS_TABLE, Stack,
    binary, dynamodb_client, dynamodb_client_as, lambda_kinesis_event, lambda_kinesis_event_json,
    scan_table,
};
use adtrack_updater::lambda::{LAMBDA_ATTEMPTS, handle};
use adtrack_updater::stream::CoreData;
use adtrack_updater::{Counter, CustomerTable, Entry, ProgramTable, Programs, RedisPrograms};

const REFERENCE: &str = r#"[{"programId":"212312","programName":"program1","checksum":"123","customerId":"9123","customerName":"Customer1","valid":true}]"#;

fn id(s: &str) -> ProgramId {
    ProgramId::parse(s).expect("id")
}

async fn core_data(stack: &Stack) -> CoreData {
    let redis = RedisPrograms::connect(&stack.redis.url(), Counter::KeepIfPresent)
        .await
        .expect("redis");
    // Calling as the Lambda does, so its calls count as the Lambda's.
    let dynamodb = dynamodb_client_as(&stack.dynamodb.url(), "adtrack-updater-lambda");
    CoreData {
        store: Programs::new(ProgramTable::new(dynamodb.clone(), PROGRAMS_TABLE), redis)
            .with_customers(CustomerTable::new(dynamodb.clone(), CUSTOMERS_TABLE)),
        dynamodb,
        stream: CORE_DATA_STREAM.into(),
        dead_letter_table: DEAD_LETTER_TABLE.into(),
        max_attempts: LAMBDA_ATTEMPTS,
    }
}

fn failures(r: &aws_lambda_events::event::streams::KinesisEventResponse) -> Vec<String> {
    r.batch_item_failures
        .iter()
        .filter_map(|f| f.item_identifier.clone())
        .collect()
}

async fn name_in_redis(core: &CoreData, program: &str) -> Option<String> {
    match core.store.redis.get(&id(program)).await.expect("redis get") {
        StoredProgram::Present(p) => Some(p.program_name),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lambda_applies_dead_letters_and_reports_the_first_record_it_could_not_apply() {
    let mut stack = Stack::start(1).expect("stack");
    let core = core_data(&stack).await;
    // Set up and look through a store of the test's own, so what the
    // Lambda's client calls is only what the handler calls.
    let store = Programs::new(
        ProgramTable::new(dynamodb_client(&stack.dynamodb.url()), PROGRAMS_TABLE),
        RedisPrograms::connect(&stack.redis.url(), Counter::KeepIfPresent)
            .await
            .expect("redis"),
    );
    store
        .load(&parse_program_file(REFERENCE).expect("valid"))
        .await
        .expect("load");
    // Records without a version take their arrival time (in milliseconds)
    // as one: the batch must arrive in a later millisecond than the load
    // wrote its version (microseconds of the wall clock), or the delete
    // below would be older than the program it deletes (and rightly
    // ignored). Waited for on the wall clock itself, not a timer.
    let Some(Entry::Present(loaded)) = store.table.get(&id("212312")).await.expect("get") else {
        panic!("212312 is not in the table")
    };
    let now_us = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    };
    while now_us() < loaded.version + 2_000 {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }

    let batch: KinesisBatch = lambda_kinesis_event(
        CORE_DATA_STREAM,
        &[
            ("1", br#"{"programId":"lam","programName":"first","checksum":"1","customerId":7,"customerName":"c"}"#),
            ("2", br#"{"programId":"lam","programName":"#),
            ("3", br#"{"op":"delete","programId":"212312"}"#),
            ("4", br#"{"programId":"lam","programName":"second","checksum":"1","customerId":7,"customerName":"c"}"#),
            ("5", br#"{"op":"customer","customerId":7,"enabled":false}"#),
        ],
    );
    let response = handle(&core, batch.clone()).await;
    assert!(failures(&response).is_empty(), "{response:?}");
    // A customer record: in the customers table and in Redis (published).
    let switched_off = core
        .store
        .customer_table()
        .expect("customers table")
        .get(&7)
        .await
        .expect("get customer");
    assert!(
        matches!(&switched_off, Some(Entry::Present(c)) if !c.enabled),
        "{switched_off:?}"
    );
    assert!(matches!(
        core.store.redis.get_customer(7).await.expect("redis"),
        StoredCustomer::Present(c) if !c.enabled
    ));
    let Some(Entry::Present(lam)) = store.table.get(&id("lam")).await.expect("get") else {
        panic!("lam is not in the table")
    };
    assert_eq!(lam.program_name, "second", "records apply in order");
    assert_eq!(name_in_redis(&core, "lam").await.as_deref(), Some("second"));
    let entry = store.table.get(&id("212312")).await.expect("get");
    assert!(
        matches!(entry, Some(Entry::Deleted { .. })),
        "{entry:?} {response:?} loaded {} arrivals {:?}",
        loaded.version,
        adtrack_reader::lambda::records(batch.clone())
            .iter()
            .map(|r| r.arrival_ms)
            .collect::<Vec<_>>()
    );
    assert!(matches!(
        core.store.redis.get(&id("212312")).await.expect("get"),
        StoredProgram::Deleted { .. }
    ));
    let dynamodb = dynamodb_client(&stack.dynamodb.url());
    let dead = scan_table(&dynamodb, DEAD_LETTER_TABLE)
        .await
        .expect("scan");
    assert_eq!(dead.len(), 1, "the malformed record is dead-lettered");

    // Lambda retries a batch as it was: nothing changes the second time.
    let response = handle(&core, batch).await;
    assert!(failures(&response).is_empty(), "{response:?}");
    let Some(Entry::Present(again)) = store.table.get(&id("lam")).await.expect("get") else {
        panic!("lam is gone")
    };
    assert_eq!(
        again.version, lam.version,
        "a retried batch writes nothing new"
    );
    assert_eq!(
        scan_table(&dynamodb, DEAD_LETTER_TABLE)
            .await
            .expect("scan")
            .len(),
        1,
        "a retried bad record is the same dead letter"
    );

    // Redis down: the record is not done, and the response says so.
    stack.redis.stop();
    let later: KinesisBatch = lambda_kinesis_event(
        CORE_DATA_STREAM,
        &[(
            "5",
            br#"{"programId":"later","programName":"later","checksum":"1","customerId":7,"customerName":"c"}"#,
        )],
    );
    let response = handle(&core, later.clone()).await;
    assert_eq!(failures(&response), vec!["5".to_owned()]);

    // Lambda retries it once Redis is back (empty, as after a failover):
    // the same warm handler reconnects and applies it.
    stack.redis.restart().expect("redis back");
    let response = handle(&core, later).await;
    assert!(failures(&response).is_empty(), "{response:?}");
    assert_eq!(
        name_in_redis(&core, "later").await.as_deref(),
        Some("later")
    );
}

/// The real `updater-lambda` binary (deployed as `bootstrap`) as Lambda runs
/// it, through a runtime API emulator: a batch is applied and its bad record
/// dead-lettered, a record the store cannot take (Redis down) is named in
/// the partial batch response on the wire, and the retried record is
/// applied once Redis is back, by the same warm process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_binary_answers_through_the_lambda_runtime_api() {
    let mut stack = Stack::start(1).expect("stack");
    let redis_url = stack.redis.url();
    let dynamodb_url = stack.dynamodb.url();
    let lambda = LambdaRuntime::start(
        &binary("updater-lambda"),
        &[
            ("AWS_ENDPOINT_URL_DYNAMODB", dynamodb_url.as_str()),
            ("REDIS_URL", redis_url.as_str()),
            ("PROGRAMS_TABLE", PROGRAMS_TABLE),
            ("CORE_DATA_STREAM", CORE_DATA_STREAM),
            ("DEAD_LETTER_TABLE", DEAD_LETTER_TABLE),
        ],
    )
    .expect("the function under the runtime emulator");
    // A fresh connection each time: Redis is restarted below.
    let in_redis = async |program: &str| {
        let redis = RedisPrograms::connect(&redis_url, Counter::KeepIfPresent)
            .await
            .expect("redis");
        match redis.get(&id(program)).await.expect("redis get") {
            StoredProgram::Present(p) => Some(p.program_name),
            _ => None,
        }
    };

    let batch = lambda_kinesis_event_json(
        CORE_DATA_STREAM,
        &[
            ("1", br#"{"programId":"wire","programName":"first","checksum":"1","customerId":7,"customerName":"c"}"#),
            ("2", br#"{"programId":"wire","programName":"#),
        ],
    );
    let (status, answer) = lambda.invoke(&batch).await.expect("invoke");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        serde_json::json!({"batchItemFailures": []}),
        "output: {}",
        lambda.output()
    );
    assert_eq!(in_redis("wire").await.as_deref(), Some("first"));
    let dead = scan_table(&dynamodb_client(&dynamodb_url), DEAD_LETTER_TABLE)
        .await
        .expect("scan");
    assert_eq!(dead.len(), 1, "the malformed record is dead-lettered");

    stack.redis.stop();
    let later = lambda_kinesis_event_json(
        CORE_DATA_STREAM,
        &[(
            "3",
            br#"{"programId":"later","programName":"later","checksum":"1","customerId":7,"customerName":"c"}"#,
        )],
    );
    let (status, answer) = lambda.invoke(&later).await.expect("invoke");
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": "3"}]}),
        "output: {}",
        lambda.output()
    );

    stack.redis.restart().expect("redis back");
    let (_, answer) = lambda.invoke(&later).await.expect("invoke");
    assert_eq!(answer, serde_json::json!({"batchItemFailures": []}));
    assert_eq!(in_redis("later").await.as_deref(), Some("later"));

    let output = lambda.output();
    let emf = lambda.emf_documents();
    assert!(
        emf.iter().all(|d| d["Function"] == "updater-lambda"),
        "{output}"
    );
    let invocations: std::collections::HashSet<&str> =
        emf.iter().filter_map(|d| d["RequestId"].as_str()).collect();
    assert_eq!(invocations.len(), 3, "metrics of each invocation: {output}");
    assert!(
        emf.iter()
            .any(|d| d["outcome"] == "dead_lettered" && d["adtrack_updater_records"] == 1),
        "{output}"
    );
}
