//! Command-line and environment configuration of the operator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use ingest_runtime::{LogFormat, parse_duration};

use crate::crd::IncapablePolicy;

/// Taints that announce a node's removal, by the tools that set them.
const DEFAULT_NODE_TAINTS: &str = "ToBeDeletedByClusterAutoscaler,karpenter.sh/disrupted,karpenter.sh/disruption,\
aws-node-termination-handler/spot-itn,aws-node-termination-handler/rebalance-recommendation,\
aws-node-termination-handler/scheduled-maintenance,aws-node-termination-handler/asg-lifecycle-termination,\
cloud.google.com/impending-node-termination";

/// Kubernetes operator that turns node drains and IngestDrain resources
/// into lossless drains of RTMP ingest pods.
#[derive(Debug, Clone, Parser)]
#[command(name = "ingest-operator", version)]
pub struct Args {
    /// Label selector of ingest pods (what node drains and the eviction gate act on).
    #[arg(
        long,
        env = "OPERATOR_INGEST_SELECTOR",
        default_value = "app.kubernetes.io/component=ingest"
    )]
    pub ingest_selector: String,

    /// Namespaces with ingest pods (comma separated); empty: all namespaces.
    #[arg(long, env = "OPERATOR_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Control API port of the ingest pods.
    #[arg(long, env = "OPERATOR_CONTROL_PORT", default_value_t = 9090)]
    pub control_port: u16,

    /// File with the bearer token of the ingest pods' control API.
    #[arg(
        long,
        env = "OPERATOR_CONTROL_TOKEN_FILE",
        default_value = "/var/run/secrets/ingest-control/token"
    )]
    pub control_token_file: PathBuf,

    /// PEM CA that signs the pods' control API certificates: the operator
    /// then calls the pods over TLS and verifies them. Without it, plaintext.
    #[arg(long, env = "OPERATOR_CONTROL_TLS_CA", requires = "control_tls_server_name")]
    pub control_tls_ca: Option<PathBuf>,

    /// The name the pods' certificate carries (they are dialled by IP, so
    /// every pod's certificate names this one DNS name).
    #[arg(long, env = "OPERATOR_CONTROL_TLS_SERVER_NAME", requires = "control_tls_ca")]
    pub control_tls_server_name: Option<String>,

    /// PEM client certificate presented to the pods (mutual TLS).
    #[arg(
        long,
        env = "OPERATOR_CONTROL_TLS_CLIENT_CERT",
        requires_all = ["control_tls_client_key", "control_tls_ca"]
    )]
    pub control_tls_client_cert: Option<PathBuf>,

    /// PEM private key of --control-tls-client-cert.
    #[arg(long, env = "OPERATOR_CONTROL_TLS_CLIENT_KEY", requires = "control_tls_client_cert")]
    pub control_tls_client_key: Option<PathBuf>,

    /// How often the control TLS files are read again; a changed set (a
    /// renewal) is used for new connections without a restart. 0: never.
    #[arg(long, env = "OPERATOR_CONTROL_TLS_RELOAD", default_value = "60s", value_parser = parse_duration)]
    pub control_tls_reload: Duration,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "OPERATOR_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    pub http_listen: SocketAddr,

    /// Address of the eviction webhook (HTTPS).
    #[arg(long, env = "OPERATOR_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub webhook_listen: SocketAddr,

    /// PEM certificate of the webhook; without it the webhook is not served.
    #[arg(long, env = "OPERATOR_WEBHOOK_CERT")]
    pub webhook_cert: Option<PathBuf>,

    /// PEM private key of the webhook.
    #[arg(long, env = "OPERATOR_WEBHOOK_KEY")]
    pub webhook_key: Option<PathBuf>,

    /// How often the webhook's certificate and key files are read again: a
    /// changed pair (a renewal) is served without a restart. 0: never.
    #[arg(long, env = "OPERATOR_WEBHOOK_CERT_RELOAD", default_value = "60s", value_parser = parse_duration)]
    pub webhook_cert_reload: Duration,

    /// Watch nodes and drain the ingest pods of cordoned or tainted ones.
    #[arg(long, env = "OPERATOR_NODE_DRAINS", default_value_t = true, action = clap::ArgAction::Set)]
    pub node_drains: bool,

    /// Taints (keys) that mark a node for removal (comma separated).
    #[arg(long, env = "OPERATOR_NODE_TAINTS", value_delimiter = ',', default_value = DEFAULT_NODE_TAINTS)]
    pub node_taints: Vec<String>,

    /// Deadline of drains the operator creates (node drains, evictions).
    #[arg(long, env = "OPERATOR_DRAIN_DEADLINE", default_value = "90s", value_parser = parse_duration)]
    pub drain_deadline: Duration,

    /// Signals per second of drains the operator creates (0: no limit).
    #[arg(long, env = "OPERATOR_DRAIN_RATE", default_value_t = 50.0)]
    pub drain_rate: f64,

    /// Incapable policy of drains the operator creates.
    #[arg(long, env = "OPERATOR_INCAPABLE_POLICY", value_enum, default_value = "disconnect")]
    pub incapable_policy: IncapablePolicy,

    /// Redirect URL template for Reconnect Request in drains the operator
    /// creates: `{pod}`, `{podIP}`, `{node}`, `{nodeIP}`, `{namespace}`
    /// are replaced with a healthy target pod's values. Empty: no redirect.
    #[arg(long, env = "OPERATOR_REDIRECT_TEMPLATE")]
    pub redirect_template: Option<String>,

    /// The operator's own API username (`system:serviceaccount:NS:NAME`):
    /// its evictions of drained pods pass the eviction gate at once.
    #[arg(long, env = "OPERATOR_USERNAME")]
    pub username: Option<String>,

    /// Lease namespace for leader election (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// Lease name for leader election.
    #[arg(long, env = "OPERATOR_LEASE_NAME", default_value = "ingest-operator")]
    pub lease_name: String,

    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "ingest-operator")]
    pub identity: String,

    /// Lease duration: a leader that stops renewing loses it after this long.
    #[arg(long, env = "OPERATOR_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// Log lines as `text` (colours only on a terminal) or `json` (one
    /// object a line). The filter is RUST_LOG (default `info`).
    #[arg(long, env = "OPERATOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}
