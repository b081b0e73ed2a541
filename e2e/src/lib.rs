//! End-to-end harness: a real multi-node Kubernetes cluster on this machine
//! (built and run by `e2e/cluster/cluster`), real clients (kubectl, ffmpeg),
//! a real RTMP origin (nginx-rtmp).
//!
//! A scenario is an `async fn(Arc<Cluster>) -> anyhow::Result<()>`; the
//! [`runner`] brings the cluster up once, runs the scenarios serially,
//! restores the starting state between them and always tears down.

pub mod cluster;
pub mod live_rules;
pub mod lossless;
pub mod metric_names;
pub mod obs;
pub mod rtmp;
pub mod runner;
pub mod system;

pub use cluster::{Cluster, Image};
pub use runner::Scenario;
