//! Typed settings, built once from the flags: each part of the pod gets the
//! values it needs and nothing keeps or re-parses a flag.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ingest_proto::tls::Watched;
use ingest_rtmp::chunk::Limits;
use thiserror::Error;
use tracing::warn;

use crate::auth::{self, PublishAuth};
use crate::config::{Args, ControlArgs, DrainArgs, RelayArgs};
use crate::drain::DrainSpec;
use crate::keys::{self, StreamKeys};
use crate::registry::SignalsEnabled;
use crate::relay::{self, RelayConfig};
use crate::session::SessionConfig;

/// A flag, or a combination of flags, that cannot work.
#[derive(Debug, Error)]
pub(crate) enum Error {
    #[error("--upstream {template:?}: {source}")]
    Upstream {
        /// The template, its query redacted.
        template: String,
        source: ingest_rtmp::url::Error,
    },
    #[error("--control-token-file {}: {source}", path.display())]
    ControlTokenFile { path: PathBuf, source: io::Error },
    #[error("the control token is empty")]
    EmptyControlToken,
    #[error("control API TLS: {0}")]
    ControlTls(ingest_proto::tls::Error),
    #[error(transparent)]
    PublishAuth(#[from] auth::Error),
}

/// Everything the pod was told, by the part that uses it.
pub(crate) struct Settings {
    pub(crate) listen: Listen,
    /// The control API; `None`: not served (no token).
    pub(crate) control: Option<ControlSettings>,
    /// How stream keys are shown (status, logs): keyed hashes, or in clear.
    pub(crate) stream_keys: StreamKeys,
    pub(crate) signals: SignalsEnabled,
    pub(crate) serving: Serving,
}

/// Addresses of the RTMP and HTTP listeners (port 0: any free port).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Listen {
    pub(crate) rtmp: SocketAddr,
    pub(crate) http: SocketAddr,
}

/// Where and how the control API is served.
pub(crate) struct ControlSettings {
    pub(crate) listen: SocketAddr,
    /// The bearer token callers must send.
    pub(crate) token: String,
    /// `None`: plaintext.
    pub(crate) tls: Option<ControlTls>,
    /// Whether a caller may ask for clear stream keys.
    pub(crate) reveal_stream_keys: bool,
    /// Propagation delay of a drain that does not set one.
    pub(crate) default_propagation: Duration,
}

/// The control API's TLS configuration, kept current from its files.
pub(crate) struct ControlTls {
    pub(crate) config: Watched<rustls::ServerConfig>,
    /// Whether callers must show a client certificate.
    pub(crate) mutual: bool,
}

/// What the serving pod reads: its sessions, limits and shutdown.
pub(crate) struct Serving {
    /// Name reported in status and told to the publish callback.
    pub(crate) pod_name: String,
    /// Shared by every publishing session; its publish callback is built.
    pub(crate) session: SessionConfig,
    pub(crate) max_connections: usize,
    /// Publishing connections are read on this clock; `None`: on every packet.
    pub(crate) media_read_interval: Option<Duration>,
    /// Bytes every relay buffer of the pod may hold together.
    pub(crate) relay_memory_budget: usize,
    /// Time from SIGTERM until whatever remains is closed.
    pub(crate) grace_period: Duration,
    /// The drain SIGTERM starts.
    pub(crate) sigterm_drain: DrainSpec,
}

impl Settings {
    /// Checks and types every flag; each one is named here or in the
    /// function its group goes to, so none is silently ignored. Loading the
    /// control API's TLS files needs a Tokio runtime when they are reloaded.
    pub(crate) fn from_args(args: Args) -> Result<Self, Error> {
        let Args {
            rtmp_listen,
            http_listen,
            control,
            upstream,
            record_dir,
            pod_name,
            max_connections,
            handshake_timeout,
            idle_timeout,
            signal_go_away,
            signal_reconnect_request,
            grace_period,
            drain,
            relay,
            signalled_quiet_close,
            media_read_interval,
            publish_auth_url,
            publish_auth_timeout,
            // Applied by `main` before the server starts.
            worker_threads: _,
            log_format: _,
        } = args;
        check_upstream(upstream.as_deref())?;
        let sigterm_drain = sigterm_drain(drain);
        if sigterm_drain.deadline > grace_period {
            warn!(deadline = ?sigterm_drain.deadline, grace = ?grace_period, "drain deadline is longer than the grace period");
        }
        let (control, stream_keys) = control_settings(control, sigterm_drain.propagation_delay)?;
        let (relay, relay_memory_budget) = relay_settings(relay);
        let signals = SignalsEnabled {
            go_away: signal_go_away,
            reconnect_request: signal_reconnect_request,
        };
        let auth = publish_auth_url
            .as_deref()
            .map(|url| PublishAuth::new(url, publish_auth_timeout))
            .transpose()?;
        let session = SessionConfig {
            handshake_timeout,
            idle_timeout,
            limits: Limits::default(),
            signals,
            upstream,
            relay,
            record_dir,
            signalled_quiet: signalled_quiet_close,
            auth,
            pod_name: pod_name.clone(),
        };
        Ok(Self {
            listen: Listen {
                rtmp: rtmp_listen,
                http: http_listen,
            },
            control,
            stream_keys,
            signals,
            serving: Serving {
                pod_name,
                session,
                max_connections,
                media_read_interval: Some(media_read_interval).filter(|i| !i.is_zero()),
                relay_memory_budget,
                grace_period,
                sigterm_drain,
            },
        })
    }
}

/// Refuses an upstream template that does not render to an RTMP URL.
fn check_upstream(template: Option<&str>) -> Result<(), Error> {
    if let Some(t) = template {
        let probe = ingest_rtmp::url::render(t, "app", "stream");
        ingest_rtmp::url::RtmpUrl::parse(&probe).map_err(|source| Error::Upstream {
            template: keys::redact_query(t),
            source,
        })?;
    }
    Ok(())
}

/// The control API (`None` without a token) and how stream keys are shown.
fn control_settings(
    flags: ControlArgs,
    default_propagation: Duration,
) -> Result<(Option<ControlSettings>, StreamKeys), Error> {
    let ControlArgs {
        control_listen,
        control_token_file,
        control_token,
        control_tls_cert,
        control_tls_key,
        control_tls_client_ca,
        control_tls_reload,
        control_reveal_stream_keys,
    } = flags;
    let token = read_control_token(control_token, control_token_file.as_deref())?;
    // Keyed by the control token, a secret of the release: hashes match
    // across its pods. Without a token, by a key of this process.
    let stream_keys = match (&token, control_reveal_stream_keys) {
        (_, true) => StreamKeys::new(b"", true),
        (Some(t), false) => StreamKeys::new(t.as_bytes(), false),
        (None, false) => StreamKeys::random(),
    };
    // Loaded (and so checked) even when no token serves the control API.
    let tls = match (control_tls_cert, control_tls_key) {
        (Some(cert), Some(key)) => {
            let mutual = control_tls_client_ca.is_some();
            let files = ingest_proto::tls::ServerFiles {
                cert,
                key,
                client_ca: control_tls_client_ca,
            };
            let config = files.watch(control_tls_reload).map_err(Error::ControlTls)?;
            Some(ControlTls { config, mutual })
        }
        _ => None,
    };
    let control = token.map(|token| ControlSettings {
        listen: control_listen,
        token,
        tls,
        reveal_stream_keys: control_reveal_stream_keys,
        default_propagation,
    });
    Ok((control, stream_keys))
}

/// The control API's bearer token, from the flag or its file; `None`: no
/// control API.
fn read_control_token(flag: Option<String>, file: Option<&Path>) -> Result<Option<String>, Error> {
    let token = match (flag, file) {
        (Some(t), _) => Some(t.trim().to_owned()),
        (None, Some(path)) => Some(
            ingest_runtime::read_secret(path).map_err(|source| Error::ControlTokenFile {
                path: path.to_owned(),
                source,
            })?,
        ),
        (None, None) => None,
    };
    if token.as_deref().is_some_and(str::is_empty) {
        return Err(Error::EmptyControlToken);
    }
    Ok(token)
}

/// The drain SIGTERM starts.
fn sigterm_drain(flags: DrainArgs) -> DrainSpec {
    let DrainArgs {
        drain_deadline,
        drain_rate,
        drain_max_in_flight,
        incapable_policy,
        propagation_delay,
        redirects,
    } = flags;
    DrainSpec {
        id: "sigterm".to_owned(),
        deadline: drain_deadline,
        rate: drain_rate,
        max_in_flight: drain_max_in_flight,
        incapable: incapable_policy,
        redirects,
        propagation_delay,
    }
}

/// Each relay's settings, and the pod's budget of relay buffers.
fn relay_settings(flags: RelayArgs) -> (RelayConfig, usize) {
    let RelayArgs {
        relay_buffer_bytes,
        relay_memory_budget,
        relay_flush_timeout,
        relay_busy_retry,
        relay_io_timeout,
        relay_busy_retry_max,
    } = flags;
    let config = RelayConfig {
        buffer_bytes: relay_buffer_bytes,
        busy_retry: relay_busy_retry,
        busy_retry_max: relay_busy_retry_max,
        flush_timeout: relay_flush_timeout,
        io_timeout: relay_io_timeout,
        ..RelayConfig::default()
    };
    (config, relay_memory_budget.unwrap_or_else(relay::default_budget))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn settings(argv: &[&str]) -> Result<Settings, Error> {
        Settings::from_args(Args::try_parse_from(argv).unwrap())
    }

    #[test]
    fn flags_and_env_defaults() {
        let s = settings(&[
            "ingest-pod",
            "--signal-go-away",
            "false",
            "--redirect",
            "rtmp://a/live,rtmp://b/live",
        ])
        .unwrap();
        assert!(!s.signals.go_away);
        assert!(s.signals.reconnect_request);
        assert_eq!(s.serving.sigterm_drain.redirects.len(), 2);
        assert!(Args::try_parse_from(["ingest-pod", "--idle-timeout", "forever"]).is_err());
        assert_eq!(s.serving.session.relay.io_timeout, Duration::from_secs(10));
        assert!(Args::try_parse_from(["ingest-pod", "--relay-io-timeout", "0s"]).is_err());
    }

    #[test]
    fn refuses_what_cannot_work() {
        let err = |argv: &[&str]| settings(argv).err().map(|e| e.to_string());
        assert_eq!(
            err(&["ingest-pod", "--upstream", "http://origin/{app}/{stream}"]),
            Some(
                r#"--upstream "http://origin/{app}/{stream}": "http://origin/app/stream" is not an rtmp:// URL"#
                    .to_owned()
            )
        );
        assert_eq!(
            err(&["ingest-pod", "--control-token", " "]),
            Some("the control token is empty".to_owned())
        );
        assert!(err(&["ingest-pod", "--publish-auth-url", "ftp://auth"]).is_some());
        let s = settings(&["ingest-pod", "--control-token", "t", "--propagation-delay", "2s"]).unwrap();
        let control = s.control.expect("a token serves the control API");
        assert_eq!(
            (control.token.as_str(), control.default_propagation),
            ("t", Duration::from_secs(2))
        );
        assert!(settings(&["ingest-pod"]).unwrap().control.is_none());
    }
}
