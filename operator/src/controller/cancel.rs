//! Cancelling a drain on its pods: when its spec says so, or when it is
//! deleted mid-way.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::{info, warn};

use super::step::Clock;
use super::{Context, Error, drain_id, status};
use crate::crd::{DrainPhase, IngestDrain, IngestDrainStatus, PodDrainStatus, PodState};

/// The step of a cancelled drain: its pods serve again (once), and its
/// status says Cancelled.
pub(super) async fn cancel(
    drain: &IngestDrain,
    ctx: &Context,
    mut rows: Vec<PodDrainStatus>,
    pods: &[Pod],
    old: &IngestDrainStatus,
    clock: &Clock,
) -> Result<(), Error> {
    if old.phase != DrainPhase::Cancelled {
        cancel_pods(drain, ctx, &mut rows, pods).await;
        ctx.event(
            drain,
            EventType::Normal,
            "Cancelled",
            "drain cancelled: the pods serve again".into(),
        )
        .await;
    }
    status::write(drain, ctx, DrainPhase::Cancelled, rows, old, clock).await
}

/// Deleting an IngestDrain mid-way cancels its pods' drains.
pub(super) async fn cleanup(drain: &IngestDrain, ctx: &Context) {
    let old = drain.status.clone().unwrap_or_default();
    if !old.phase.is_terminal() {
        let mut rows = old.pods.clone();
        cancel_pods(drain, ctx, &mut rows, &ctx.pods_of(drain)).await;
        info!("IngestDrain deleted mid-way: pod drains cancelled");
    }
}

/// Cancels the drain on the pods of `rows` still there; each row says how
/// it went.
async fn cancel_pods(drain: &IngestDrain, ctx: &Context, rows: &mut [PodDrainStatus], pods: &[Pod]) {
    let token = match ctx.token() {
        Ok(t) => t,
        Err(err) => {
            warn!(%err, "cannot read the control token to cancel");
            return;
        }
    };
    let id = drain_id(drain);
    for row in rows
        .iter_mut()
        .filter(|r| !matches!(r.state, PodState::Evicted | PodState::Gone))
    {
        let ip = pods
            .iter()
            .find(|p| p.name_any() == row.name)
            .and_then(|p| p.status.as_ref()?.pod_ip.clone());
        let Some(ip) = ip else { continue };
        match ctx.channels.client(&ip, ctx.pod_access.control_port, &token) {
            Ok(mut c) => match c.cancel_drain(&id).await {
                Ok(None) => row.state = PodState::Cancelled,
                // Not ours any more, or the pod is terminating: it drains on.
                Ok(Some(reason)) => {
                    info!(pod = %row.name, %reason, "the pod keeps draining");
                    row.message = Some(format!("not cancelled: {reason}"));
                }
                Err(err) => row.message = Some(format!("cancel failed: {err}")),
            },
            Err(err) => row.message = Some(format!("cancel failed: {err}")),
        }
    }
}
