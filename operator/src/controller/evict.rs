//! Evicting the pods a drain released, when the drain asks for it.

use k8s_openapi::api::core::v1::Pod;
use kube::api::EvictParams;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::Context;
use crate::crd::{IngestDrain, PodDrainStatus, PodState};

/// Whether a row's pod is released and not yet evicted.
fn released(row: &PodDrainStatus) -> bool {
    matches!(row.state, PodState::Drained | PodState::TimedOut)
}

/// Released pods the drain must still evict (an eviction refused by a
/// PodDisruptionBudget, or a race, is retried even once the drain is done).
pub(super) fn pending(drain: &IngestDrain, rows: &[PodDrainStatus]) -> bool {
    drain.spec.evict && rows.iter().any(released)
}

/// Evicts the released pods of `rows`; a refused eviction is noted on its
/// row and retried by a later reconcile.
pub(super) async fn evict_released(drain: &IngestDrain, ctx: &Context, rows: &mut [PodDrainStatus]) {
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &drain.namespace().unwrap_or_default());
    for row in rows.iter_mut().filter(|r| released(r)) {
        match pods_api.evict(&row.name, &EvictParams::default()).await {
            Ok(_) => {
                info!(pod = %row.name, "drained pod evicted");
                row.state = PodState::Evicted;
                row.message = None;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => row.state = PodState::Gone,
            Err(err) => {
                // A PodDisruptionBudget (429) or a race: next reconcile tries again.
                warn!(pod = %row.name, %err, "eviction refused; retrying");
                row.message = Some(format!("eviction refused: {err}"));
            }
        }
    }
}
