//! The drains-by-phase gauge, recounted from the controller's cache.

use std::collections::BTreeMap;
use std::time::Duration;

use kube::runtime::reflector::Store;
use tokio_util::sync::CancellationToken;

use crate::crd::{DrainPhase, IngestDrain};
use crate::telemetry::{Metrics, PhaseLabel};

const PHASES: [DrainPhase; 6] = [
    DrainPhase::Pending,
    DrainPhase::Draining,
    DrainPhase::Drained,
    DrainPhase::TimedOut,
    DrainPhase::Cancelled,
    DrainPhase::Failed,
];

fn phase_label(p: DrainPhase) -> &'static str {
    match p {
        DrainPhase::Pending => "Pending",
        DrainPhase::Draining => "Draining",
        DrainPhase::Drained => "Drained",
        DrainPhase::TimedOut => "TimedOut",
        DrainPhase::Cancelled => "Cancelled",
        DrainPhase::Failed => "Failed",
    }
}

/// Sets the gauge of drains by phase every 5 s until `stop`.
pub(super) async fn keep_counting(store: Store<IngestDrain>, metrics: Metrics, stop: CancellationToken) {
    loop {
        let mut counts = BTreeMap::new();
        for d in store.state() {
            *counts
                .entry(phase_label(d.status.as_ref().map(|s| s.phase).unwrap_or_default()))
                .or_insert(0i64) += 1;
        }
        for p in PHASES {
            metrics
                .drains
                .get_or_create(&PhaseLabel { phase: phase_label(p) })
                .set(counts.get(phase_label(p)).copied().unwrap_or(0));
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            () = stop.cancelled() => return,
        }
    }
}
