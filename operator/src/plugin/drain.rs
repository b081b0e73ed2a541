//! `kubectl ingest drain node NODE | pod POD...`: checks that there is
//! something to drain, creates the IngestDrain, and follows it on request.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};

use super::follow::{self, Until};
use super::{DrainOpts, DrainTarget, Error, Exit, FIELD_MANAGER, FollowArgs, Result, api_code, ensure_crd};
use crate::crd::{IngestDrain, IngestDrainSpec, Redirect, TRIGGER_LABEL};
use crate::state;

/// What a drain made here drains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Node(String),
    Pods(Vec<String>),
}

/// The drain to make, from the command line.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) target: Target,
    pub(crate) drain: IngestDrain,
    pub(crate) dry_run: bool,
    pub(crate) wait: bool,
    pub(crate) timeout: Option<Duration>,
}

/// Every flag, read once into the IngestDrain and what to do with it.
pub(crate) fn plan(target: DrainTarget, ns: &str) -> Result<Plan> {
    let (target, opts) = match target {
        DrainTarget::Node { node, opts } => (Target::Node(node), opts),
        DrainTarget::Pod { pods, opts } => (Target::Pods(pods), opts),
    };
    let DrainOpts {
        name,
        selector,
        deadline,
        rate,
        max_in_flight,
        incapable_policy,
        evict,
        propagation_delay,
        redirect,
        dry_run,
        follow: FollowArgs { wait, timeout },
    } = opts;
    let spec = IngestDrainSpec {
        selector: state::parse_selector(&selector).map_err(Error::Selector)?,
        node_name: None,
        pod_names: None,
        deadline_seconds: whole_seconds(deadline),
        rate,
        max_in_flight,
        incapable_policy,
        evict,
        propagation_delay_seconds: propagation_delay.map(whole_seconds),
        redirect: redirect.map(|url_template| Redirect { url_template }),
        cancel: false,
    };
    let drain = build(&target, name, ns, spec);
    Ok(Plan {
        target,
        drain,
        dry_run,
        wait,
        timeout,
    })
}

/// `--dry-run`: the IngestDrain as YAML.
pub(super) fn print(plan: &Plan) -> Result<Exit> {
    let value = serde_json::to_value(&plan.drain).map_err(|e| Error::Output(e.into()))?;
    write!(std::io::stdout().lock(), "{}", crate::yaml::to_yaml(&value))?;
    Ok(Exit::Ok)
}

/// Checks there is something to drain, creates the IngestDrain, and
/// follows it with `--wait`.
pub(super) async fn run(client: &Client, ns: &str, plan: Plan, interrupt: impl Future<Output = ()>) -> Result<Exit> {
    let Plan {
        target,
        drain,
        dry_run: _,
        wait,
        timeout,
    } = plan;
    ensure_crd(client).await?;
    let pods = pods_to_drain(client, ns, &target, &drain.spec.selector).await?;
    let api: Api<IngestDrain> = Api::namespaced(client.clone(), ns);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    };
    let created = api
        .create(&params, &drain)
        .await
        .map_err(|e| Error::api("creating the IngestDrain", &e))?;
    let name = created.name_any();
    writeln!(
        std::io::stdout().lock(),
        "ingestdrain.ingest.lossless.dev/{name} created ({} ingest pod(s): {})",
        pods.len(),
        pods.join(", ")
    )?;
    if !wait {
        return Ok(Exit::Ok);
    }
    follow::follow(api, &name, Until::End, timeout, interrupt).await
}

/// The CRD takes whole seconds; a fraction counts as one more.
fn whole_seconds(d: Duration) -> i64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

/// The IngestDrain for `target` in `ns`: `spec` with the target filled in,
/// named `name` or generated from the target, labelled as made by kubectl.
pub(crate) fn build(target: &Target, name: Option<String>, ns: &str, mut spec: IngestDrainSpec) -> IngestDrain {
    let base = match target {
        Target::Node(node) => {
            spec.node_name = Some(node.clone());
            format!("drain-{node}-")
        }
        Target::Pods(pods) => {
            spec.pod_names = Some(pods.clone());
            match pods.as_slice() {
                [one] => format!("drain-{one}-"),
                _ => "drain-pods-".to_owned(),
            }
        }
    };
    let mut drain = IngestDrain::new(name.as_deref().unwrap_or_default(), spec);
    if name.is_none() {
        drain.metadata.name = None;
        drain.metadata.generate_name = Some(base);
    }
    drain.metadata.namespace = Some(ns.to_owned());
    drain.metadata.labels = Some(BTreeMap::from([(TRIGGER_LABEL.to_owned(), "kubectl".to_owned())]));
    drain
}

/// The names of the ingest pods `target` takes; an error that says why
/// when there are none, or when a pod named is not an ingest pod.
async fn pods_to_drain(client: &Client, ns: &str, target: &Target, selector: &LabelSelector) -> Result<Vec<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector_text = state::selector_string(selector);
    match target {
        Target::Node(node) => {
            match Api::<Node>::all(client.clone()).get_opt(node).await {
                Ok(Some(_)) => {}
                Ok(None) => return Err(Error::NodeNotFound(node.clone())),
                // No right to read nodes: the pod list below still tells.
                Err(err) if api_code(&err) == Some(403) => {}
                Err(err) => return Err(Error::api(format!("reading node {node}"), &err)),
            }
            let params = ListParams::default()
                .labels(&selector_text)
                .fields(&format!("spec.nodeName={node}"));
            let names: Vec<String> = pods
                .list(&params)
                .await
                .map_err(|e| Error::api("listing the ingest pods", &e))?
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .map(ResourceExt::name_any)
                .collect();
            if names.is_empty() {
                return Err(Error::NoIngestPods {
                    node: node.clone(),
                    ns: ns.to_owned(),
                    selector: selector_text,
                });
            }
            Ok(names)
        }
        Target::Pods(names) => {
            for name in names {
                let pod = pods
                    .get_opt(name)
                    .await
                    .map_err(|e| Error::api(format!("reading pod {name}"), &e))?
                    .ok_or_else(|| Error::PodNotFound {
                        pod: name.clone(),
                        ns: ns.to_owned(),
                    })?;
                if !state::selector_matches(selector, pod.labels()) {
                    return Err(Error::NotIngestPod {
                        pod: name.clone(),
                        selector: selector_text,
                    });
                }
            }
            Ok(names.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::crd::IncapablePolicy;

    fn spec() -> IngestDrainSpec {
        IngestDrainSpec {
            selector: state::parse_selector("app.kubernetes.io/component=ingest").expect("selector"),
            node_name: None,
            pod_names: None,
            deadline_seconds: 300,
            rate: 50.0,
            max_in_flight: None,
            incapable_policy: IncapablePolicy::Disconnect,
            evict: false,
            propagation_delay_seconds: None,
            redirect: None,
            cancel: false,
        }
    }

    #[test]
    fn a_node_drain_gets_a_generated_name() {
        let d = build(&Target::Node("node-a".into()), None, "live", spec());
        assert_eq!(
            serde_json::to_value(&d).expect("JSON"),
            json!({
                "apiVersion": "ingest.lossless.dev/v1alpha1",
                "kind": "IngestDrain",
                "metadata": {
                    "generateName": "drain-node-a-",
                    "namespace": "live",
                    "labels": { TRIGGER_LABEL: "kubectl" }
                },
                "spec": {
                    "selector": { "matchLabels": { "app.kubernetes.io/component": "ingest" } },
                    "nodeName": "node-a",
                    "deadlineSeconds": 300,
                    "rate": 50.0,
                    "incapablePolicy": "Disconnect",
                    "evict": false,
                    "cancel": false
                }
            })
        );
    }

    #[test]
    fn a_pod_drain_names_its_pods() {
        let one = build(&Target::Pods(vec!["ingest-0".into()]), None, "live", spec());
        assert_eq!(one.metadata.generate_name.as_deref(), Some("drain-ingest-0-"));
        assert_eq!(one.spec.pod_names, Some(vec!["ingest-0".to_owned()]));
        assert_eq!(one.spec.node_name, None);
        let two = build(
            &Target::Pods(vec!["a".into(), "b".into()]),
            Some("maintenance".into()),
            "live",
            spec(),
        );
        assert_eq!(two.metadata.name.as_deref(), Some("maintenance"));
        assert_eq!(two.metadata.generate_name, None);
        assert_eq!(two.spec.pod_names, Some(vec!["a".to_owned(), "b".to_owned()]));
    }

    fn plan_of(line: &str) -> Plan {
        use clap::Parser;
        let args = super::super::Args::try_parse_from(std::iter::once("kubectl-ingest").chain(line.split_whitespace()))
            .expect("parses");
        let super::super::Command::Drain(d) = args.command else {
            panic!("not drain: {line}")
        };
        plan(d.target, "live").expect("plan")
    }

    #[test]
    fn the_flags_become_the_spec() {
        let p = plan_of(
            "drain node node-b --deadline 90500ms --rate 2.5 --max-in-flight 4 --incapable-policy wait \
             --evict --propagation-delay 8s --redirect rtmp://{pod}.ingest.example.com/live -l app=rtmp,tier=edge",
        );
        assert_eq!(p.target, Target::Node("node-b".into()));
        assert!(!p.wait && !p.dry_run && p.timeout.is_none());
        let spec = &p.drain.spec;
        assert_eq!(spec.node_name.as_deref(), Some("node-b"));
        assert_eq!(spec.deadline_seconds, 91, "a fraction of a second counts as one more");
        assert_eq!(spec.propagation_delay_seconds, Some(8));
        assert_eq!(spec.rate, 2.5);
        assert_eq!(spec.max_in_flight, Some(4));
        assert_eq!(spec.incapable_policy, IncapablePolicy::Wait);
        assert!(spec.evict && !spec.cancel);
        assert_eq!(
            spec.redirect.as_ref().map(|r| r.url_template.as_str()),
            Some("rtmp://{pod}.ingest.example.com/live")
        );
        assert_eq!(state::selector_string(&spec.selector), "app=rtmp,tier=edge");
    }

    #[test]
    fn the_defaults_are_the_crds() {
        let p = plan_of("drain pod ingest-0 --wait --timeout 1m");
        assert!(p.wait);
        assert_eq!(p.timeout, Some(Duration::from_secs(60)));
        // What the API server would fill in for a manifest without them.
        let defaulted: IngestDrainSpec = serde_json::from_value(
            json!({ "selector": { "matchLabels": { "app.kubernetes.io/component": "ingest" } } }),
        )
        .expect("spec");
        assert_eq!(
            p.drain.spec,
            IngestDrainSpec {
                pod_names: Some(vec!["ingest-0".into()]),
                ..defaulted
            }
        );
    }

    #[test]
    fn a_bad_selector_is_refused() {
        use clap::Parser;
        let args =
            super::super::Args::try_parse_from(["kubectl-ingest", "drain", "node", "a", "-l", "app"]).expect("parses");
        let super::super::Command::Drain(d) = args.command else {
            panic!("not drain")
        };
        let err = plan(d.target, "live").expect_err("no key=value");
        assert!(err.to_string().starts_with("--selector:"), "{err}");
    }

    mod against_the_api {
        use http::StatusCode;

        use super::*;
        use crate::fixtures::{answer, ingest_pod, node, not_found, other_pod, raw_mock_client, within};

        fn selector() -> LabelSelector {
            spec().selector
        }

        #[tokio::test]
        async fn a_node_that_does_not_exist_is_named() {
            let (client, mut api) = raw_mock_client();
            let target = Target::Node("node-x".into());
            let check = tokio::spawn(async move { pods_to_drain(&client, "ns", &target, &selector()).await });
            answer(
                &mut api,
                "/api/v1/nodes/node-x",
                StatusCode::NOT_FOUND,
                not_found("nodes \"node-x\""),
            )
            .await;
            let err = within("the check", check)
                .await
                .expect("task")
                .expect_err("no such node");
            assert_eq!(err.to_string(), "node \"node-x\" not found");
        }

        #[tokio::test]
        async fn a_node_without_ingest_pods_is_refused() {
            let (client, mut api) = raw_mock_client();
            let target = Target::Node("node-a".into());
            let check = tokio::spawn(async move { pods_to_drain(&client, "ns", &target, &selector()).await });
            let n = serde_json::to_value(node("node-a", false, &[])).expect("JSON");
            answer(&mut api, "/api/v1/nodes/node-a", StatusCode::OK, n).await;
            let query = answer(
                &mut api,
                "/api/v1/namespaces/ns/pods",
                StatusCode::OK,
                json!({ "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": [] }),
            )
            .await;
            assert_eq!(query["labelSelector"], "app.kubernetes.io/component=ingest");
            assert_eq!(query["fieldSelector"], "spec.nodeName=node-a");
            let err = within("the check", check)
                .await
                .expect("task")
                .expect_err("nothing to drain");
            assert_eq!(
                err.to_string(),
                "no ingest pods (app.kubernetes.io/component=ingest) on node node-a in namespace ns"
            );
        }

        #[tokio::test]
        async fn named_pods_must_exist_and_be_ingest_pods() {
            let (client, mut api) = raw_mock_client();
            let target = Target::Pods(vec!["ingest-0".into(), "web-0".into()]);
            let check = tokio::spawn(async move { pods_to_drain(&client, "ns", &target, &selector()).await });
            let ingest = serde_json::to_value(ingest_pod("ingest-0", "ns", "node-a")).expect("JSON");
            answer(&mut api, "/api/v1/namespaces/ns/pods/ingest-0", StatusCode::OK, ingest).await;
            let web = serde_json::to_value(other_pod("web-0")).expect("JSON");
            answer(&mut api, "/api/v1/namespaces/ns/pods/web-0", StatusCode::OK, web).await;
            let err = within("the check", check).await.expect("task").expect_err("not ingest");
            assert_eq!(
                err.to_string(),
                "pod web-0 is not an ingest pod: its labels do not match app.kubernetes.io/component=ingest"
            );

            let (client, mut api) = raw_mock_client();
            let target = Target::Pods(vec!["gone-0".into()]);
            let check = tokio::spawn(async move { pods_to_drain(&client, "ns", &target, &selector()).await });
            answer(
                &mut api,
                "/api/v1/namespaces/ns/pods/gone-0",
                StatusCode::NOT_FOUND,
                not_found("pods \"gone-0\""),
            )
            .await;
            let err = within("the check", check)
                .await
                .expect("task")
                .expect_err("no such pod");
            assert_eq!(err.to_string(), "pod \"gone-0\" not found in namespace ns");
        }
    }
}
