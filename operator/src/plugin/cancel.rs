//! `kubectl ingest cancel NAME`: sets the drain's `spec.cancel`, as an
//! uncordon does; the operator stops the pods' drains (they serve again)
//! and the IngestDrain stays, Cancelled.

use std::future::Future;
use std::io::Write;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use super::follow::{self, Until};
use super::{CancelArgs, Error, Exit, FIELD_MANAGER, FollowArgs, Result, get_drain};
use crate::crd::{DrainPhase, IngestDrain, NODE_LABEL};

pub(super) async fn run(
    client: &Client,
    ns: &str,
    args: CancelArgs,
    interrupt: impl Future<Output = ()>,
) -> Result<Exit> {
    let CancelArgs {
        name,
        follow: FollowArgs { wait, timeout },
    } = args;
    let drain = get_drain(client, ns, &name).await?;
    let api: Api<IngestDrain> = Api::namespaced(client.clone(), ns);
    let phase = drain.status.as_ref().map(|s| s.phase).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    if drain.spec.cancel && phase == DrainPhase::Cancelled {
        writeln!(out, "ingestdrain.ingest.lossless.dev/{name} already cancelled")?;
        return Ok(Exit::Ok);
    }
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    api.patch(&name, &params, &Patch::Merge(json!({ "spec": { "cancel": true } })))
        .await
        .map_err(|e| Error::api(format!("cancelling IngestDrain {name}"), &e))?;
    writeln!(out, "ingestdrain.ingest.lossless.dev/{name} cancelled")?;
    drop(out);
    warn_if_node_still_cordoned(client, &drain).await;
    if !wait {
        return Ok(Exit::Ok);
    }
    follow::follow(api, &name, Until::Cancelled, timeout, interrupt).await
}

/// The operator makes a node's drain again while the node stays cordoned:
/// say so, since cancelling alone will not last.
async fn warn_if_node_still_cordoned(client: &Client, drain: &IngestDrain) {
    let Some(node) = drain.labels().get(NODE_LABEL) else {
        return;
    };
    let cordoned = Api::<Node>::all(client.clone())
        .get_opt(node)
        .await
        .ok()
        .flatten()
        .and_then(|n| n.spec?.unschedulable)
        .unwrap_or(false);
    if cordoned {
        eprintln!(
            "note: node {node} is still cordoned, so the operator will drain it again: `kubectl uncordon {node}` is what stops a node's drain"
        );
    }
}
