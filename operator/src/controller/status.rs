//! Writing a drain's status by server-side apply.

use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::step::Clock;
use super::{Context, Error, MANAGER};
use crate::crd::{DrainPhase, IngestDrain, IngestDrainStatus, PodDrainStatus};
use crate::state;

/// Applies the status of `drain` in `phase` with `rows`, unless it is the
/// one the drain has.
pub(super) async fn write(
    drain: &IngestDrain,
    ctx: &Context,
    phase: DrainPhase,
    rows: Vec<PodDrainStatus>,
    old: &IngestDrainStatus,
    clock: &Clock,
) -> Result<(), Error> {
    let ns = drain.namespace().unwrap_or_default();
    let api: Api<IngestDrain> = Api::namespaced(ctx.client.clone(), &ns);
    let completed = if phase.is_terminal() {
        old.completed_at.clone().or_else(|| Some(clock.now.clone()))
    } else {
        None
    };
    let status = IngestDrainStatus {
        phase,
        totals: state::totals(&rows),
        conditions: state::conditions(phase, &rows, drain.metadata.generation, &clock.now, old),
        pods: rows,
        started_at: Some(clock.started.clone()),
        completed_at: completed,
        observed_generation: drain.metadata.generation,
    };
    if drain.status.as_ref() == Some(&status) {
        // Nothing changed: no write, and no watch event that would wake
        // this drain again.
        return Ok(());
    }
    let patch = json!({
        "apiVersion": format!("{}/v1alpha1", crate::crd::GROUP),
        "kind": "IngestDrain",
        "status": status,
    });
    api.patch_status(
        &drain.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}
