//! Command-line and environment configuration of the ingest pod.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

use crate::drain::IncapablePolicy;
use ingest_runtime::{LogFormat, parse_duration, parse_positive_duration};

/// RTMP ingest that moves its publishers to other pods without losing media.
///
/// Publishers that announce Facebook's Go Away (`supportsGoAway`) or
/// Enhanced RTMP's Reconnect Request (`capsEx` & 1) are asked to reconnect
/// when the pod drains; the pod drains on SIGTERM (and, with the control
/// API, on request).
#[derive(Debug, Clone, Parser)]
#[command(name = "ingest-pod", version)]
pub struct Args {
    /// Address for RTMP publishers.
    #[arg(long, env = "INGEST_RTMP_LISTEN", default_value = "0.0.0.0:1935")]
    pub rtmp_listen: SocketAddr,

    /// Address for /healthz, /readyz, /metrics and /status.
    #[arg(long, env = "INGEST_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    pub http_listen: SocketAddr,

    // The control API and the stream keys it may reveal.
    #[command(flatten)]
    pub control: ControlArgs,

    /// Upstream origin URL template; `{app}` and `{stream}` are replaced
    /// (example: rtmp://origin:1935/{app}/{stream}). Without it nothing is relayed.
    #[arg(long, env = "INGEST_UPSTREAM")]
    pub upstream: Option<String>,

    /// Directory to record each publish session into, one FLV file each.
    #[arg(long, env = "INGEST_RECORD_DIR")]
    pub record_dir: Option<PathBuf>,

    /// Name reported in status (the pod name, from the downward API).
    #[arg(long, env = "INGEST_POD_NAME", default_value = "ingest-pod")]
    pub pod_name: String,

    /// Most RTMP connections at once; more are closed right after accept.
    #[arg(long, env = "INGEST_MAX_CONNECTIONS", default_value_t = 2000)]
    pub max_connections: usize,

    /// Time allowed for the RTMP handshake.
    #[arg(long, env = "INGEST_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// A connection that sends nothing for this long is closed.
    #[arg(long, env = "INGEST_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Send Facebook RTMP Go Away to publishers that announce it.
    #[arg(long, env = "INGEST_SIGNAL_GO_AWAY", default_value_t = true, action = ArgAction::Set)]
    pub signal_go_away: bool,

    /// Send Enhanced RTMP Reconnect Request to publishers that announce it
    /// (preferred when a publisher supports both).
    #[arg(long, env = "INGEST_SIGNAL_RECONNECT_REQUEST", default_value_t = true, action = ArgAction::Set)]
    pub signal_reconnect_request: bool,

    /// Time from SIGTERM until the process exits whatever remains; match
    /// the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "INGEST_GRACE_PERIOD", default_value = "30s", value_parser = parse_duration)]
    pub grace_period: Duration,

    // The SIGTERM drain.
    #[command(flatten)]
    pub drain: DrainArgs,

    // Relays to the origin.
    #[command(flatten)]
    pub relay: RelayArgs,

    /// Close a signalled publisher's connection once it sent no audio or
    /// video for this long: it moved, even if the encoder left the socket
    /// open (OBS's recording helper keeps a copy of it).
    #[arg(long, env = "INGEST_SIGNALLED_QUIET_CLOSE", default_value = "3s", value_parser = parse_duration)]
    pub signalled_quiet_close: Duration,

    /// Once a publisher's media flows, read its connection on this clock
    /// (shared by all connections) instead of on every packet: one wake-up
    /// per interval serves every publisher that sent something, which
    /// reads all of it and hands it to its relay at once. Adds up to this
    /// much latency on the way to the origin; longer intervals batch more
    /// (fewer reads and relay writes, less CPU); 0 reads on every packet.
    #[arg(long, env = "INGEST_MEDIA_READ_INTERVAL", default_value = "5ms", value_parser = parse_duration)]
    pub media_read_interval: Duration,

    /// Threads that run connections, relays and the control API. One
    /// thread relays hundreds of streams (see the throughput benchmark) and
    /// spares the wake-ups between threads; more let one pod use more cores.
    #[arg(long, env = "INGEST_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: u16,

    /// HTTP callback asked on every publish (JSON: app, key, client_addr,
    /// capabilities, pod). 2xx allows (optionally `{"upstream_name": ...}`);
    /// anything else, an error or no answer in time denies. Unset: every
    /// publish is allowed.
    #[arg(long, env = "INGEST_PUBLISH_AUTH_URL")]
    pub publish_auth_url: Option<String>,

    /// How long the publish callback may take before the publish is denied.
    #[arg(long, env = "INGEST_PUBLISH_AUTH_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub publish_auth_timeout: Duration,

    /// Log lines as `text` (colours only on a terminal) or `json` (one
    /// object a line). The filter is RUST_LOG (default `info`).
    #[arg(long, env = "INGEST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Flags of the control API, part of [`Args`].
#[derive(Debug, Clone, clap::Args)]
pub struct ControlArgs {
    /// Address of the gRPC control API (ingest.control.v1, health, reflection).
    #[arg(long, env = "INGEST_CONTROL_LISTEN", default_value = "0.0.0.0:9090")]
    pub control_listen: SocketAddr,

    /// File holding the bearer token the control API requires (mounted
    /// from a Secret). Without a token the control API is not served.
    #[arg(long, env = "INGEST_CONTROL_TOKEN_FILE")]
    pub control_token_file: Option<PathBuf>,

    /// The bearer token itself, for environments without a file.
    #[arg(
        long,
        env = "INGEST_CONTROL_TOKEN",
        hide_env_values = true,
        conflicts_with = "control_token_file"
    )]
    pub control_token: Option<String>,

    /// PEM certificate (chain) the control API is served with: TLS instead
    /// of plaintext. Pods are dialled by IP, so it names what the operator
    /// verifies (its --control-tls-server-name).
    #[arg(long, env = "INGEST_CONTROL_TLS_CERT", requires = "control_tls_key")]
    pub control_tls_cert: Option<PathBuf>,

    /// PEM private key of --control-tls-cert.
    #[arg(long, env = "INGEST_CONTROL_TLS_KEY", requires = "control_tls_cert")]
    pub control_tls_key: Option<PathBuf>,

    /// PEM CA that signs the callers' client certificates: with it, the
    /// control API requires one (mutual TLS), on top of the bearer token.
    #[arg(long, env = "INGEST_CONTROL_TLS_CLIENT_CA", requires = "control_tls_cert")]
    pub control_tls_client_ca: Option<PathBuf>,

    /// How often the control API's certificate, key and client CA files are
    /// read again; a changed set (a renewal) serves new connections without
    /// a restart. 0: never.
    #[arg(long, env = "INGEST_CONTROL_TLS_RELOAD", default_value = "60s", value_parser = parse_duration)]
    pub control_tls_reload: Duration,

    /// Show stream keys in clear in `/status` and let control API callers ask
    /// for them; otherwise every key is shown (status, logs) as a keyed hash.
    #[arg(long, env = "INGEST_CONTROL_REVEAL_STREAM_KEYS")]
    pub control_reveal_stream_keys: bool,
}

/// Flags of the drain SIGTERM starts, part of [`Args`].
#[derive(Debug, Clone, clap::Args)]
pub struct DrainArgs {
    /// Deadline of the SIGTERM drain: then the incapable policy applies.
    /// Keep it a few seconds below the grace period so relays can flush.
    #[arg(long, env = "INGEST_DRAIN_DEADLINE", default_value = "25s", value_parser = parse_duration)]
    pub drain_deadline: Duration,

    /// Signals per second in the SIGTERM drain (0: all at once).
    #[arg(long, env = "INGEST_DRAIN_RATE", default_value_t = 50.0)]
    pub drain_rate: f64,

    /// Signalled publishers still connected at once in the SIGTERM drain (0: no limit).
    #[arg(long, env = "INGEST_DRAIN_MAX_IN_FLIGHT", default_value_t = 0)]
    pub drain_max_in_flight: u32,

    /// What the SIGTERM drain does at its deadline with publishers that support neither signal.
    #[arg(long, env = "INGEST_INCAPABLE_POLICY", value_enum, default_value = "disconnect")]
    pub incapable_policy: IncapablePolicy,

    /// Wait after turning unready before the first signal, so the Service
    /// stops sending publishers here.
    #[arg(long, env = "INGEST_PROPAGATION_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub propagation_delay: Duration,

    /// tcUrl sent with Reconnect Request in the SIGTERM drain (repeat for
    /// round-robin). Without it publishers reconnect to their own tcUrl.
    #[arg(long = "redirect", env = "INGEST_REDIRECT", value_delimiter = ',')]
    pub redirects: Vec<String>,
}

/// Flags of the relays, part of [`Args`].
#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// Most media bytes a relay buffers while the origin is unavailable.
    #[arg(long, env = "INGEST_RELAY_BUFFER_BYTES", default_value_t = 64 << 20)]
    pub relay_buffer_bytes: usize,

    /// Bytes every relay buffer of the pod may hold together (per-message
    /// overhead counted); over it the streams holding most lose their
    /// oldest GOPs. Default: half the container's memory limit, or 512 MiB
    /// when none can be read.
    #[arg(long, env = "INGEST_RELAY_MEMORY_BUDGET")]
    pub relay_memory_budget: Option<usize>,

    /// How long a relay keeps delivering after its publisher left.
    #[arg(long, env = "INGEST_RELAY_FLUSH_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub relay_flush_timeout: Duration,

    /// First wait between upstream attempts while the origin still has the
    /// stream from another pod (a handover); each further busy answer waits
    /// half as long again, up to --relay-busy-retry-max. The first media of
    /// a publisher that moved make-before-break (Reconnect Request) means it
    /// has just left the old pod: the waits start over then.
    #[arg(long, env = "INGEST_RELAY_BUSY_RETRY", default_value = "10ms", value_parser = parse_duration)]
    pub relay_busy_retry: Duration,

    /// Give up an upstream connection, and reconnect, when a write to the
    /// origin takes longer than this, or when the origin has said nothing
    /// for this long since it was sent media (no acknowledgement, no answer
    /// to a ping): a dead node or a partition sends no reset. An idle
    /// stream expects no answer.
    #[arg(long, env = "INGEST_RELAY_IO_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub relay_io_timeout: Duration,

    /// Longest wait between upstream attempts while the origin is busy with
    /// the stream: bounds the load hundreds of simultaneous handovers put on
    /// the origin.
    #[arg(long, env = "INGEST_RELAY_BUSY_RETRY_MAX", default_value = "200ms", value_parser = parse_duration)]
    pub relay_busy_retry_max: Duration,
}
