//! The `IngestDrain` operator: turns node drains, evictions and IngestDrain
//! resources into lossless drains of RTMP ingest pods over their control API.

pub mod config;
pub mod controller;
pub mod crd;
mod drains;
pub mod leader;
pub mod nodes;
pub mod pods;
pub mod run;
mod settings;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod webhook;
pub mod yaml;

#[cfg(test)]
mod fixtures;
