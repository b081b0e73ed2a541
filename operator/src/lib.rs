//! The `IngestDrain` operator: turns node drains, evictions and IngestDrain
//! resources into lossless drains of RTMP ingest pods over their control API.

pub mod config;
pub mod crd;
pub mod pods;
pub mod state;
pub mod yaml;
