//! The status rows of a drain against the pods as they are now.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::step::Clock;
use crate::crd::{IngestDrain, IngestDrainStatus, PodDrainStatus, PodState};
use crate::state;

/// The drain's rows: those of its status, or the pods it takes if it has
/// not started (the list is frozen by the first step).
pub(super) fn current(drain: &IngestDrain, old: &IngestDrainStatus, pods: &[Pod]) -> Vec<PodDrainStatus> {
    if old.pods.is_empty() && old.started_at.is_none() {
        state::initial_rows(&drain.spec, pods)
    } else {
        old.pods.clone()
    }
}

/// Marks the unfinished rows whose pod is gone, replaced or without an IP;
/// returns the others by index, with their pod's IP: the pods to ask.
pub(super) fn reachable(rows: &mut [PodDrainStatus], pods: &[Pod], clock: &Clock) -> Vec<(usize, String)> {
    let mut targets = Vec::new();
    for (i, row) in rows.iter_mut().enumerate().filter(|(_, r)| !r.state.is_done()) {
        let Some(pod) = pods.iter().find(|p| p.name_any() == row.name) else {
            *row = gone(row, "the pod is gone", clock);
            continue;
        };
        if !row.uid.is_empty() && pod.uid().as_deref() != Some(row.uid.as_str()) {
            *row = gone(row, "the pod was replaced", clock);
            continue;
        }
        match pod.status.as_ref().and_then(|s| s.pod_ip.clone()) {
            Some(ip) => targets.push((i, ip)),
            None => {
                row.state = unreachable_state(clock);
                row.message = Some("the pod has no IP".into());
            }
        }
    }
    targets
}

fn gone(row: &PodDrainStatus, why: &str, clock: &Clock) -> PodDrainStatus {
    PodDrainStatus {
        state: PodState::Gone,
        message: Some(why.into()),
        last_update: Some(clock.now.clone()),
        ..row.clone()
    }
}

/// A pod that cannot be asked is retried until the deadline.
pub(super) fn unreachable_state(clock: &Clock) -> PodState {
    if clock.past_deadline {
        PodState::TimedOut
    } else {
        PodState::Unreachable
    }
}
