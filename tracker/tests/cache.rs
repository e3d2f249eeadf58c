//! The validation cache against a real redis-server: stale pushes ignored,
//! resync after a Redis restart, the negative cache, Redis down (`unverified`),
//! readiness before warm-up and during drain.

mod support;

use std::time::Duration;

use adtrack_proto::program::{Program, parse_program_file};
use adtrack_proto::redis_layout::CHANGES_CHANNEL;
use adtrack_proto::v1::TrackingEvent;
use adtrack_testkit::{Http, Stack, TcpProxy, metric_sum, read_stream_events};
use adtrack_updater::{Counter, RedisPrograms};
use prost::Message;
use support::{PROGRAMS, Tracker, load_programs, redis_cmd, wait_status, wait_until};

fn program(json: serde_json::Value) -> Program {
    Program::from_json(&json).expect("program")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_pushes_are_ignored() {
    let stack = Stack::start(1).expect("stack");
    let _store = load_programs(&stack).await;
    let t = Tracker::start(&stack, &[]).await;
    let http = Http::new();
    assert_eq!(
        http.get(&t.url("/event/212312")).await.expect("get").status,
        200
    );

    // An old message (version 1) that says "disabled" arrives late.
    let stale = r#"{"op":"upsert","version":1,"program":{"programId":"212312","programName":"old","checksum":"1","customerId":1,"customerName":"old","valid":false}}"#;
    redis_cmd(&stack.redis.url(), &["PUBLISH", CHANGES_CHANNEL, stale]).await;
    let old_delete = r#"{"op":"delete","version":2,"programId":"212312"}"#;
    redis_cmd(
        &stack.redis.url(),
        &["PUBLISH", CHANGES_CHANNEL, old_delete],
    )
    .await;
    redis_cmd(
        &stack.redis.url(),
        &["PUBLISH", CHANGES_CHANNEL, "not json"],
    )
    .await;
    wait_until("stale changes counted", Duration::from_secs(10), || async {
        let m = t.metrics().await;
        metric_sum(&m, "adtrack_pubsub_changes_total", &["result=\"stale\""]) >= 2.0
            && metric_sum(&m, "adtrack_pubsub_changes_total", &["result=\"invalid\""]) >= 1.0
    })
    .await;
    let r = http.get(&t.url("/event/212312")).await.expect("get");
    assert_eq!(r.status, 200, "a stale change never overwrites a newer one");
    assert_eq!(r.json()["programName"], "program1");
}

/// Writes a program hash straight into Redis, as nothing but a reload or a
/// miss can see it (no version counter moved, nothing published).
async fn write_behind(url: &str, id: &str, name: &str, valid: bool, version: u64) {
    let key = format!("adtrack:program:{id}");
    let version = version.to_string();
    redis_cmd(
        url,
        &[
            "HSET",
            &key,
            "programId",
            id,
            "programName",
            name,
            "checksum",
            "1",
            "customerId",
            "1",
            "customerName",
            "c",
            "valid",
            if valid { "true" } else { "false" },
            "version",
            &version,
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resynchronises_after_redis_restart() {
    let mut stack = Stack::start(1).expect("stack");
    let _ = load_programs(&stack).await;
    let redis_addr = ([127, 0, 0, 1], stack.redis.port).into();
    let proxy = TcpProxy::start(redis_addr).await;
    let t = Tracker::start(&stack, &[("REDIS_URL", &proxy.redis_url())]).await;
    let http = Http::new();
    assert_eq!(
        http.get(&t.url("/event/212312")).await.expect("get").status,
        200
    );

    // The tracker loses Redis; Redis restarts empty and gets new content
    // while the tracker cannot reach it, written without any push: only
    // the reload after the reconnect can bring it in.
    proxy.cut();
    stack.redis.restart().expect("restart redis");
    let url = stack.redis.url();
    write_behind(&url, "212312", "disabled now", false, u64::MAX / 2).await;
    write_behind(&url, "after-restart", "n", true, 1).await;
    proxy.restore();

    wait_status(&http, &t.url("/event/after-restart"), 200).await;
    wait_status(&http, &t.url("/event/212312"), 404).await;
    wait_until("reconnect counted", Duration::from_secs(10), || async {
        metric_sum(&t.metrics().await, "adtrack_pubsub_reconnects_total", &[]) >= 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_never_overwrites_a_newer_push_that_overtook_its_read() {
    let stack = Stack::start(1).expect("stack");
    let store = load_programs(&stack).await;
    let redis_addr = ([127, 0, 0, 1], stack.redis.port).into();
    let proxy = TcpProxy::start(redis_addr).await;
    // A Redis timeout long enough that the held read is still awaited.
    let t = Tracker::start(
        &stack,
        &[
            ("REDIS_URL", &proxy.redis_url()),
            ("TRACKER_REDIS_TIMEOUT_MS", "5000"),
        ],
    )
    .await;
    // The cache's connection is the first the tracker opens, pub/sub's the second.
    assert!(proxy.accepted() >= 2, "both connections open");
    let http = Http::new();

    // Not cached: the first hit misses and reads version 1 from Redis...
    write_behind(&stack.redis.url(), "race", "old", true, 1).await;
    proxy.hold_replies(0);
    let hit = {
        let (http, url) = (http.clone(), t.url("/event/race"));
        tokio::spawn(async move { http.get(&url).await })
    };
    wait_until(
        "the miss's read answered",
        Duration::from_secs(10),
        || async { proxy.held_bytes() > 0 },
    )
    .await;
    // ...and before its answer reaches the tracker, version 2 is pushed.
    let applied = |m: &str| metric_sum(m, "adtrack_pubsub_changes_total", &["result=\"applied\""]);
    let before = applied(&t.metrics().await);
    let mut newer = program(serde_json::json!({
        "programId":"race","programName":"new","checksum":"1","customerId":1,"customerName":"c"
    }));
    newer.version = 2;
    store.put(&newer).await.expect("put");
    wait_until("the push applied", Duration::from_secs(10), || async {
        applied(&t.metrics().await) > before
    })
    .await;
    proxy.release();

    let r = hit.await.expect("task").expect("get");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["programName"],
        "new",
        "the miss answers the newer push"
    );
    let r = http.get(&t.url("/event/race")).await.expect("get");
    assert_eq!(r.json()["programName"], "new", "and the cache keeps it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_drops_vanished_programs_but_not_when_redis_lost_its_data() {
    let stack = Stack::start(1).expect("stack");
    let _store = load_programs(&stack).await;
    let t = Tracker::start(&stack, &[("TRACKER_RECONCILE_SECS", "1")]).await;
    let http = Http::new();
    for id in ["212312", "212313"] {
        assert_eq!(
            http.get(&t.url(&format!("/event/{id}")))
                .await
                .expect("get")
                .status,
            200
        );
    }

    // Removed behind the tracker's back (no tombstone, nothing published):
    // the next reload drops it.
    redis_cmd(&stack.redis.url(), &["DEL", "adtrack:program:212312"]).await;
    wait_status(&http, &t.url("/event/212312"), 404).await;
    assert!(metric_sum(&t.metrics().await, "adtrack_programs_vanished_total", &[]) >= 1.0);

    // Redis loses everything: the tracker keeps serving what it cached.
    redis_cmd(&stack.redis.url(), &["FLUSHALL"]).await;
    let lost = |m: &str| {
        metric_sum(
            m,
            "adtrack_cache_reconciles_total",
            &["result=\"redis_lost_data\""],
        )
    };
    wait_until(
        "a reload finds Redis emptied",
        Duration::from_secs(20),
        || async { lost(&t.metrics().await) >= 1.0 },
    )
    .await;
    let r = http.get(&t.url("/event/212313")).await.expect("get");
    assert_eq!(
        r.status, 200,
        "a cached program outlives Redis losing its data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_are_cached_negatively_then_expire() {
    let stack = Stack::start(1).expect("stack");
    let _ = load_programs(&stack).await;
    // Long enough that the second look below is always inside it.
    let t = Tracker::start(&stack, &[("TRACKER_NEGATIVE_TTL_SECS", "5")]).await;
    let http = Http::new();
    assert_eq!(
        http.get(&t.url("/event/quiet")).await.expect("get").status,
        404
    );

    // Written behind the tracker's back (no publish): the negative entry
    // answers until it expires, then Redis is asked again.
    write_behind(&stack.redis.url(), "quiet", "q", true, 1).await;
    let before = metric_sum(
        &t.metrics().await,
        "adtrack_cache_lookups_total",
        &["result=\"negative_hit\""],
    );
    let r = http.get(&t.url("/event/quiet")).await.expect("get");
    let after = metric_sum(
        &t.metrics().await,
        "adtrack_cache_lookups_total",
        &["result=\"negative_hit\""],
    );
    assert_eq!(r.status, 404, "the negative entry answers, not Redis");
    assert_eq!(after, before + 1.0, "answered from the negative cache");
    wait_status(&http, &t.url("/event/quiet"), 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_ships_unverified_and_keeps_cached_programs_valid() {
    let mut stack = Stack::start(1).expect("stack");
    let _ = load_programs(&stack).await;
    let t = Tracker::start(&stack, &[("TRACKER_REDIS_TIMEOUT_MS", "50")]).await;
    let http = Http::new();
    stack.redis.stop();

    let r = http.get(&t.url("/event/212312")).await.expect("get");
    assert_eq!(r.status, 200, "cached programs go on as normal");
    let r = http.get(&t.url("/event/never-seen")).await.expect("get");
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["validation"], "unverified");
    let unverified_id = r.json()["messageId"].as_str().expect("id").to_owned();
    let r = http
        .get(&t.url("/v1/pixel/also-never-seen"))
        .await
        .expect("pixel");
    assert_eq!(r.body.len(), 43);
    let pixel_id = r.header("x-event-id").expect("shipped");

    wait_until(
        "both events in the stream",
        Duration::from_secs(20),
        || async {
            let records = read_stream_events(&stack.kinesis.url())
                .await
                .unwrap_or_default();
            let events: Vec<TrackingEvent> = records
                .iter()
                .filter_map(|r| TrackingEvent::decode(r.data.as_slice()).ok())
                .collect();
            [&unverified_id, &pixel_id].iter().all(|id| {
                events
                    .iter()
                    .any(|e| &&e.message_id == id && e.validation == 3 && !e.is_valid)
            })
        },
    )
    .await;
    let m = t.metrics().await;
    assert!(metric_sum(&m, "adtrack_hits_total", &["outcome=\"unverified\""]) >= 2.0);
    assert!(metric_sum(&m, "adtrack_redis_errors_total", &[]) >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_warm_and_stream_answered() {
    let mut stack = Stack::start(1).expect("stack");
    stack.redis.stop();
    stack.kinesis.stop();
    let t = Tracker::spawn(&stack, &[]);
    let http = Http::new();
    wait_until("admin answers", Duration::from_secs(20), || async {
        http.get(&format!("{}/health/ready", t.admin)).await.is_ok()
    })
    .await;
    let r = http
        .get(&format!("{}/health/ready", t.admin))
        .await
        .expect("ready");
    assert_eq!(r.status, 503);
    let reasons = r.json()["reasons"].to_string();
    assert!(reasons.contains("cache not warm"), "{reasons}");
    assert!(reasons.contains("Kinesis"), "{reasons}");
    let live = http
        .get(&format!("{}/health/live", t.admin))
        .await
        .expect("live");
    assert_eq!(live.status, 200, "alive while not ready");

    stack.redis.restart().expect("redis");
    stack.kinesis.restart().expect("kinesis");
    // Redis answers, but holds no programs (no version counter): still not
    // ready, as after Redis lost its data, until every program is there.
    wait_status(&http, &t.url("/event/212312"), 404).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = http
        .get(&format!("{}/health/ready", t.admin))
        .await
        .expect("ready");
    assert_eq!(r.status, 503, "ready on a Redis without its programs");
    let _ = load_programs(&stack).await;
    t.wait_ready().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_draining() {
    let mut stack = Stack::start(1).expect("stack");
    let _ = load_programs(&stack).await;
    let mut t = Tracker::start(&stack, &[("TRACKER_DRAIN_DEADLINE_SECS", "4")]).await;
    let http = Http::new();
    // With Kinesis gone, the queued event keeps the drain busy.
    stack.kinesis.stop();
    assert_eq!(
        http.get(&t.url("/event/212312")).await.expect("get").status,
        200
    );
    t.proc.signal(15);
    wait_until(
        "readiness false while draining",
        Duration::from_secs(10),
        || async {
            match http.get(&format!("{}/health/ready", t.admin)).await {
                Ok(r) => r.status == 503 && r.text().contains("draining"),
                Err(_) => false,
            }
        },
    )
    .await;
    // The listener is closed during the drain.
    let port = t.port;
    wait_until(
        "the public listener stops accepting",
        Duration::from_secs(10),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
        },
    )
    .await;
    let status = t
        .proc
        .wait_exit(Duration::from_secs(30))
        .expect("exits by the deadline");
    assert_eq!(
        status.code(),
        Some(3),
        "exit code reports undelivered events"
    );
}

/// A cache in which every program id has the same key hash still answers
/// each id with its own program (read from Redis), never another's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_sharing_a_key_hash_get_their_own_answers() {
    use adtrack_tracker::cache::{CacheSettings, Lookup, ProgramCache};
    let redis = adtrack_testkit::Redis::start().expect("redis");
    let store = RedisPrograms::connect(&redis.url(), Counter::Create)
        .await
        .expect("redis");
    store
        .load_atomic(&parse_program_file(PROGRAMS).expect("programs"))
        .await
        .expect("load");
    let cache = ProgramCache::with_key_fn(
        &CacheSettings {
            capacity: 1000,
            positive_ttl: None,
            negative_ttl: Duration::from_secs(30),
            redis_timeout: Duration::from_secs(2),
        },
        Box::new(|_| 7),
    );
    let client = redis::Client::open(redis.url()).expect("client");
    cache.set_connection(client.get_connection_manager().await.expect("manager"));
    cache.load_all().await.expect("warm");
    let now = time::OffsetDateTime::now_utc();
    for round in 0..2 {
        for (id, name) in [("212312", "program1"), ("212313", "program2")] {
            match cache.lookup(id, now).await {
                Lookup::Active(p) => {
                    assert_eq!(p.program_id(), id, "round {round}");
                    assert_eq!(p.program_name(), name, "round {round}");
                }
                other => panic!("{id} in round {round}: {other:?}"),
            }
        }
        assert!(
            matches!(cache.lookup("212315", now).await, Lookup::Inactive(p) if p.program_id() == "212315"),
            "a disabled program answers as itself"
        );
        assert!(
            matches!(cache.lookup("no-such-id", now).await, Lookup::Unknown),
            "an unknown id is unknown, whatever shares its key"
        );
    }
}

/// During a Redis brownout (the server frozen, not gone: every read waits
/// for its timeout) a batch of uncached ids is looked up at once under one
/// deadline: it is answered, every event unverified, instead of waiting out
/// one Redis timeout per event (300 x 500 ms here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_during_a_redis_brownout_waits_one_deadline() {
    let stack = Stack::start(1).expect("stack");
    let _store = load_programs(&stack).await;
    let t = Tracker::start(&stack, &[("TRACKER_REDIS_TIMEOUT_MS", "500")]).await;
    let redis_pid = stack.redis.pid().to_string();
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, redis_pid.as_str()])
            .status()
            .expect("kill")
    };
    assert!(signal("-STOP").success());
    let body: Vec<serde_json::Value> = (0..300)
        .map(|i| serde_json::json!({"programId": format!("brownout-{i}"), "type": "click"}))
        .collect();
    let body = serde_json::to_vec(&body).expect("json");
    let http = Http::new();
    let answer = tokio::time::timeout(
        Duration::from_secs(60),
        http.request("POST", &t.url("/v1/events"), &[], &body),
    )
    .await;
    assert!(signal("-CONT").success());
    let r = answer
        .expect("the batch waited one Redis timeout per event")
        .expect("post");
    assert_eq!(r.status, 200, "{}", r.text());
    let reply = r.json();
    assert_eq!(reply["accepted"], 300);
    let results = reply["results"].as_array().expect("results");
    assert_eq!(results.len(), 300);
    for (i, item) in results.iter().enumerate() {
        assert_eq!(item["index"], i, "results in request order");
        assert_eq!(item["status"], "unverified", "{item}");
        assert!(item["eventId"].is_string(), "{item}");
    }
}

/// A miss whose request gave up (a client gone, a batch's deadline) leaves
/// no read behind: the read ends on its own, and the next miss asks Redis
/// again instead of taking that old answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_miss_leaves_no_stale_read_behind() {
    use adtrack_tracker::cache::{CacheSettings, Lookup, ProgramCache};
    let redis = adtrack_testkit::Redis::start().expect("redis");
    let proxy = TcpProxy::start(([127, 0, 0, 1], redis.port).into()).await;
    let cache = std::sync::Arc::new(ProgramCache::new(&CacheSettings {
        capacity: 1000,
        positive_ttl: None,
        negative_ttl: Duration::from_secs(600),
        redis_timeout: Duration::from_secs(10),
    }));
    let client = redis::Client::open(proxy.redis_url()).expect("client");
    cache.set_connection(client.get_connection_manager().await.expect("manager"));
    cache.load_all().await.expect("warm");
    write_behind(&redis.url(), "late", "old", true, 1).await;

    proxy.hold_replies(0);
    let now = time::OffsetDateTime::now_utc();
    let miss = {
        let cache = cache.clone();
        tokio::spawn(async move { cache.lookup("late", now).await })
    };
    wait_until(
        "the miss's read answered",
        Duration::from_secs(10),
        || async { proxy.held_bytes() > 0 },
    )
    .await;
    miss.abort();
    write_behind(&redis.url(), "late", "new", true, 2).await;
    proxy.release();
    wait_until("the read ended", Duration::from_secs(10), || async {
        cache.reads_in_flight() == 0
    })
    .await;
    match cache.lookup("late", now).await {
        Lookup::Active(p) => assert_eq!(p.program_name(), "new", "a fresh read"),
        other => panic!("{other:?}"),
    }
}

/// Redis loses its data (FLUSHALL, as after a failover to an empty
/// replica): a running tracker keeps serving what it cached, a tracker
/// started then is not ready and takes no emptied Redis for the truth, and
/// the sync restores every program from the programs table within seconds,
/// with no operator action, after which the new tracker validates every
/// program again and still refuses unknown ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_redis_is_restored_from_the_programs_table_without_an_operator() {
    use adtrack_testkit::{PROGRAMS_TABLE, Proc, binary, dynamodb_client};
    use adtrack_updater::{ProgramTable, Programs};

    let stack = Stack::start(1).expect("stack");
    let programs = parse_program_file(PROGRAMS).expect("programs");
    let store = Programs::new(
        ProgramTable::new(dynamodb_client(&stack.dynamodb.url()), PROGRAMS_TABLE),
        RedisPrograms::connect(&stack.redis.url(), Counter::KeepIfPresent)
            .await
            .expect("redis"),
    );
    store.load(&programs).await.expect("load");
    let sync = || {
        Proc::new(
            adtrack_testkit::command(&binary("updater"))
                .envs(stack.env())
                .args(["sync", "--watch", "--check-every-ms", "200"])
                .spawn()
                .expect("spawn the sync"),
        )
    };
    let mut syncing = sync();
    let running = Tracker::start(&stack, &[]).await;
    let http = Http::new();
    let every_program_answers = |t: &Tracker| {
        let urls: Vec<String> = programs
            .iter()
            .filter(|p| p.is_active_at(time::OffsetDateTime::now_utc()))
            .map(|p| t.url(&format!("/event/{}", p.program_id)))
            .collect();
        let http = &http;
        async move {
            for url in urls {
                if http.get(&url).await.map(|r| r.status).unwrap_or(0) != 200 {
                    return false;
                }
            }
            true
        }
    };
    assert!(every_program_answers(&running).await);

    // Redis loses everything while no sync runs.
    syncing.kill();
    redis_cmd(&stack.redis.url(), &["FLUSHALL"]).await;
    assert!(
        every_program_answers(&running).await,
        "a running tracker keeps serving what it cached"
    );
    let fresh = Tracker::spawn(&stack, &[]);
    wait_status(&http, &fresh.url("/event/212312"), 404).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = http
        .get(&format!("{}/health/ready", fresh.admin))
        .await
        .expect("ready");
    assert_eq!(
        r.status, 503,
        "a new tracker took an emptied Redis for the truth"
    );

    // The sync (as it always runs) restores Redis; nobody reloads anything.
    let _syncing = sync();
    fresh.wait_ready().await;
    wait_until(
        "the new tracker validates every program",
        Duration::from_secs(20),
        || every_program_answers(&fresh),
    )
    .await;
    assert_eq!(
        http.get(&fresh.url("/event/999999"))
            .await
            .expect("get")
            .status,
        404,
        "an unknown program is still refused"
    );
    assert!(every_program_answers(&running).await);
}
