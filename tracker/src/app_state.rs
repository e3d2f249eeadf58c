//! What every request handler shares: the cache, the event sink, health,
//! the client and privacy policies, the request bounds and the meters.

use std::sync::Arc;

use crate::cache::ProgramCache;
use crate::cors::CorsPolicy;
use crate::health::Health;
use crate::hit::{IpPolicy, Privacy};
use crate::metric;
use crate::shipper::EventSink;

/// Request bounds enforced in handlers (the head's are enforced by hyper).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_uri_bytes: u64,
    pub max_body_bytes: u64,
    pub max_batch_events: u64,
    pub body_timeout: std::time::Duration,
    /// How long a batch's program lookups may take together.
    pub lookup_deadline: std::time::Duration,
    /// Another prefix of the public routes (empty: none).
    pub path_prefix: String,
}

/// What every request handler shares.
pub struct AppState {
    pub cache: Arc<ProgramCache>,
    /// The customers' kill switches and rate limits.
    pub customers: Arc<crate::customers::Customers>,
    pub sink: EventSink,
    pub health: Arc<Health>,
    pub ip_policy: IpPolicy,
    pub privacy: Privacy,
    pub cors: CorsPolicy,
    pub limits: Limits,
    pub meters: metric::RequestMeters,
    /// The first-party cookie's settings (`None`: the tracker keeps none).
    pub user_cookie: Option<crate::user_cookie::CookiePolicy>,
}
