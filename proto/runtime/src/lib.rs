//! Process plumbing the two binaries share, the ingest pod and the
//! operator (and the tools of the testkit): one copy of each.
//!
//! - durations on the command line and in the environment ([`parse_duration`]),
//!   and shown the way they are typed ([`format_duration`]);
//! - log set-up ([`LogFormat`], [`init_logs`]);
//! - the shutdown signal ([`shutdown_signal`]);
//! - secrets read from mounted files ([`read_secret`]);
//! - the `_build_info` metric ([`register_build_info`]).

#![warn(unreachable_pub)]

use std::path::Path;
use std::time::Duration;

/// Parses a duration as `humantime` does: `500ms`, `25s`, `2m`, `1h`,
/// `1m30s`. For clap's `value_parser`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}; examples: 500ms, 25s, 2m, 1m30s)"))
}

/// [`parse_duration`], refusing zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        Duration::ZERO => Err(format!("{s:?}: must be more than zero")),
        d => Ok(d),
    }
}

/// A duration in whole seconds, written as [`parse_duration`] reads it:
/// `0s`, `45s`, `4m12s`, `1h2m3s` (rounded down).
pub fn format_duration(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs()))
        .to_string()
        .replace(' ', "")
}

/// The commit this build came from (see `build.rs`), or "unknown".
pub const BUILD_COMMIT: &str = env!("INGEST_BUILD_COMMIT");

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct BuildLabels {
    version: String,
    commit: String,
}

/// Registers `build_info` (1, labelled with `version` and the build's
/// commit) in `registry`, under its prefix: `ingest_build_info`,
/// `ingest_operator_build_info`.
pub fn register_build_info(registry: &mut prometheus_client::registry::Registry, version: &str) {
    let info =
        prometheus_client::metrics::family::Family::<BuildLabels, prometheus_client::metrics::gauge::Gauge>::default();
    info.get_or_create(&BuildLabels {
        version: version.to_owned(),
        commit: BUILD_COMMIT.to_owned(),
    })
    .set(1);
    registry.register("build_info", "Version and commit of this build (always 1)", info);
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; colours only when stdout is a terminal.
    #[default]
    Text,
    /// One JSON object a line, for log platforms.
    Json,
}

/// Logs to stdout in `format`, filtered by `RUST_LOG` (default `info`); no
/// escape codes unless stdout is a terminal. A second call does nothing.
pub fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stdout().is_terminal()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Resolves on SIGTERM (what the kubelet sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(err) => {
            tracing::error!(%err, "cannot listen for SIGTERM; only Ctrl-C stops this process");
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

/// A secret from a mounted file (a Secret volume), trailing whitespace and
/// newline trimmed.
pub fn read_secret(path: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn build_info_names_version_and_commit() {
        let mut registry = prometheus_client::registry::Registry::default();
        register_build_info(registry.sub_registry_with_prefix("ingest"), "1.2.3");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoded");
        let want = format!("ingest_build_info{{version=\"1.2.3\",commit=\"{BUILD_COMMIT}\"}} 1");
        assert!(text.lines().any(|l| l == want), "{text}");
        assert!(!BUILD_COMMIT.is_empty());
    }

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("25s"), Ok(Duration::from_secs(25)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        let bare = parse_duration("30").expect_err("a number without a unit");
        assert!(bare.contains("examples"), "{bare}");
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_positive_duration("0s").is_err());
        assert_eq!(parse_positive_duration("1s"), Ok(Duration::from_secs(1)));
    }

    #[test]
    fn durations_are_shown_as_typed() {
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_millis(45_900)), "45s");
        assert_eq!(format_duration(Duration::from_secs(252)), "4m12s");
        assert_eq!(format_duration(Duration::from_secs(3723)), "1h2m3s");
        for s in ["4m12s", "1h2m3s"] {
            assert_eq!(format_duration(parse_duration(s).expect(s)), s);
        }
    }

    #[test]
    fn a_secret_file_is_trimmed() {
        let path = std::env::temp_dir().join(format!("ingest-runtime-secret-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").expect("write");
        assert_eq!(read_secret(&path).expect("read"), "s3cret");
        let _ = std::fs::remove_file(&path);
    }
}
