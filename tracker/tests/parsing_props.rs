//! Property test of request parsing: arbitrary methods, paths, queries,
//! headers and bodies fed to the real request handler (program cache backed
//! by a real redis-server) never panic and always get a 2xx, 3xx or 4xx.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use adtrack_proto::program::parse_program_file;
use adtrack_testkit::Redis;
use adtrack_tracker::cache::{CacheSettings, ProgramCache};
use adtrack_tracker::conn_timeouts::ConnPhase;
use adtrack_tracker::cors::CorsPolicy;
use adtrack_tracker::delivery::{self, DeliverySettings};
use adtrack_tracker::health::Health;
use adtrack_tracker::hit::{IpPolicy, Privacy};
use adtrack_tracker::routes::{AppState, Limits, handle};
use adtrack_updater::{Counter, RedisPrograms};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::Full;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use support::PROGRAMS;

async fn state(redis: &Redis) -> (Arc<AppState>, delivery::Engine) {
    let store = RedisPrograms::connect(&redis.url(), Counter::Create)
        .await
        .expect("redis");
    store
        .load_atomic(&parse_program_file(PROGRAMS).expect("programs"))
        .await
        .expect("load");
    let cache = Arc::new(ProgramCache::new(&CacheSettings {
        capacity: 1000,
        positive_ttl: None,
        negative_ttl: Duration::from_secs(30),
        redis_timeout: Duration::from_secs(2),
    }));
    let client = redis::Client::open(redis.url()).expect("client");
    cache.set_connection(client.get_connection_manager().await.expect("manager"));
    cache.load_all().await.expect("warm");
    let (sink, batcher) = delivery::channel(
        DeliverySettings {
            stream: "unused".into(),
            queue_events: 1_000_000,
            queue_bytes: 1 << 30,
            linger: Duration::from_millis(5),
            max_inflight: 1,
            aggregate: true,
            max_aggregate_bytes: 51_200,
            shard_records_per_sec: 1000,
            shard_bytes_per_sec: 1 << 20,
            memory_max_age: Duration::from_secs(2),
        },
        None,
    )
    .expect("channel");
    let health = Arc::new(Health::default());
    health.set_cache_warm();
    health.set_stream_ok();
    let state = AppState {
        cache,
        customers: Arc::new(adtrack_tracker::customers::Customers::new(
            Default::default(),
        )),
        sink,
        health,
        ip_policy: IpPolicy {
            trusted_proxy_hops: 1,
            keep_full_ip: false,
        },
        privacy: Privacy::new(
            "strip",
            "uid",
            adtrack_tracker::consent::ConsentMode::Record,
        ),
        cors: CorsPolicy::Any,
        limits: Limits {
            max_uri_bytes: 8192,
            max_body_bytes: 4096,
            max_batch_events: 50,
            body_timeout: Duration::from_secs(5),
            lookup_deadline: Duration::from_secs(2),
            path_prefix: String::new(),
        },
        meters: Default::default(),
        user_cookie: None,
    };
    (Arc::new(state), batcher)
}

/// Method, path, query, headers, body.
type RawRequest = (String, String, String, Vec<(String, Vec<u8>)>, Vec<u8>);

fn requests() -> impl Strategy<Value = RawRequest> {
    let method = prop::sample::select(vec!["GET", "HEAD", "POST", "OPTIONS", "PUT", "DELETE"]);
    let prefix = prop::sample::select(vec![
        "/v1/pixel/",
        "/event/",
        "/v1/click/",
        "/v1/events",
        "/health/ready",
        "/health/live",
        "/",
        "/cache/purge",
        "/v1/pixel",
    ]);
    let id = prop_oneof![
        prop::sample::select(vec!["212312", "212315", "summer-sale", "999999"])
            .prop_map(str::to_owned),
        "[a-zA-Z0-9%/._~!$'()*+,;=:@-]{0,80}",
    ];
    let query = prop_oneof![
        Just(String::new()),
        "[a-zA-Z0-9%=&+._~/:-]{0,160}",
        prop::collection::vec(("[a-z]{0,6}", "[a-zA-Z0-9%+:/._-]{0,30}"), 0..40).prop_map(|kv| {
            kv.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("&")
        }),
        "url=https%3A%2F%2F[a-z.]{0,20}(%2F[a-z]{0,5})?".prop_map(|s| s),
    ];
    let header_name = prop::sample::select(vec![
        "user-agent",
        "dnt",
        "sec-gpc",
        "x-forwarded-for",
        "origin",
        "content-type",
        "content-length",
        "referer",
        "x-anything",
    ]);
    let headers = prop::collection::vec(
        (
            header_name.prop_map(str::to_owned),
            prop::collection::vec(any::<u8>(), 0..60),
        ),
        0..6,
    );
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        prop::collection::vec(
            (
                prop::sample::select(vec!["212312", "999999", "bad id", "", "summer-sale"]),
                prop::option::of("[a-z]{0,10}"),
            ),
            0..8
        )
        .prop_map(|events| {
            let items: Vec<String> = events
                .iter()
                .map(|(id, t)| match t {
                    Some(t) => {
                        format!(r#"{{"programId":"{id}","type":"{t}","params":{{"k":"v"}}}}"#)
                    }
                    None => format!(r#"{{"programId":"{id}"}}"#),
                })
                .collect();
            format!("[{}]", items.join(",")).into_bytes()
        }),
    ];
    (
        method.prop_map(str::to_owned),
        (prefix, id).prop_map(|(p, i)| format!("{p}{i}")),
        query,
        headers,
        body,
    )
}

#[test]
fn arbitrary_requests_get_a_2xx_3xx_or_4xx_and_never_panic() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let redis = Redis::start().expect("redis");
    let (state, _batcher) = rt.block_on(state(&redis));
    let peer: SocketAddr = "192.0.2.10:40000".parse().expect("addr");
    let mut runner = TestRunner::new(Config {
        cases: 1500,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&requests(), |(method, path, query, headers, body)| {
            let target = if query.is_empty() {
                path
            } else {
                format!("{path}?{query}")
            };
            let Ok(uri) = target.parse::<http::Uri>() else {
                return Ok(()); // hyper refuses such a request line before any handler
            };
            let mut builder = Request::builder().method(method.as_str()).uri(uri);
            for (name, value) in &headers {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_bytes(value),
                ) {
                    builder = builder.header(n, v);
                }
            }
            let Ok(req) = builder.body(Full::new(Bytes::from(body))) else {
                return Ok(());
            };
            let resp = rt
                .block_on(handle(
                    req,
                    state.clone(),
                    peer,
                    Arc::new(ConnPhase::default()),
                ))
                .expect("infallible");
            let status = resp.status().as_u16();
            prop_assert!((200..500).contains(&status), "{method} {target}: {status}");
            Ok(())
        })
        .expect("property holds");
}
