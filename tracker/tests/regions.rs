//! Two regions fed from one programs table, as with a DynamoDB global
//! table: each region has its own Redis, its own `updater sync --watch` and
//! its own tracker. A write made in one region (table first, then that
//! region's Redis) reaches the other region's tracker through that region's
//! sync; so does a delete; and a region whose Redis lost its data is
//! restored by its own sync while its tracker keeps serving.

mod support;

use std::time::Duration;

use adtrack_proto::program::{ProgramId, parse_program_file};
use adtrack_testkit::{Http, PROGRAMS_TABLE, Proc, Redis, Stack, binary, dynamodb_client};
use adtrack_updater::{Counter, ProgramTable, Programs, RedisPrograms};
use support::{PROGRAMS, Tracker, wait_status};

fn sync(stack: &Stack, redis_url: &str) -> Proc {
    Proc::new(
        adtrack_testkit::command(&binary("updater"))
            .envs(stack.env())
            .env("REDIS_URL", redis_url)
            .env("RUST_LOG", "warn")
            .args(["sync", "--watch", "--prune"])
            .args(["--check-every-ms", "200", "--full-every-secs", "1"])
            .spawn()
            .expect("spawn updater sync"),
    )
}

async fn store(stack: &Stack, redis_url: &str) -> Programs {
    Programs::new(
        ProgramTable::new(dynamodb_client(&stack.dynamodb.url()), PROGRAMS_TABLE),
        RedisPrograms::connect(redis_url, Counter::KeepIfPresent)
            .await
            .expect("redis"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_each_fill_their_own_redis_from_one_table() {
    let stack = Stack::start(1).expect("stack");
    let other_redis = Redis::start().expect("the other region's Redis");
    let (here, there) = (stack.redis.url(), other_redis.url());
    let home = store(&stack, &here).await;
    home.load(&parse_program_file(PROGRAMS).expect("programs"))
        .await
        .expect("load");

    let _sync_here = sync(&stack, &here);
    let _sync_there = sync(&stack, &there);
    // Each tracker becomes ready once its own region's sync has filled its
    // Redis.
    let tracker_here = Tracker::start(&stack, &[]).await;
    let tracker_there = Tracker::start(&stack, &[("REDIS_URL", &there)]).await;
    let http = Http::new();
    for t in [&tracker_here, &tracker_there] {
        wait_status(&http, &t.url("/event/212312"), 200).await;
        wait_status(&http, &t.url("/event/no-such-program"), 404).await;
    }

    // A program written in this region reaches the other region's tracker.
    let program = parse_program_file(
        r#"[{"programId":"regional","programName":"r","checksum":"1","customerId":1,"customerName":"c"}]"#,
    )
    .expect("valid");
    home.put(&program[0]).await.expect("put");
    wait_status(&http, &tracker_here.url("/event/regional"), 200).await;
    wait_status(&http, &tracker_there.url("/event/regional"), 200).await;

    // So does a delete.
    home.delete(&ProgramId::parse("212312").expect("id"))
        .await
        .expect("delete");
    wait_status(&http, &tracker_there.url("/event/212312"), 404).await;

    // The other region's Redis loses its data: its sync restores it, and
    // its tracker keeps serving meanwhile.
    other_redis.flushall();
    assert_eq!(
        http.get(&tracker_there.url("/event/regional"))
            .await
            .expect("get")
            .status,
        200
    );
    let there_store = RedisPrograms::connect(&there, Counter::KeepIfPresent)
        .await
        .expect("redis");
    support::wait_until(
        "the other region's Redis restored",
        Duration::from_secs(20),
        || async { there_store.is_complete().await.unwrap_or(false) },
    )
    .await;
    let held = there_store.all_versions().await.expect("versions");
    assert!(held.contains_key(&ProgramId::parse("regional").expect("id")));
    wait_status(&http, &tracker_there.url("/event/212312"), 404).await;
}
