//! `kubectl ingest status`: one row per ingest pod, from the pod list and
//! each pod's `/status` read through the API server's pod proxy.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use serde::{Deserialize, Serialize};

use super::args::Output;
use super::{Error, Exit, Result, StatusArgs, api_message};
use crate::crd::IngestDrain;
use crate::state;

/// Pods read at once.
const CONCURRENT_READS: usize = 16;
/// A pod's `/status` not answered within this is shown `?`.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the table shows of an ingest pod's `/status` (`ingest-pod`'s
/// `http::StatusView`; fields it does not need are ignored).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct PodView {
    #[serde(default)]
    connections: Vec<ConnView>,
    #[serde(default)]
    drain: Option<DrainView>,
}

#[derive(Debug, Deserialize)]
struct ConnView {
    #[serde(default)]
    caps: Caps,
}

#[derive(Debug, Default, Deserialize)]
struct Caps {
    #[serde(default)]
    go_away: bool,
    #[serde(default)]
    reconnect: bool,
}

#[derive(Debug, Deserialize)]
struct DrainView {
    id: String,
    phase: String,
    signalled: u64,
    migrated: u64,
    remaining: u64,
}

/// Publishers by the signal they would get: Reconnect Request when they
/// announced it (alone or with Go Away), Go Away, or none (the pod's
/// `ingest_connections{capability}` counts them the same way).
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ByCapability {
    pub(crate) go_away: usize,
    pub(crate) reconnect: usize,
    pub(crate) incapable: usize,
}

impl PodView {
    pub(crate) fn by_capability(&self) -> ByCapability {
        let mut n = ByCapability::default();
        for c in &self.connections {
            match (c.caps.reconnect, c.caps.go_away) {
                (true, _) => n.reconnect += 1,
                (false, true) => n.go_away += 1,
                _ => n.incapable += 1,
            }
        }
        n
    }
}

/// What was learnt of one pod's `/status`.
#[derive(Debug)]
pub(crate) enum Read {
    View(PodView),
    /// The pod has no IP yet: nothing to ask, nothing connected.
    NotRunning,
    /// Asked, and no usable answer (shown `?`; the reason goes to stderr).
    Failed(String),
}

const HEADERS: [&str; 11] = [
    "POD",
    "NODE",
    "READY",
    "GO_AWAY",
    "RECONNECT",
    "INCAPABLE",
    "DRAIN",
    "PHASE",
    "SIGNALLED",
    "MIGRATED",
    "REMAINING",
];

pub(super) async fn run(client: &Client, ns: &str, args: StatusArgs) -> Result<Exit> {
    let StatusArgs {
        all_namespaces,
        selector,
        port,
        output,
    } = args;
    let selector = state::parse_selector(&selector).map_err(Error::Selector)?;
    let (pods, drains): (Api<Pod>, Api<IngestDrain>) = if all_namespaces {
        (Api::all(client.clone()), Api::all(client.clone()))
    } else {
        (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns))
    };
    let mut pods = pods
        .list(&ListParams::default().labels(&state::selector_string(&selector)))
        .await
        .map_err(|e| Error::api("listing the ingest pods", &e))?
        .items;
    if pods.is_empty() && output == Output::Json {
        writeln!(std::io::stdout().lock(), "{}", serde_json::json!({ "pods": [] }))?;
        return Ok(Exit::Ok);
    }
    if pods.is_empty() {
        let scope = if all_namespaces {
            "any namespace".to_owned()
        } else {
            format!("namespace {ns}")
        };
        eprintln!("No ingest pods ({}) in {scope}.", state::selector_string(&selector));
        return Ok(Exit::Ok);
    }
    pods.sort_by_key(|p| (p.namespace(), node_of(p).to_owned(), p.name_any()));
    // Drain names by the id the pods know (the IngestDrain's uid). Without
    // the CRD or the right to list them, the table shows the ids.
    let names = drains
        .list(&ListParams::default())
        .await
        .map(|l| drain_names(&l.items))
        .unwrap_or_default();
    let reads: Vec<Read> = futures::stream::iter(pods.iter().map(|p| read(client, p, &port)))
        .buffered(CONCURRENT_READS)
        .collect()
        .await;
    let mut failed = false;
    for (pod, read) in pods.iter().zip(&reads) {
        if let Read::Failed(why) = read {
            eprintln!(
                "error: pod {}/{}: /status: {why}",
                pod.namespace().unwrap_or_default(),
                pod.name_any()
            );
            failed = true;
        }
    }
    if output == Output::Json {
        let pods: Vec<JsonPod> = pods.iter().zip(&reads).map(|(p, r)| json_pod(p, r, &names)).collect();
        // Through a struct, not a `Value`: fields keep their order.
        #[derive(Serialize)]
        struct List {
            pods: Vec<JsonPod>,
        }
        let text = serde_json::to_string_pretty(&List { pods }).map_err(|e| Error::Output(std::io::Error::other(e)))?;
        writeln!(std::io::stdout().lock(), "{text}")?;
        return Ok(if failed { Exit::Error } else { Exit::Ok });
    }
    let rows: Vec<Vec<String>> = pods
        .iter()
        .zip(&reads)
        .map(|(pod, read)| {
            let mut row = row(pod, read, &names);
            if all_namespaces {
                row.insert(0, pod.namespace().unwrap_or_default());
            }
            row
        })
        .collect();
    let mut headers = HEADERS.to_vec();
    if all_namespaces {
        headers.insert(0, "NAMESPACE");
    }
    std::io::stdout().lock().write_all(table(&headers, &rows).as_bytes())?;
    Ok(if failed { Exit::Error } else { Exit::Ok })
}

/// IngestDrain names by uid.
fn drain_names(drains: &[IngestDrain]) -> BTreeMap<String, String> {
    drains.iter().filter_map(|d| Some((d.uid()?, d.name_any()))).collect()
}

fn node_of(pod: &Pod) -> &str {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or("")
}

/// `pod`'s `/status` through the API server's pod proxy.
async fn read(client: &Client, pod: &Pod, port: &str) -> Read {
    let has_ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .is_some_and(|ip| !ip.is_empty());
    if !has_ip {
        return Read::NotRunning;
    }
    let port = match container_port(pod, port) {
        Ok(p) => p,
        Err(why) => return Read::Failed(why),
    };
    let path = proxy_path(&pod.namespace().unwrap_or_default(), &pod.name_any(), &port);
    let request = match http::Request::get(path).body(Vec::new()) {
        Ok(r) => r,
        Err(err) => return Read::Failed(err.to_string()),
    };
    match tokio::time::timeout(READ_TIMEOUT, client.request_text(request)).await {
        Err(_) => Read::Failed(format!(
            "no answer within {}",
            ingest_runtime::format_duration(READ_TIMEOUT)
        )),
        Ok(Err(err)) => Read::Failed(api_message(&err)),
        Ok(Ok(body)) => match serde_json::from_str(&body) {
            Ok(view) => Read::View(view),
            Err(err) => Read::Failed(format!("not an ingest pod's answer ({err})")),
        },
    }
}

/// The API server's proxy to a pod's port; it takes numbers only (a pod
/// proxy does not look port names up).
pub(crate) fn proxy_path(ns: &str, pod: &str, port: &str) -> String {
    format!("/api/v1/namespaces/{ns}/pods/{pod}:{port}/proxy/status")
}

/// `port` as a number: itself, or the container port of that name.
pub(crate) fn container_port(pod: &Pod, port: &str) -> Result<String, String> {
    if port.parse::<u16>().is_ok() {
        return Ok(port.to_owned());
    }
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(port))
        .map(|p| p.container_port.to_string())
        .ok_or_else(|| format!("no container port named {port:?} (see --port)"))
}

/// One pod's cells, in [`HEADERS`] order.
pub(crate) fn row(pod: &Pod, read: &Read, drain_names: &BTreeMap<String, String>) -> Vec<String> {
    let ready = state::pod_ready(pod);
    let mut cells = vec![
        pod.name_any(),
        match node_of(pod) {
            "" => "-".to_owned(),
            node => node.to_owned(),
        },
        ready.to_string(),
    ];
    let dash = || "-".to_owned();
    match read {
        Read::Failed(_) => cells.extend(std::iter::repeat_n("?".to_owned(), HEADERS.len() - 3)),
        Read::NotRunning => cells.extend(std::iter::repeat_with(dash).take(HEADERS.len() - 3)),
        Read::View(view) => {
            let n = view.by_capability();
            cells.extend([n.go_away.to_string(), n.reconnect.to_string(), n.incapable.to_string()]);
            match &view.drain {
                Some(d) => cells.extend([
                    drain_names.get(&d.id).cloned().unwrap_or_else(|| d.id.clone()),
                    d.phase.clone(),
                    d.signalled.to_string(),
                    d.migrated.to_string(),
                    d.remaining.to_string(),
                ]),
                None => cells.extend(std::iter::repeat_with(dash).take(5)),
            }
        }
    }
    cells
}

/// One pod in `-o json`: what the table shows, typed, and why a pod
/// could not be read.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JsonPod {
    namespace: String,
    pod: String,
    /// `None` before the pod is scheduled.
    node: Option<String>,
    ready: bool,
    /// `read`, `notRunning` (no IP yet) or `unreadable` (see `error`).
    status: &'static str,
    error: Option<String>,
    /// Publishers by the signal they would get; `None` unless read.
    publishers: Option<ByCapability>,
    drain: Option<JsonDrain>,
}

#[derive(Debug, Serialize)]
pub(crate) struct JsonDrain {
    /// The IngestDrain's name, or the pod's id for it when the cluster does
    /// not list it (a SIGTERM drain: `sigterm`).
    name: String,
    id: String,
    phase: String,
    signalled: u64,
    migrated: u64,
    remaining: u64,
}

pub(crate) fn json_pod(pod: &Pod, read: &Read, drain_names: &BTreeMap<String, String>) -> JsonPod {
    let (status, error, view) = match read {
        Read::View(view) => ("read", None, Some(view)),
        Read::NotRunning => ("notRunning", None, None),
        Read::Failed(why) => ("unreadable", Some(why.clone()), None),
    };
    JsonPod {
        namespace: pod.namespace().unwrap_or_default(),
        pod: pod.name_any(),
        node: Some(node_of(pod)).filter(|n| !n.is_empty()).map(str::to_owned),
        ready: state::pod_ready(pod),
        status,
        error,
        publishers: view.map(PodView::by_capability),
        drain: view.and_then(|v| v.drain.as_ref()).map(|d| JsonDrain {
            name: drain_names.get(&d.id).cloned().unwrap_or_else(|| d.id.clone()),
            id: d.id.clone(),
            phase: d.phase.clone(),
            signalled: d.signalled,
            migrated: d.migrated,
            remaining: d.remaining,
        }),
    }
}

/// Columns padded to their widest cell, three spaces apart (as kubectl
/// prints tables).
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   "));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(&mut headers.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::SystemTime;

    use ingest_pod::http::{DrainView as PodDrainView, StatusView};
    use ingest_pod::registry::{Caps as PodCaps, ConnInfo};
    use serde_json::json;

    use super::*;

    fn conn(id: u64, go_away: bool, reconnect: bool) -> ConnInfo {
        ConnInfo {
            id,
            peer: SocketAddr::from(([10, 0, 0, 1], 40000)),
            app: Some("live".into()),
            stream: Some(format!("s{id}")),
            caps: PodCaps { go_away, reconnect },
            connected_at: SystemTime::now(),
            publishing_since: Some(SystemTime::now()),
            bytes_in: 1,
            signalled: None,
            relay_caught_up: true,
        }
    }

    /// The pod's own view, serialized as its `/status` serves it.
    fn served(drain: Option<PodDrainView>) -> String {
        let view = StatusView {
            pod: "ingest-0".into(),
            serving: drain.is_none(),
            connections: vec![
                conn(1, true, true),
                conn(2, true, false),
                conn(3, false, true),
                conn(4, false, false),
                conn(5, false, false),
            ],
            relays_active: 5,
            drain,
        };
        serde_json::to_string(&view).expect("JSON")
    }

    fn pod(name: &str, node: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": "live" },
            "spec": {
                "nodeName": node,
                "containers": [{ "name": "ingest", "ports": [
                    { "name": "rtmp", "containerPort": 1935 },
                    { "name": "http", "containerPort": 8080 }
                ] }]
            },
            "status": {
                "podIP": "10.244.1.5",
                "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }]
            }
        }))
        .expect("pod")
    }

    #[test]
    fn the_pods_status_is_read_and_counted_by_capability() {
        let view: PodView = serde_json::from_str(&served(None)).expect("parses");
        // Both signals count as Reconnect Request, the signal it would get.
        assert_eq!(
            view.by_capability(),
            ByCapability {
                go_away: 1,
                reconnect: 2,
                incapable: 2
            }
        );
        let cells = row(&pod("ingest-0", "node-a", true), &Read::View(view), &BTreeMap::new());
        assert_eq!(
            cells,
            ["ingest-0", "node-a", "true", "1", "2", "2", "-", "-", "-", "-", "-"]
        );
    }

    /// A pod's view in the middle of a drain, and the drain's name by its id.
    fn draining() -> (PodView, BTreeMap<String, String>) {
        let drain = PodDrainView {
            id: "5f0c-uid".into(),
            phase: "signalling",
            signalled: 3,
            migrated: 1,
            remaining: 4,
            left_at_deadline: 0,
        };
        let view: PodView = serde_json::from_str(&served(Some(drain))).expect("parses");
        let names = BTreeMap::from([("5f0c-uid".to_owned(), "drain-node-a-x7k2p".to_owned())]);
        (view, names)
    }

    #[test]
    fn a_draining_pod_shows_its_drain_by_name() {
        let (view, names) = draining();
        let cells = row(&pod("ingest-0", "node-a", false), &Read::View(view), &names);
        assert_eq!(
            cells[2..],
            [
                "false",
                "1",
                "2",
                "2",
                "drain-node-a-x7k2p",
                "signalling",
                "3",
                "1",
                "4"
            ]
        );
        // A drain the cluster does not list (SIGTERM's, or no right to list) shows its id.
        let view: PodView = serde_json::from_value(json!({
            "connections": [],
            "drain": { "id": "sigterm", "phase": "propagating", "signalled": 0, "migrated": 0, "remaining": 0 }
        }))
        .expect("parses");
        assert_eq!(row(&pod("p", "n", false), &Read::View(view), &names)[6], "sigterm");
    }

    #[test]
    fn unread_and_unstarted_pods_fill_their_row() {
        let failed = row(&pod("p", "n", true), &Read::Failed("refused".into()), &BTreeMap::new());
        assert_eq!(failed.len(), HEADERS.len());
        assert!(failed[3..].iter().all(|c| c == "?"), "{failed:?}");
        let pending = row(&pod("p", "", false), &Read::NotRunning, &BTreeMap::new());
        assert_eq!(pending.len(), HEADERS.len());
        assert!(
            pending[3..].iter().all(|c| c == "-") && pending[1] == "-",
            "{pending:?}"
        );
    }

    #[test]
    fn json_output_types_what_the_table_shows() {
        let (view, names) = draining();
        let read = json_pod(&pod("ingest-0", "node-a", false), &Read::View(view), &names);
        assert_eq!(
            serde_json::to_value(&read).expect("JSON"),
            json!({
                "namespace": "live", "pod": "ingest-0", "node": "node-a", "ready": false,
                "status": "read", "error": null,
                "publishers": { "goAway": 1, "reconnect": 2, "incapable": 2 },
                "drain": { "name": "drain-node-a-x7k2p", "id": "5f0c-uid", "phase": "signalling",
                           "signalled": 3, "migrated": 1, "remaining": 4 }
            })
        );
        let failed = json_pod(&pod("p", "", true), &Read::Failed("refused".into()), &names);
        assert_eq!(
            serde_json::to_value(&failed).expect("JSON"),
            json!({
                "namespace": "live", "pod": "p", "node": null, "ready": true,
                "status": "unreadable", "error": "refused", "publishers": null, "drain": null
            })
        );
        let pending = json_pod(&pod("p", "n", false), &Read::NotRunning, &names);
        assert_eq!(serde_json::to_value(&pending).expect("JSON")["status"], "notRunning");
    }

    #[test]
    fn the_table_aligns_columns_like_kubectl() {
        let rows = vec![
            vec!["ingest-0".to_owned(), "node-a".to_owned(), "3".to_owned()],
            vec!["ingest-long-name".to_owned(), "b".to_owned(), "12".to_owned()],
        ];
        assert_eq!(
            table(&["POD", "NODE", "N"], &rows),
            "POD                NODE     N\n\
             ingest-0           node-a   3\n\
             ingest-long-name   b        12\n"
        );
    }

    #[test]
    fn ports_by_name_are_looked_up_in_the_pod() {
        let p = pod("p", "n", true);
        assert_eq!(container_port(&p, "http").as_deref(), Ok("8080"));
        assert_eq!(container_port(&p, "9090").as_deref(), Ok("9090"));
        assert!(container_port(&p, "metrics").is_err());
        assert_eq!(
            proxy_path("live", "ingest-0", "8080"),
            "/api/v1/namespaces/live/pods/ingest-0:8080/proxy/status"
        );
    }
}
