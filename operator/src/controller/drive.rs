//! Driving the pods of a drain over their control API: start the drain on
//! each pod (once), read its status, and follow it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use ingest_proto::v1::{IncapablePolicy as PbPolicy, PodStatus, StartDrainRequest};
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use tracing::warn;

use super::step::Clock;
use super::{Context, drain_id, rows};
use crate::crd::{DrainPhase, IncapablePolicy, IngestDrain, PodDrainStatus, PodState};
use crate::pods::PodClient;
use crate::state;

/// Pods of one drain contacted at once.
const POD_CONCURRENCY: usize = 16;

/// Pods of `drain`'s namespace that any live drain (this one included)
/// still drains: no redirect target may be one of them.
pub(super) fn draining_pods(
    drain: &IngestDrain,
    rows: &[PodDrainStatus],
    store: &Store<IngestDrain>,
) -> HashSet<String> {
    let ns = drain.namespace();
    let others = store
        .state()
        .iter()
        .filter(|d| d.namespace() == ns && d.metadata.deletion_timestamp.is_none() && !d.spec.cancel)
        .filter_map(|d| d.status.clone())
        .filter(|s| !s.phase.is_terminal())
        .flat_map(|s| s.pods)
        .collect::<Vec<_>>();
    rows.iter()
        .chain(&others)
        .filter(|r| !r.state.is_done() || r.state == PodState::Drained)
        .map(|r| r.name.clone())
        .collect()
}

/// The StartDrain request of `drain`, with what is left of its deadline.
pub(super) fn start_request(drain: &IngestDrain, remaining: Duration, redirects: Vec<String>) -> StartDrainRequest {
    let spec = &drain.spec;
    StartDrainRequest {
        drain_id: drain_id(drain),
        deadline: Some(remaining.max(Duration::from_secs(1)).try_into().unwrap_or_default()),
        rate: spec.rate,
        max_in_flight: spec.max_in_flight.unwrap_or(0).max(0) as u32,
        incapable_policy: match spec.incapable_policy {
            IncapablePolicy::Wait => PbPolicy::Wait,
            IncapablePolicy::Disconnect => PbPolicy::Disconnect,
        }
        .into(),
        redirect_tc_urls: redirects,
        propagation_delay: spec
            .propagation_delay_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64).try_into().unwrap_or_default()),
    }
}

/// Asks the pods of `targets` (row index, pod IP) with `request`, in
/// parallel (one drain may cover a hundred of them), and updates their
/// rows from the answers.
pub(super) async fn drive(
    drain: &IngestDrain,
    ctx: &Context,
    rows: &mut [PodDrainStatus],
    targets: Vec<(usize, String)>,
    request: StartDrainRequest,
    token: &str,
    clock: &Clock,
) {
    let others = live_others(drain, &ctx.drains);
    let port = ctx.pod_access.control_port;
    let driven: Vec<_> = futures::stream::iter(targets)
        .map(|(i, ip)| {
            let (request, others) = (request.clone(), &others);
            async move {
                let result = match ctx.channels.client(&ip, port, token) {
                    Ok(client) => drive_pod(client, request, |id| others.contains_key(id)).await,
                    Err(err) => Err(err),
                };
                (i, ip, result)
            }
        })
        .buffer_unordered(POD_CONCURRENCY)
        .collect()
        .await;
    for (i, ip, result) in driven {
        let row = &mut rows[i];
        match result {
            Ok((status, id)) => {
                *row = state::row_from_status(row, &status, &id, clock.now.clone());
                if let Some(other) = others.get(&id) {
                    row.message = Some(format!(
                        "follows the drain of IngestDrain {other} already running on the pod"
                    ));
                }
                if let Ok(client) = ctx.channels.client(&ip, port, token) {
                    ctx.followers.follow(drain, &row.name, client);
                }
            }
            Err(err) => {
                warn!(pod = %row.name, %err, "pod control API failed");
                row.state = rows::unreachable_state(clock);
                row.message = Some(err.to_string());
                row.last_update = Some(clock.now.clone());
            }
        }
        if clock.past_deadline && !row.state.is_done() {
            row.state = PodState::TimedOut;
        }
    }
}

/// StartDrain (idempotent by id) then GetStatus.
/// Starts this drain on a pod unless the pod runs it already, or runs the
/// drain of another live IngestDrain (`live_other` names it by drain
/// id): then the pod is left alone and that drain is followed. Two drains
/// covering one pod (a node drain and the eviction gate's, started a moment
/// apart) would otherwise replace each other's drain on every reconcile.
/// Returns the pod's status and the id of the drain it runs for us.
async fn drive_pod(
    mut client: PodClient,
    req: StartDrainRequest,
    live_other: impl Fn(&str) -> bool,
) -> Result<(PodStatus, String), crate::pods::Error> {
    let status = client.status().await?;
    if let Some(running) = status.drain.as_ref()
        && running.phase() != ingest_proto::v1::DrainPhase::Cancelled
        && (running.id == req.drain_id || live_other(&running.id))
    {
        let id = running.id.clone();
        let stale = running.spec.as_ref().map(|s| &s.redirect_tc_urls) != Some(&req.redirect_tc_urls);
        if id == req.drain_id && stale {
            // Ours, with targets that changed: StartDrain with the same id
            // refreshes them for the next wave, and changes nothing else.
            client.start_drain(req).await?;
            return Ok((client.status().await?, id));
        }
        // Ours already, or another live drain's: nothing to start.
        return Ok((status, id));
    }
    let id = req.drain_id.clone();
    client.start_drain(req).await?;
    Ok((client.status().await?, id))
}

/// Drain ids of the other IngestDrains of `drain`'s namespace that still
/// run (not cancelled, not being deleted), with their names.
fn live_others(drain: &IngestDrain, store: &Store<IngestDrain>) -> HashMap<String, String> {
    let ns = drain.namespace();
    let own = drain_id(drain);
    store
        .state()
        .iter()
        .filter(|d| d.namespace() == ns && d.metadata.deletion_timestamp.is_none() && !d.spec.cancel)
        .filter(|d| d.status.as_ref().is_none_or(|s| s.phase != DrainPhase::Cancelled))
        .map(|d| (drain_id(d), d.name_any()))
        .filter(|(id, _)| *id != own)
        .collect()
}
