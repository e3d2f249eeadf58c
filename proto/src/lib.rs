//! adtrack's contracts: the tracking event on the wire, the program core-data
//! model, its Redis layout and the pub/sub change message.
//!
//! # Tracking event
//!
//! [`v1::TrackingEvent`] is generated at build time by prost from
//! `proto/adtrack/v1/tracking_event.proto` (compiled by protox, a pure-Rust
//! protobuf compiler, so no `protoc` is needed on any machine). Fields 1-8
//! keep the reference design's numbers and types.
//!
//! # Program core data
//!
//! Operators write [`program::Program`] records as JSON; the reference
//! design's `data.json` loads unchanged. See [`redis_layout`] for how they are
//! kept in Redis and announced to the trackers.

pub mod customer;
pub mod event;
pub mod kpl;
pub mod postback;
pub mod program;
pub mod redis_layout;

/// Generated protobuf types, package `adtrack.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/adtrack.v1.rs"));
}
