//! Test tooling of lossless-ingest, kept out of the product: the ingest pod
//! never links it; its tests, the operator's tests, the benchmarks and the
//! end-to-end suites do.
//!
//! - [`publisher`]: a capable test publisher (the client side of RTMP Go
//!   Away and Enhanced RTMP Reconnect Request) with synthetic media whose
//!   every payload is unique;
//! - [`audit`]: what a publisher sent against what the origin recorded;
//! - [`lab`]: in-process ingest pods, a readiness-aware balancer standing in
//!   for a Service, a link that can be cut, stalled or narrowed;
//! - [`origin`]: a local nginx-rtmp origin that records every stream;
//! - [`ffmpeg`]: ffmpeg publishing a synthetic test stream (the incapable
//!   publisher).
//!
//! Tools on top (`src/bin/`): `ingest-publisher`, `ingest-audit` and
//! `ingest-demo` (`cargo run -p ingest-testkit --bin ingest-demo`).

#![warn(unreachable_pub)]

pub mod audit;
pub mod ffmpeg;
pub mod lab;
pub mod origin;
pub mod publisher;
