//! RTMP ingest that moves its publishers to other pods without losing media.
//!
//! Layers: the codec (`ingest_rtmp`: handshake, chunk, AMF0, messages, FLV)
//! → [`rtmp`] (the transport over sockets) → [`session`] (one publisher) →
//! [`relay`] (push to the origin), with the [`registry`] of connections, the
//! [`drain`] engine, [`control`] (the gRPC API the operator drives),
//! [`server`] (accept loop, limits, shutdown) and [`http`] (health,
//! readiness, metrics). The test publisher, the loss audit and the tools
//! built on them live in `ingest-testkit`.

#![warn(unreachable_pub)]

pub mod auth;
pub mod config;
pub mod control;
pub mod drain;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod registry;
pub mod relay;
pub mod rtmp;
pub mod server;
pub mod session;
mod settings;
#[cfg(test)]
mod stress;
