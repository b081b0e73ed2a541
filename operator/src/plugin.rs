//! `kubectl ingest`, the kubectl plugin (`src/bin/kubectl-ingest.rs`):
//! the ingest pods at a glance, drains made and followed from a terminal,
//! and their cancel. It talks to the API server only, with the user's
//! kubeconfig: pods' `/status` through the pod proxy, drains as IngestDrains.

use std::future::Future;
use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, CustomResourceExt, Resource};

use crate::crd::IngestDrain;

mod args;
mod cancel;
mod drain;
mod follow;
mod status;

pub use args::{
    Args, CancelArgs, ClusterArgs, Command, DrainOpts, DrainTarget, FollowArgs, Output, StatusArgs, WaitArgs,
};

/// Field manager of what the plugin writes (`kubectl get --show-managed-fields`).
const FIELD_MANAGER: &str = "kubectl-ingest";

/// How the plugin exits; `--help` lists the codes ([`args::EXIT_CODES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done; a followed drain ended Drained.
    Ok,
    /// An error, or a pod whose status could not be read.
    Error,
    /// The followed drain ended TimedOut.
    TimedOut,
    /// The followed drain ended Cancelled, or was deleted.
    Cancelled,
    /// The followed drain ended Failed.
    Failed,
    /// `--timeout` passed; the drain goes on.
    StillRunning,
    /// Ctrl-C; the drain goes on.
    Interrupted,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Error => 1,
            Exit::TimedOut => 3,
            Exit::Cancelled => 4,
            Exit::Failed => 5,
            Exit::StillRunning => 6,
            Exit::Interrupted => 130,
        }
    }
}

/// What stops the plugin from doing what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error(
        "the IngestDrain CRD ({crd}) is not installed in this cluster: install the lossless-ingest chart, or `kubectl apply -f crds/`",
        crd = IngestDrain::crd_name()
    )]
    CrdMissing,
    #[error("node {0:?} not found")]
    NodeNotFound(String),
    #[error("no ingest pods ({selector}) on node {node} in namespace {ns}")]
    NoIngestPods { node: String, ns: String, selector: String },
    #[error("pod {pod:?} not found in namespace {ns}")]
    PodNotFound { pod: String, ns: String },
    #[error("pod {pod} is not an ingest pod: its labels do not match {selector}")]
    NotIngestPod { pod: String, selector: String },
    #[error("IngestDrain {name:?} not found in namespace {ns}")]
    DrainNotFound { name: String, ns: String },
    #[error("--selector: {0}")]
    Selector(String),
    #[error("{what}: {message}")]
    Api { what: String, message: String },
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A failed API call, with the API server's own words when it gave some.
    fn api(what: impl Into<String>, err: &kube::Error) -> Self {
        Error::Api {
            what: what.into(),
            message: api_message(err),
        }
    }
}

/// The API server's message for `err` (its Status), else the error itself.
fn api_message(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(s) if !s.message.is_empty() => s.message.clone(),
        other => other.to_string(),
    }
}

/// The HTTP code of an API server refusal.
fn api_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Runs one command. `interrupt` (Ctrl-C) stops following a drain and
/// leaves it running.
pub async fn run(args: Args, interrupt: impl Future<Output = ()>) -> Result<Exit> {
    let Args { cluster, command } = args;
    let ClusterArgs {
        namespace,
        kubeconfig,
        context,
    } = cluster;
    // Read now, used when the command needs the cluster (a dry run does not).
    let config = config(kubeconfig, context).await;
    let ns = namespace
        .or_else(|| config.as_ref().ok().map(|c| c.default_namespace.clone()))
        .unwrap_or_else(|| "default".to_owned());
    match command {
        Command::Drain(args) => {
            let plan = drain::plan(args.target, &ns)?;
            if plan.dry_run {
                return drain::print(&plan);
            }
            drain::run(&connect(config)?, &ns, plan, interrupt).await
        }
        Command::Status(args) => status::run(&connect(config)?, &ns, args).await,
        Command::Wait(args) => follow::run(&connect(config)?, &ns, args, interrupt).await,
        Command::Cancel(args) => cancel::run(&connect(config)?, &ns, args, interrupt).await,
    }
}

fn connect(config: Result<Config>) -> Result<Client> {
    let mut config = config?;
    // kube retries a 503 for a long while, and the pod proxy answers 503
    // when a pod does not listen: show that at once. The watch of a
    // followed drain retries on its own.
    config.default_retry = false;
    Client::try_from(config).map_err(|e| Error::Kubeconfig(e.to_string()))
}

/// The client configuration for `--kubeconfig` / `--context`, else as
/// kubectl finds one (KUBECONFIG, ~/.kube/config, in-cluster).
async fn config(kubeconfig: Option<PathBuf>, context: Option<String>) -> Result<Config> {
    let options = KubeConfigOptions {
        context,
        ..KubeConfigOptions::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(&path).map_err(|e| Error::Kubeconfig(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kc, &options).await
        }
        None if options.context.is_some() => Config::from_kubeconfig(&options).await,
        None => return Config::infer().await.map_err(|e| Error::Kubeconfig(e.to_string())),
    };
    config.map_err(|e| Error::Kubeconfig(e.to_string()))
}

/// Fails with [`Error::CrdMissing`] unless the API server serves IngestDrains.
async fn ensure_crd(client: &Client) -> Result<()> {
    let version = IngestDrain::api_version(&());
    match client.list_api_group_resources(&version).await {
        Ok(list) if list.resources.iter().any(|r| r.name == IngestDrain::plural(&())) => Ok(()),
        Ok(_) => Err(Error::CrdMissing),
        Err(err) if api_code(&err) == Some(404) => Err(Error::CrdMissing),
        Err(err) => Err(Error::api(format!("discovery of {version}"), &err)),
    }
}

/// The IngestDrain `name`; when there is none, an error that says whether
/// the drain or the whole CRD is missing.
async fn get_drain(client: &Client, ns: &str, name: &str) -> Result<IngestDrain> {
    let api: Api<IngestDrain> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(drain)) => Ok(drain),
        Ok(None) => Err(drain_not_found(client, ns, name).await),
        // Without the CRD the API server answers a bare 404, not a NotFound Status.
        Err(err) if api_code(&err) == Some(404) => Err(drain_not_found(client, ns, name).await),
        Err(err) => Err(Error::api(format!("reading IngestDrain {name}"), &err)),
    }
}

async fn drain_not_found(client: &Client, ns: &str, name: &str) -> Error {
    match ensure_crd(client).await {
        Ok(()) => Error::DrainNotFound {
            name: name.to_owned(),
            ns: ns.to_owned(),
        },
        Err(err) => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_the_documented_ones() {
        let codes = [
            (Exit::Ok, 0),
            (Exit::Error, 1),
            (Exit::TimedOut, 3),
            (Exit::Cancelled, 4),
            (Exit::Failed, 5),
            (Exit::StillRunning, 6),
            (Exit::Interrupted, 130),
        ];
        for (exit, code) in codes {
            assert_eq!(exit.code(), code, "{exit:?}");
            let line = format!("  {code:<4} ");
            assert!(
                args::EXIT_CODES.lines().any(|l| l.starts_with(&line)),
                "--help does not document {code}: {}",
                args::EXIT_CODES
            );
        }
    }

    #[test]
    fn a_missing_crd_says_how_to_install_it() {
        let msg = Error::CrdMissing.to_string();
        assert!(msg.contains("ingestdrains.ingest.lossless.dev"), "{msg}");
        assert!(msg.contains("chart"), "{msg}");
    }

    #[tokio::test]
    async fn the_crd_is_found_by_discovery() {
        use http::StatusCode;
        use serde_json::json;

        use crate::fixtures::{answer, not_found, raw_mock_client, within};

        const GROUP_PATH: &str = "/apis/ingest.lossless.dev/v1alpha1";
        let resources = |names: &[&str]| {
            let list: Vec<_> = names
                .iter()
                .map(|n| json!({ "name": n, "singularName": "", "namespaced": true, "kind": "IngestDrain", "verbs": ["get"] }))
                .collect();
            json!({ "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "ingest.lossless.dev/v1alpha1", "resources": list })
        };
        for (code, body, found) in [
            (
                StatusCode::NOT_FOUND,
                not_found("the server could not find the requested resource;"),
                false,
            ),
            (StatusCode::OK, resources(&["somethingelse"]), false),
            (
                StatusCode::OK,
                resources(&["ingestdrains", "ingestdrains/status"]),
                true,
            ),
        ] {
            let (client, mut api) = raw_mock_client();
            let check = tokio::spawn(async move { ensure_crd(&client).await });
            answer(&mut api, GROUP_PATH, code, body).await;
            let result = within("discovery", check).await.expect("task");
            assert_eq!(result.is_ok(), found, "{result:?}");
            if !found {
                assert!(matches!(result, Err(Error::CrdMissing)), "{result:?}");
            }
        }
    }
}
