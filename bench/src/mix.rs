//! The request mix: which routes, which program ids, which user agents, in
//! what proportions. Planned once, then cycled through.

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use rand::Rng;
use rand::seq::IndexedRandom;

/// Real browser user agents (and a crawler, which the tracker flags).
pub const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
];

/// Weights of routes and of id kinds, from `--mix` and `--ids`.
#[derive(Debug, Clone)]
pub struct MixSpec {
    pub pixel: u32,
    pub event: u32,
    pub click: u32,
    pub beacon: u32,
    /// Signed postbacks (conversions) with the seeded programs' secret.
    pub postback: u32,
    pub valid: u32,
    pub unknown: u32,
    pub invalid: u32,
    pub malformed: u32,
    /// Valid programs are `bench-{n}` for n in 0..programs.
    pub programs: u32,
}

impl MixSpec {
    /// Only pixels for valid programs (the nginx comparison).
    pub fn pixels_only(programs: u32) -> Self {
        Self {
            pixel: 1,
            event: 0,
            click: 0,
            beacon: 0,
            postback: 0,
            valid: 1,
            unknown: 0,
            invalid: 0,
            malformed: 0,
            programs,
        }
    }

    /// Parses `pixel=60,event=20,click=10,beacon=10,postback=0` and
    /// `valid=90,unknown=5,invalid=3,malformed=2`.
    pub fn parse(routes: &str, ids: &str, programs: u32) -> anyhow::Result<Self> {
        let mut m = Self {
            pixel: 0,
            event: 0,
            click: 0,
            beacon: 0,
            postback: 0,
            valid: 0,
            unknown: 0,
            invalid: 0,
            malformed: 0,
            programs,
        };
        for part in routes
            .split(',')
            .chain(ids.split(','))
            .filter(|p| !p.is_empty())
        {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("{part:?}: expected name=weight"))?;
            let v: u32 = v
                .parse()
                .map_err(|_| anyhow::anyhow!("{part:?}: weight is not a number"))?;
            match k {
                "pixel" => m.pixel = v,
                "event" => m.event = v,
                "click" => m.click = v,
                "beacon" => m.beacon = v,
                "postback" => m.postback = v,
                "valid" => m.valid = v,
                "unknown" => m.unknown = v,
                "invalid" => m.invalid = v,
                "malformed" => m.malformed = v,
                _ => anyhow::bail!("unknown mix entry {k:?}"),
            }
        }
        anyhow::ensure!(
            m.pixel + m.event + m.click + m.beacon + m.postback > 0,
            "the route mix is empty"
        );
        anyhow::ensure!(
            m.valid + m.unknown + m.invalid + m.malformed > 0,
            "the id mix is empty"
        );
        Ok(m)
    }
}

/// One request of the plan.
#[derive(Debug, Clone)]
pub struct Planned {
    pub method: &'static str,
    pub path: String,
    pub user_agent: &'static str,
    pub body: Bytes,
    pub content_type: Option<&'static str>,
    /// The reply is the reference JSON (carries `messageId`).
    pub json_reply: bool,
}

impl Planned {
    pub fn request(&self) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(self.method)
            .uri(&self.path)
            .header("host", "bench")
            .header("user-agent", self.user_agent);
        if let Some(ct) = self.content_type {
            b = b.header("content-type", ct);
        }
        b.body(Full::new(self.body.clone())).expect("valid request")
    }
}

fn pick(rng: &mut impl Rng, weights: &[(u32, usize)]) -> usize {
    let total: u32 = weights.iter().map(|w| w.0).sum();
    let mut x = rng.random_range(0..total.max(1));
    for (w, v) in weights {
        if x < *w {
            return *v;
        }
        x -= w;
    }
    weights.last().map_or(0, |w| w.1)
}

/// The postback secret `seed` gives the bench programs.
pub const BENCH_POSTBACK_SECRET: &str = "bench-postback-secret-0123";

/// Builds `n` requests in the mix's proportions (postbacks signed now:
/// their `ts` is good for 300 s).
pub fn plan(spec: &MixSpec, n: usize) -> Vec<Planned> {
    let mut rng = rand::rng();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (0..n)
        .map(|i| {
            let route = pick(
                &mut rng,
                &[
                    (spec.pixel, 0),
                    (spec.event, 1),
                    (spec.click, 2),
                    (spec.beacon, 3),
                    (spec.postback, 4),
                ],
            );
            let kind = pick(
                &mut rng,
                &[
                    (spec.valid, 0),
                    (spec.unknown, 1),
                    (spec.invalid, 2),
                    (spec.malformed, 3),
                ],
            );
            let id = match kind {
                0 => format!("bench-{}", rng.random_range(0..spec.programs.max(1))),
                1 => format!("unknown-{}", rng.random_range(0..1_000_000)),
                2 => "bench-disabled".to_owned(),
                _ => "bad%20id".to_owned(),
            };
            let user_agent = *USER_AGENTS.choose(&mut rng).unwrap_or(&USER_AGENTS[0]);
            match route {
                0 => Planned {
                    method: "GET",
                    path: format!(
                        "/v1/pixel/{id}?type=impression&campaign=c{}",
                        rng.random_range(0..50)
                    ),
                    user_agent,
                    body: Bytes::new(),
                    content_type: None,
                    json_reply: false,
                },
                1 => Planned {
                    method: "GET",
                    path: format!("/event/{id}?type=conversion"),
                    user_agent,
                    body: Bytes::new(),
                    content_type: None,
                    json_reply: true,
                },
                2 => Planned {
                    method: "GET",
                    path: format!("/v1/click/{id}?url=https%3A%2F%2Fshop.example.com%2Fdeal"),
                    user_agent,
                    body: Bytes::new(),
                    content_type: None,
                    json_reply: false,
                },
                4 => {
                    let query = adtrack_proto::postback::signed_query(
                        BENCH_POSTBACK_SECRET.as_bytes(),
                        &format!(
                            "click_id={}&txid=B-{i}-{}&value=9.99&currency=USD&ts={now}",
                            adtrack_proto::event::new_event_id(),
                            rng.random_range(0..1_000_000_000u64)
                        ),
                    );
                    Planned {
                        method: "GET",
                        path: format!("/v1/postback/{id}?{query}"),
                        user_agent: "adtrack-bench postback",
                        body: Bytes::new(),
                        content_type: None,
                        json_reply: true,
                    }
                }
                _ => Planned {
                    method: "POST",
                    path: "/v1/events".to_owned(),
                    user_agent,
                    body: Bytes::from(format!(
                        "{{\"programId\":\"{id}\",\"type\":\"viewable\"}}\n"
                    )),
                    content_type: Some("text/plain;charset=UTF-8"),
                    json_reply: true,
                },
            }
        })
        .collect()
}
