//! The error model of the public port: one variant per kind of refusal, one
//! HTTP status each, a JSON body `{"error": code, "reason": text}`.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::hit::QueryError;

pub type Body = Full<Bytes>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed program id: {0}")]
    MalformedId(String),
    #[error("{0}")]
    BadQuery(#[from] QueryError),
    #[error("{0}")]
    BadBody(String),
    #[error("{0}")]
    BadParameter(&'static str),
    #[error("missing `url` parameter")]
    MissingUrl,
    #[error("`url` is not an absolute http(s) URL")]
    BadRedirectUrl,
    #[error("the program does not allow redirects to {0}")]
    RedirectNotAllowed(String),
    #[error("unknown program")]
    UnknownProgram,
    #[error("program is not valid now")]
    InactiveProgram,
    #[error("origin not allowed")]
    OriginNotAllowed,
    #[error("no such route")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    #[error("request timed out")]
    Timeout,
    #[error("request target longer than {0} bytes")]
    UriTooLong(u64),
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    #[error("more than {0} events in one batch")]
    TooManyEvents(u64),
    #[error("the event is {0} bytes encoded, more than the largest event, {max} bytes", max = adtrack_proto::event::MAX_EVENT_BYTES)]
    EventTooLarge(usize),
    #[error("event queue is full, retry later")]
    Overloaded,
    #[error("program data unavailable, retry later")]
    ProgramUnavailable,
    #[error("the postback carries no signature (`sig`, the last parameter)")]
    MissingSignature,
    #[error("the postback's signature does not match")]
    BadSignature,
    #[error("the postback's timestamp `ts` is more than {0} s from the tracker's clock")]
    ExpiredTimestamp(u64),
    #[error("the program takes no postbacks (it has no postback secret)")]
    PostbacksDisabled,
    #[error("over the customer's rate limit, retry after {} s", .0.retry_after_secs())]
    RateLimited(crate::customers::RateLimited),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedId(_)
            | Self::BadQuery(_)
            | Self::BadBody(_)
            | Self::BadParameter(_)
            | Self::MissingUrl
            | Self::BadRedirectUrl
            | Self::RedirectNotAllowed(_) => StatusCode::BAD_REQUEST,
            Self::MissingSignature | Self::BadSignature | Self::ExpiredTimestamp(_) => {
                StatusCode::UNAUTHORIZED
            }
            Self::OriginNotAllowed | Self::PostbacksDisabled => StatusCode::FORBIDDEN,
            Self::UnknownProgram | Self::InactiveProgram | Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::BodyTooLarge(_) | Self::TooManyEvents(_) | Self::EventTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            Self::Overloaded | Self::ProgramUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedId(_) => "malformed_program_id",
            Self::BadQuery(_) => "bad_query",
            Self::BadBody(_) => "bad_body",
            Self::BadParameter(_) => "bad_parameter",
            Self::MissingUrl => "missing_url",
            Self::BadRedirectUrl => "bad_redirect_url",
            Self::RedirectNotAllowed(_) => "redirect_not_allowed",
            Self::UnknownProgram => "unknown_program",
            Self::InactiveProgram => "inactive_program",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::Timeout => "timeout",
            Self::UriTooLong(_) => "uri_too_long",
            Self::BodyTooLarge(_) => "body_too_large",
            Self::TooManyEvents(_) => "too_many_events",
            Self::EventTooLarge(_) => "event_too_large",
            Self::Overloaded => "overloaded",
            Self::ProgramUnavailable => "program_unavailable",
            Self::MissingSignature => "missing_signature",
            Self::BadSignature => "bad_signature",
            Self::ExpiredTimestamp(_) => "expired_timestamp",
            Self::PostbacksDisabled => "postbacks_disabled",
            Self::RateLimited(_) => "rate_limited",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        #[derive(Serialize)]
        struct ErrorBody<'a> {
            error: &'a str,
            reason: String,
        }
        let body = serde_json::to_vec(&ErrorBody {
            error: self.code(),
            reason: self.to_string(),
        })
        .unwrap_or_default();
        let mut resp = json_response(self.status(), body);
        match self {
            Self::MethodNotAllowed(allow) => {
                resp.headers_mut()
                    .insert(http::header::ALLOW, HeaderValue::from_static(allow));
            }
            Self::Overloaded | Self::ProgramUnavailable => {
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::RateLimited(limited) => {
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(limited.retry_after_secs()));
            }
            _ => {}
        }
        resp
    }
}

pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
