//! The drains the operator creates itself: one per namespace for a node
//! being emptied, one for each pod whose eviction the gate holds. Both are
//! built here, typed, and applied the same way.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::Value;

use crate::controller::MANAGER;
use crate::crd::{IngestDrain, IngestDrainSpec, NODE_LABEL, Redirect, TRIGGER_LABEL};
use crate::settings::DrainDefaults;

/// What an operator-made drain drains; its owner, so it goes with it.
#[derive(Clone, Copy)]
pub(crate) enum Subject<'a> {
    /// The ingest pods of a cordoned or tainted node, in one namespace.
    Node(&'a Node),
    /// One pod whose eviction is held.
    Pod(&'a Pod),
}

/// The drain the operator creates in `ns` for `subject`: the ingest pods
/// `selector` takes, evicted once drained, with the operator's defaults.
pub(crate) fn operator_drain(
    subject: Subject<'_>,
    ns: &str,
    selector: &LabelSelector,
    defaults: &DrainDefaults,
) -> IngestDrain {
    let (name, labels, owner, node_name, pod_names) = match subject {
        Subject::Node(node) => {
            let node_name = node.name_any();
            let labels = [(NODE_LABEL, node_name.as_str()), (TRIGGER_LABEL, "node")];
            let owner = owner("Node", node_name.clone(), node.uid());
            (
                crate::nodes::drain_name(&node_name),
                labels_of(&labels),
                owner,
                Some(node_name),
                None,
            )
        }
        Subject::Pod(pod) => {
            let pod_name = pod.name_any();
            let labels = labels_of(&[(TRIGGER_LABEL, "eviction")]);
            let owner = owner("Pod", pod_name.clone(), pod.uid());
            (
                crate::webhook::drain_name(&pod_name),
                labels,
                owner,
                None,
                Some(vec![pod_name]),
            )
        }
    };
    let spec = IngestDrainSpec {
        selector: selector.clone(),
        node_name,
        pod_names,
        deadline_seconds: i64::try_from(defaults.deadline.as_secs().max(1)).unwrap_or(i64::MAX),
        rate: defaults.rate,
        max_in_flight: None,
        incapable_policy: defaults.incapable_policy,
        evict: true,
        propagation_delay_seconds: None,
        redirect: defaults
            .redirect_template
            .clone()
            .map(|url_template| Redirect { url_template }),
        cancel: false,
    };
    let mut drain = IngestDrain::new(&name, spec);
    drain.metadata.namespace = Some(ns.to_owned());
    drain.metadata.labels = Some(labels);
    drain.metadata.owner_references = Some(vec![owner]);
    drain
}

fn labels_of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn owner(kind: &str, name: String, uid: Option<String>) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: kind.into(),
        name,
        uid: uid.unwrap_or_default(),
        ..OwnerReference::default()
    }
}

/// Creates or updates `drain` by server-side apply, forced: every replica
/// may race to create the same drain.
pub(crate) async fn apply(client: &Client, drain: &IngestDrain) -> Result<(), kube::Error> {
    let api: Api<IngestDrain> = Api::namespaced(client.clone(), &drain.namespace().unwrap_or_default());
    let params = PatchParams::apply(MANAGER).force();
    api.patch(&drain.name_any(), &params, &Patch::Apply(apply_body(drain)?))
        .await?;
    Ok(())
}

/// `drain` as applied: without `spec.cancel`, which the operator's field
/// manager must not own (a forced apply would then undo a cancel).
fn apply_body(drain: &IngestDrain) -> Result<Value, kube::Error> {
    let mut body = serde_json::to_value(drain).map_err(kube::Error::SerdeError)?;
    if let Some(spec) = body.get_mut("spec").and_then(Value::as_object_mut) {
        spec.remove("cancel");
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::crd::IncapablePolicy;
    use crate::fixtures::{NS, ingest_pod, node};

    fn defaults(redirect: Option<&str>) -> DrainDefaults {
        DrainDefaults {
            deadline: Duration::from_secs(90),
            rate: 50.0,
            incapable_policy: IncapablePolicy::Disconnect,
            redirect_template: redirect.map(str::to_owned),
        }
    }

    fn selector() -> LabelSelector {
        crate::state::parse_selector("app.kubernetes.io/component=ingest").expect("selector")
    }

    #[test]
    fn a_node_drain_is_applied_as_before() {
        let n = node("node-a", true, &[]);
        let d = operator_drain(Subject::Node(&n), NS, &selector(), &defaults(None));
        assert_eq!(
            apply_body(&d).expect("JSON"),
            json!({
                "apiVersion": "ingest.lossless.dev/v1alpha1",
                "kind": "IngestDrain",
                "metadata": {
                    "name": "node-node-a",
                    "namespace": NS,
                    "labels": { NODE_LABEL: "node-a", TRIGGER_LABEL: "node" },
                    "ownerReferences": [{ "apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "uid-node-a" }],
                },
                "spec": {
                    "selector": { "matchLabels": { "app.kubernetes.io/component": "ingest" } },
                    "nodeName": "node-a",
                    "deadlineSeconds": 90,
                    "rate": 50.0,
                    "incapablePolicy": "Disconnect",
                    "evict": true,
                },
            })
        );
    }

    #[test]
    fn an_eviction_drain_is_applied_as_before() {
        let pod = ingest_pod("ingest-0", NS, "node-a");
        let template = "rtmp://{pod}.ingest:1935/live";
        let d = operator_drain(Subject::Pod(&pod), NS, &selector(), &defaults(Some(template)));
        assert_eq!(
            apply_body(&d).expect("JSON"),
            json!({
                "apiVersion": "ingest.lossless.dev/v1alpha1",
                "kind": "IngestDrain",
                "metadata": {
                    "name": "evict-ingest-0",
                    "namespace": NS,
                    "labels": { TRIGGER_LABEL: "eviction" },
                    "ownerReferences": [{ "apiVersion": "v1", "kind": "Pod", "name": "ingest-0", "uid": "uid-ingest-0" }],
                },
                "spec": {
                    "selector": { "matchLabels": { "app.kubernetes.io/component": "ingest" } },
                    "podNames": ["ingest-0"],
                    "deadlineSeconds": 90,
                    "rate": 50.0,
                    "incapablePolicy": "Disconnect",
                    "evict": true,
                    "redirect": { "urlTemplate": template },
                },
            })
        );
    }
}
