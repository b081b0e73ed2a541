//! The `IngestDrain` operator: turns node drains, evictions and IngestDrain
//! resources into lossless drains of RTMP ingest pods over their control API.

#![warn(unreachable_pub)]

pub mod config;
mod controller;
#[expect(
    unreachable_pub,
    reason = "KubeSchema's derive copies each validated struct, `pub` included, into a function body"
)]
pub mod crd;
mod drains;
mod leader;
mod nodes;
pub mod plugin;
mod pods;
pub mod run;
mod settings;
mod state;
mod telemetry;
pub mod tls;
pub mod webhook;
pub mod yaml;

#[cfg(test)]
mod fixtures;
