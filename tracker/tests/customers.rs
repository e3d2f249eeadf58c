//! Customer records on the real processes: the kill switch an operator
//! throws with `updater customer disable` reaches every running tracker by
//! push (no restart, no reconcile), survives Redis losing its data, and is
//! restored by the sync before a new tracker becomes ready; and the rate
//! limits, from the tracker's configuration or a customer's record: the
//! pixel and the click still answer (the event dropped and counted), the
//! JSON routes and the batch answer 429 with `Retry-After`.

mod support;

use std::time::Duration;

use adtrack_proto::customer::Customer;
use adtrack_proto::program::parse_program_file;
use adtrack_proto::redis_layout::StoredCustomer;
use adtrack_testkit::{
    CUSTOMERS_TABLE, Http, PROGRAMS_TABLE, Reply, Stack, binary, dynamodb_client, metric_sum,
};
use adtrack_updater::{Counter, CustomerTable, ProgramTable, Programs, RedisPrograms};
use support::{PROGRAMS, Tracker, redis_cmd, wait_status, wait_until};

/// The reference programs in the tables and Redis, through the store the
/// updater uses (Redis marked complete by it).
async fn store(stack: &Stack) -> Programs {
    let dynamodb = dynamodb_client(&stack.dynamodb.url());
    let store = Programs::new(
        ProgramTable::new(dynamodb.clone(), PROGRAMS_TABLE),
        RedisPrograms::connect(&stack.redis.url(), Counter::KeepIfPresent)
            .await
            .expect("redis"),
    )
    .with_customers(CustomerTable::new(dynamodb, CUSTOMERS_TABLE));
    store
        .load(&parse_program_file(PROGRAMS).expect("programs"))
        .await
        .expect("load");
    store
}

/// Runs the operators' command line against the stack; its output.
fn updater(stack: &Stack, args: &[&str]) -> String {
    let out = adtrack_testkit::command(&binary("updater"))
        .envs(stack.env())
        .args(args)
        .output()
        .expect("run updater");
    assert!(
        out.status.success(),
        "updater {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switched_off_customer_stops_every_tracker_at_once_and_survives_a_redis_loss() {
    let stack = Stack::start(1).expect("stack");
    let store = store(&stack).await;
    let http = Http::new();
    let trackers = [
        Tracker::start(&stack, &[]).await,
        Tracker::start(&stack, &[]).await,
    ];
    for t in &trackers {
        assert_eq!(
            http.get(&t.url("/event/212312")).await.expect("get").status,
            200
        );
    }

    // The kill switch, as an operator throws it: every tracker stops
    // accepting the customer's programs by push (the trackers reconcile
    // only every 300 s), and no other customer's.
    let said = updater(&stack, &["customer", "disable", "9123"]);
    assert!(said.contains("customer 9123 written"), "{said}");
    for t in &trackers {
        wait_status(&http, &t.url("/event/212312"), 404).await;
        let r = http.get(&t.url("/event/212312")).await.expect("get");
        assert_eq!(r.json()["error"], "inactive_program", "{}", r.text());
        assert_eq!(
            http.get(&t.url("/event/212313")).await.expect("get").status,
            200
        );
        let pixel = http.get(&t.url("/v1/pixel/212312")).await.expect("pixel");
        assert_eq!(pixel.status, 200, "the pixel still answers its GIF");
        assert_eq!(pixel.header("x-event-id"), None, "and ships nothing");
        let click = http
            .get(&t.url("/v1/click/212312?url=https%3A%2F%2Fexample.com%2F"))
            .await
            .expect("click");
        assert_eq!(click.status, 404);
        assert!(
            metric_sum(
                &t.metrics().await,
                "adtrack_customer_refusals_total",
                &["reason=\"disabled\""]
            ) >= 3.0
        );
    }
    assert!(
        updater(&stack, &["customer", "list"]).contains("9123\t"),
        "the record is listed"
    );

    // Redis loses its data: running trackers keep the switch off; the sync
    // restores the customer record with the programs, so a tracker started
    // afterwards refuses the customer from its first hit.
    redis_cmd(&stack.redis.url(), &["FLUSHALL"]).await;
    for t in &trackers {
        assert_eq!(
            http.get(&t.url("/event/212312")).await.expect("get").status,
            404
        );
    }
    let synced = updater(&stack, &["sync"]);
    assert!(
        synced.contains("1 customer record(s), 1 written"),
        "{synced}"
    );
    assert!(matches!(
        store.redis.get_customer(9123).await.expect("redis"),
        StoredCustomer::Present(Customer { enabled: false, .. })
    ));
    let fresh = Tracker::start(&stack, &[]).await;
    assert_eq!(
        http.get(&fresh.url("/event/212312"))
            .await
            .expect("get")
            .status,
        404
    );
    assert_eq!(
        http.get(&fresh.url("/event/212313"))
            .await
            .expect("get")
            .status,
        200
    );

    // Switched on again: every tracker takes the customer's hits.
    updater(&stack, &["customer", "enable", "9123"]);
    for t in trackers.iter().chain([&fresh]) {
        wait_status(&http, &t.url("/event/212312"), 200).await;
    }
}

/// Sends `hit` until it is refused (`refused` says so), at most 50 times:
/// tokens come back at 1 per second, so a burst of requests empties the
/// bucket however slow the machine. Returns how many were taken first and
/// the refusal.
async fn until_refused<F, Fut>(hit: F, refused: impl Fn(&Reply) -> bool) -> (usize, Reply)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Reply>,
{
    for taken in 0..50 {
        let r = hit().await;
        if refused(&r) {
            return (taken, r);
        }
    }
    panic!("50 hits and never refused")
}

fn retry_after(r: &Reply) -> u64 {
    r.header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in {:?}", r.headers))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_customers_rate_pixels_answer_and_json_routes_say_when_to_retry() {
    let stack = Stack::start(1).expect("stack");
    let store = store(&stack).await;
    // Customer 9124 is exempt by its record; the others take the default.
    store
        .put_customer(&Customer {
            rate_limit: Some(0),
            ..Customer::default_for(9124)
        })
        .await
        .expect("put customer");
    let t = Tracker::start(
        &stack,
        &[
            ("TRACKER_CUSTOMER_RATE_LIMIT", "1"),
            ("TRACKER_CUSTOMER_RATE_BURST", "3"),
        ],
    )
    .await;
    let http = Http::new();
    let get = |path: &'static str| {
        let (http, url) = (&http, t.url(path));
        move || {
            let url = url.clone();
            async move { http.get(&url).await.expect("get") }
        }
    };

    // JSON: the burst, then 429 naming the wait.
    let (taken, r) = until_refused(get("/event/212312"), |r| r.status != 200).await;
    assert!(taken >= 3, "the burst of 3 is taken first ({taken})");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"], "rate_limited");
    assert!(retry_after(&r) >= 1);

    // The pixel answers its GIF; the event is dropped with its cause.
    let (_, pixel) = until_refused(get("/v1/pixel/212312"), |r| {
        r.header("x-event-id").is_none()
    })
    .await;
    assert_eq!(pixel.status, 200);
    assert_eq!(pixel.body.len(), 43, "the GIF");

    // A click still takes the visitor to the page, without a click event.
    let (_, click) = until_refused(
        get("/v1/click/summer-sale?url=https%3A%2F%2Fshop.example.com%2F"),
        |r| r.header("x-event-id").is_none(),
    )
    .await;
    assert_eq!(click.status, 302);
    assert_eq!(
        click.header("location").as_deref(),
        Some("https://shop.example.com/")
    );
    let metrics = t.metrics().await;
    assert!(
        metric_sum(
            &metrics,
            "adtrack_events_dropped_total",
            &["cause=\"rate_limited\""]
        ) >= 2.0,
        "{metrics}"
    );

    // A batch with nothing taken: 429 as a whole, to be sent again.
    let post = |body: &'static str| {
        let (http, url) = (&http, t.url("/v1/events"));
        move || {
            let url = url.clone();
            async move {
                http.request(
                    "POST",
                    &url,
                    &[("content-type", "application/json")],
                    body.as_bytes(),
                )
                .await
                .expect("post")
            }
        }
    };
    let (_, r) = until_refused(
        post(
            r#"[{"programId":"212312","type":"impression"},{"programId":"212312","type":"click"}]"#,
        ),
        |r| r.status != 200,
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(retry_after(&r) >= 1);
    // Some taken: 200, the refused ones named, and the wait.
    let (_, r) = until_refused(
        post(r#"[{"programId":"212313","type":"impression"},{"programId":"212312","type":"impression"}]"#),
        |r| r.json()["rejected"] == 1,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["results"][0]["status"], "accepted");
    assert_eq!(body["results"][1]["error"], "rate_limited");
    assert!(retry_after(&r) >= 1);

    // The exempt customer is never limited.
    for _ in 0..20 {
        assert_eq!(
            http.get(&t.url("/event/212313")).await.expect("get").status,
            200
        );
    }

    // A record pushed to the running tracker lifts a customer's limit.
    store
        .put_customer(&Customer {
            rate_limit: Some(0),
            ..Customer::default_for(9123)
        })
        .await
        .expect("put customer");
    wait_until(
        "the lifted limit reaches the tracker",
        Duration::from_secs(20),
        || async {
            let mut all = true;
            for _ in 0..10 {
                all &= http
                    .get(&t.url("/event/212312"))
                    .await
                    .is_ok_and(|r| r.status == 200);
            }
            all
        },
    )
    .await;
    assert!(
        metric_sum(
            &t.metrics().await,
            "adtrack_customer_refusals_total",
            &["reason=\"rate_limited\""]
        ) >= 5.0
    );
}
