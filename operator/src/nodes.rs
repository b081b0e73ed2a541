//! Node drains: a cordoned node, or one tainted for removal by an
//! autoscaler, gets one IngestDrain per namespace with ingest pods on it,
//! owned by the Node; uncordon or taint removal cancels them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::controller::{Context, Error};
use crate::crd::{DrainPhase, IngestDrain, NODE_LABEL};
use crate::drains::{self, Subject};
use crate::state;

/// Name of the drain of `node`'s ingest pods (one per namespace).
pub(crate) fn drain_name(node: &str) -> String {
    format!("node-{node}")
}

/// Runs the node watcher until `stop`.
pub(crate) async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    Controller::new(nodes, watcher::Config::default())
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(
            reconcile,
            |_, err, ctx| {
                ctx.metrics
                    .reconcile_errors
                    .get_or_create(&crate::telemetry::ErrorLabel { kind: err.kind() })
                    .inc();
                warn!(%err, "node reconcile failed; retrying in 5s");
                Action::requeue(Duration::from_secs(5))
            },
            ctx,
        )
        .for_each(|_| async {})
        .await;
}

fn drains_api(ctx: &Context, ns: Option<&str>) -> Api<IngestDrain> {
    match ns {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    }
}

async fn reconcile(node: Arc<Node>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = node.name_any();
    let existing = drains_api(&ctx, None)
        .list(&ListParams::default().labels(&format!("{NODE_LABEL}={name}")))
        .await?
        .items;
    let Some(reason) = state::node_signal(&node, &ctx.node_taints) else {
        cancel_drains(&ctx, &name, &existing).await?;
        return Ok(Action::await_change());
    };
    for ns in ingest_namespaces(&ctx, &name) {
        if let Some(old) = existing.iter().find(|d| d.namespace().as_deref() == Some(ns.as_str())) {
            let phase = old.status.as_ref().map(|s| s.phase).unwrap_or_default();
            if !old.spec.cancel && phase != DrainPhase::Cancelled {
                continue;
            }
            // A cancelled drain from an earlier cordon: make room for a new one.
            drains_api(&ctx, Some(&ns))
                .delete(&old.name_any(), &DeleteParams::default())
                .await?;
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        let drain = drains::operator_drain(Subject::Node(&node), &ns, &ctx.ingest.selector, &ctx.drain_defaults);
        drains::apply(&ctx.client, &drain).await?;
        info!(node = %name, %ns, %reason, "node is being emptied: IngestDrain created");
    }
    // New ingest pods may still land before the cordon reaches the scheduler.
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// The node is back in service: its drains not yet cancelled are.
async fn cancel_drains(ctx: &Context, node: &str, existing: &[IngestDrain]) -> Result<(), Error> {
    for d in existing.iter().filter(|d| !d.spec.cancel) {
        let api = drains_api(ctx, d.namespace().as_deref());
        api.patch(
            &d.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"cancel": true}})),
        )
        .await?;
        info!(%node, drain = %d.name_any(), "node back in service: drain cancelled");
    }
    Ok(())
}

/// Watched namespaces with ingest pods on `node`, from the watch cache:
/// the operator lists no pods (and may read them only in the ingest
/// namespaces).
fn ingest_namespaces(ctx: &Context, node: &str) -> BTreeSet<String> {
    ctx.pods
        .state()
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter(|p| state::selector_matches(&ctx.ingest.selector, p.labels()))
        .filter_map(|p| p.namespace())
        .filter(|ns| ctx.ingest.watches(ns))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::PodState;
    use crate::fixtures::*;

    #[tokio::test]
    async fn cordon_creates_one_drain_per_namespace_owned_by_the_node() {
        let token = token_file();
        let (ctx, api_server) = Context::test(
            1,
            token.path(),
            vec![
                ingest_pod("ingest-0", NS, "node-a"),
                ingest_pod("ingest-1", NS, "node-a"),
                ingest_pod("ingest-2", "other", "node-a"),
            ],
        );
        let n = node("node-a", true, &[]);
        let verifier = api_server.run(vec![Scenario::NodeDrains {
            node: n.clone(),
            existing: vec![],
            applied: vec![NS, "other"],
        }]);

        let action = within("reconcile", reconcile(Arc::new(n), ctx.clone()))
            .await
            .expect("reconcile");
        assert_eq!(action, Action::requeue(Duration::from_secs(30)));

        drop(ctx);
        within("verifier", verifier).await.expect("scenario");
    }

    #[tokio::test]
    async fn removal_taint_creates_a_drain_and_a_running_one_is_kept() {
        let token = token_file();
        let (ctx, api_server) = Context::test(
            1,
            token.path(),
            vec![
                ingest_pod("ingest-0", NS, "node-a"),
                ingest_pod("ingest-2", "other", "node-a"),
            ],
        );
        let n = node("node-a", false, &["karpenter.sh/disrupted"]);
        let running = with_status(
            drain("node-node-a", json!({ "nodeName": "node-a" })),
            DrainPhase::Draining,
            Duration::from_secs(5),
            vec![row("ingest-0", PodState::Draining)],
        );
        // NS already has a running drain: only "other" gets a new one.
        let verifier = api_server.run(vec![Scenario::NodeDrains {
            node: n.clone(),
            existing: vec![running],
            applied: vec!["other"],
        }]);

        within("reconcile", reconcile(Arc::new(n), ctx.clone()))
            .await
            .expect("reconcile");

        drop(ctx);
        within("verifier", verifier).await.expect("scenario");
    }

    #[tokio::test]
    async fn uncordon_cancels_the_nodes_drains() {
        let token = token_file();
        let (ctx, api_server) = Context::test(1, token.path(), vec![]);
        let n = node("node-a", false, &[]);
        let running = drain("node-node-a", json!({ "nodeName": "node-a" }));
        let mut already = drain("node-node-a-old", json!({ "nodeName": "node-a", "cancel": true }));
        already.metadata.name = Some("node-node-a-old".into());
        // Only the drain not yet cancelled is patched.
        let verifier = api_server.run(vec![Scenario::NodeDrainsCancelled {
            node: n.clone(),
            existing: vec![running, already],
            cancelled: vec!["node-node-a"],
        }]);

        let action = within("reconcile", reconcile(Arc::new(n), ctx.clone()))
            .await
            .expect("reconcile");
        assert_eq!(action, Action::await_change());

        drop(ctx);
        within("verifier", verifier).await.expect("scenario");
    }
}
