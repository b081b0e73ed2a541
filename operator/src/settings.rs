//! Typed settings, built once from the flags: each part of the operator
//! gets the values it needs and nothing keeps or re-parses a flag.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use thiserror::Error;

use crate::config::Args;
use crate::crd::IncapablePolicy;
use crate::state;
use crate::tls::CertFiles;

/// A flag, or a combination of flags, that cannot work.
#[derive(Debug, Error)]
pub(crate) enum Error {
    #[error("--ingest-selector: {0}")]
    IngestSelector(String),
    #[error("--webhook-cert and --webhook-key go together")]
    WebhookPair,
}

/// Everything the operator was told, by the part that uses it.
pub(crate) struct Settings {
    pub(crate) ingest: IngestPods,
    pub(crate) pod_access: PodAccess,
    /// TLS of the pods' control API; `None`: plaintext.
    pub(crate) control_tls: Option<ControlTls>,
    /// Address of /healthz, /readyz and /metrics.
    pub(crate) http_listen: SocketAddr,
    /// The eviction webhook; `None`: not served (no certificate).
    pub(crate) webhook: Option<WebhookServing>,
    /// Whether the node watcher runs.
    pub(crate) node_drains: bool,
    /// Taint keys that mark a node for removal.
    pub(crate) node_taints: Vec<String>,
    pub(crate) drain_defaults: DrainDefaults,
    /// The operator's own API username: its evictions pass the gate.
    pub(crate) operator_username: Option<String>,
    pub(crate) lease: LeaseSettings,
}

/// Which pods are ingest pods, and where they are watched.
#[derive(Clone, Debug)]
pub(crate) struct IngestPods {
    pub(crate) selector: LabelSelector,
    /// Namespaces with ingest pods; empty: all namespaces.
    pub(crate) namespaces: Vec<String>,
}

impl IngestPods {
    /// Whether ingest pods of `ns` are watched.
    pub(crate) fn watches(&self, ns: &str) -> bool {
        self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == ns)
    }
}

/// How the operator reaches a pod's control API.
#[derive(Clone, Debug)]
pub(crate) struct PodAccess {
    pub(crate) control_port: u16,
    pub(crate) token_file: PathBuf,
}

impl PodAccess {
    /// The control token, read on every use: a rotated Secret is picked up.
    pub(crate) fn token(&self) -> io::Result<String> {
        ingest_runtime::read_secret(&self.token_file)
    }
}

/// The control API's TLS files, and how often they are read again.
pub(crate) struct ControlTls {
    pub(crate) files: ingest_proto::tls::ClientFiles,
    /// The one DNS name every pod's certificate carries.
    pub(crate) server_name: String,
    pub(crate) reload: Duration,
}

/// The eviction webhook's address and certificate.
pub(crate) struct WebhookServing {
    pub(crate) listen: SocketAddr,
    pub(crate) cert: CertFiles,
    /// How often the certificate is read again; zero: never.
    pub(crate) reload: Duration,
}

/// What the drains the operator creates (node drains, evictions) ask for.
#[derive(Clone, Debug)]
pub(crate) struct DrainDefaults {
    pub(crate) deadline: Duration,
    /// Signals per second; 0: no limit.
    pub(crate) rate: f64,
    pub(crate) incapable_policy: IncapablePolicy,
    /// Reconnect Request URL template; `None`: no redirect.
    pub(crate) redirect_template: Option<String>,
}

/// Leader election.
pub(crate) struct LeaseSettings {
    pub(crate) namespace: String,
    pub(crate) name: String,
    /// This replica's identity in the Lease (also the Events' instance).
    pub(crate) identity: String,
    pub(crate) duration: Duration,
}

impl Settings {
    /// Checks and types every flag; each one is named here, so none is
    /// silently ignored.
    pub(crate) fn from_args(args: Args) -> Result<Self, Error> {
        let Args {
            ingest_selector,
            namespaces,
            control_port,
            control_token_file,
            control_tls_ca,
            control_tls_server_name,
            control_tls_client_cert,
            control_tls_client_key,
            control_tls_reload,
            http_listen,
            webhook_listen,
            webhook_cert,
            webhook_key,
            webhook_cert_reload,
            node_drains,
            node_taints,
            drain_deadline,
            drain_rate,
            incapable_policy,
            redirect_template,
            username,
            lease_namespace,
            lease_name,
            identity,
            lease_duration,
            // Applied by `main` before `run`: logging starts first.
            log_format: _,
        } = args;
        let selector = state::parse_selector(&ingest_selector).map_err(Error::IngestSelector)?;
        let webhook = match (webhook_cert, webhook_key) {
            (Some(cert), Some(key)) => Some(WebhookServing {
                listen: webhook_listen,
                cert: CertFiles { cert, key },
                reload: webhook_cert_reload,
            }),
            (None, None) => None,
            _ => return Err(Error::WebhookPair),
        };
        // clap makes the CA and the server name go together.
        let control_tls = control_tls_ca
            .zip(control_tls_server_name)
            .map(|(ca, server_name)| ControlTls {
                files: ingest_proto::tls::ClientFiles {
                    ca,
                    identity: control_tls_client_cert.zip(control_tls_client_key),
                },
                server_name,
                reload: control_tls_reload,
            });
        Ok(Self {
            ingest: IngestPods { selector, namespaces },
            pod_access: PodAccess {
                control_port,
                token_file: control_token_file,
            },
            control_tls,
            http_listen,
            webhook,
            node_drains,
            node_taints,
            drain_defaults: DrainDefaults {
                deadline: drain_deadline,
                rate: drain_rate,
                incapable_policy,
                redirect_template,
            },
            operator_username: username,
            lease: LeaseSettings {
                namespace: lease_namespace,
                name: lease_name,
                identity,
                duration: lease_duration,
            },
        })
    }
}
