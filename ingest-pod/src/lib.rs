//! RTMP ingest that moves its publishers to other pods without losing media.
//!
//! Layers: [`rtmp`] (handshake, chunk, AMF0, messages, transport) →
//! [`session`] (one publisher) → [`relay`] (push to the origin), with the
//! [`registry`] of connections, the [`drain`] engine, [`server`] (accept
//! loop, limits, shutdown) and [`http`] (health, readiness, metrics).
//! [`publisher`] is a capable test publisher and [`audit`] the loss check
//! the tests and the demo share.

pub mod audit;
pub mod auth;
pub mod config;
pub mod control;
pub mod drain;
pub mod flv;
pub mod http;
pub mod keys;
pub mod lab;
pub mod media;
pub mod metrics;
pub mod origin;
pub mod publisher;
pub mod registry;
pub mod relay;
pub mod rtmp;
pub mod server;
pub mod session;
