//! Runs N synthetic publishers against an ingest and prints what each did.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use ingest_runtime::parse_duration;
use ingest_testkit::publisher::{self, PublisherConfig};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Publishes synthetic H.264/AAC-like streams whose every frame is unique,
/// announcing RTMP Go Away and/or Enhanced RTMP Reconnect Request, and
/// logs each frame sent for `ingest-audit`.
#[derive(Debug, Parser)]
#[command(name = "ingest-publisher", version)]
struct Args {
    /// URL up to the application; streams are published as <url>/<prefix>-<i>.
    #[arg(long, env = "INGEST_PUBLISHER_URL", default_value = "rtmp://127.0.0.1:1935/live")]
    url: String,
    /// Number of publishers.
    #[arg(long, env = "INGEST_PUBLISHER_COUNT", default_value_t = 1)]
    count: u32,
    /// Stream name prefix.
    #[arg(long, env = "INGEST_PUBLISHER_PREFIX", default_value = "pub")]
    prefix: String,
    /// Announce and honour RTMP Go Away (supportsGoAway).
    #[arg(long, env = "INGEST_PUBLISHER_GO_AWAY")]
    go_away: bool,
    /// Announce and honour Enhanced RTMP Reconnect Request (capsEx bit 1).
    #[arg(long, env = "INGEST_PUBLISHER_RECONNECT")]
    reconnect: bool,
    /// Cycle capabilities per publisher: go-away, reconnect, both.
    #[arg(long, env = "INGEST_PUBLISHER_MIXED", conflicts_with_all = ["go_away", "reconnect"])]
    mixed: bool,
    /// Media length per publisher (90, 90s, 500ms, 2m); until Ctrl-C if unset.
    #[arg(long, env = "INGEST_PUBLISHER_DURATION", value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Video frames per second.
    #[arg(long, env = "INGEST_PUBLISHER_FPS", default_value_t = 30)]
    fps: u32,
    /// Frames per GOP (a keyframe every N frames).
    #[arg(long, env = "INGEST_PUBLISHER_GOP", default_value_t = 30)]
    gop: u32,
    /// Video bits per second (sets the payload sizes).
    #[arg(long, env = "INGEST_PUBLISHER_VIDEO_BITRATE", default_value_t = 2_500_000)]
    video_bitrate: u64,
    /// Publish video only.
    #[arg(long, env = "INGEST_PUBLISHER_NO_AUDIO")]
    no_audio: bool,
    /// Directory for one JSON lines log per stream (<stream>.jsonl).
    #[arg(long, env = "INGEST_PUBLISHER_LOG_DIR")]
    log_dir: Option<PathBuf>,
    /// Delay between publisher starts.
    #[arg(long, env = "INGEST_PUBLISHER_STAGGER", value_parser = parse_duration, default_value = "20ms")]
    stagger: Duration,
    /// How long each publisher keeps trying to (re)connect.
    #[arg(long, env = "INGEST_PUBLISHER_CONNECT_TIMEOUT", value_parser = parse_duration, default_value = "30s")]
    connect_timeout: Duration,
}

impl Args {
    fn configs(self) -> std::io::Result<Vec<PublisherConfig>> {
        let Args {
            url,
            count,
            prefix,
            go_away,
            reconnect,
            mixed,
            duration,
            fps,
            gop,
            video_bitrate,
            no_audio,
            log_dir,
            stagger: _,
            connect_timeout,
        } = self;
        if let Some(dir) = &log_dir {
            std::fs::create_dir_all(dir)?;
        }
        Ok((0..count)
            .map(|i| {
                let stream = format!("{prefix}-{i}");
                let mut cfg = PublisherConfig::new(format!("{}/{stream}", url.trim_end_matches('/')));
                (cfg.go_away, cfg.reconnect) = if mixed {
                    [(true, false), (false, true), (true, true)][i as usize % 3]
                } else {
                    (go_away, reconnect)
                };
                (cfg.fps, cfg.gop, cfg.video_bitrate_bps, cfg.audio) = (fps, gop, video_bitrate, !no_audio);
                (cfg.duration, cfg.connect_timeout) = (duration, connect_timeout);
                cfg.log = log_dir.as_ref().map(|d| d.join(format!("{stream}.jsonl")));
                cfg
            })
            .collect())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    // Logs go to stderr: stdout carries the summary.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let stagger = args.stagger;
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            ingest_runtime::shutdown_signal().await;
            shutdown.cancel();
        }
    });
    let results = publisher::run_many(args.configs()?, stagger, shutdown).await;
    print!("{}", publisher::summary_table(&results));
    let failed = results
        .iter()
        .any(|(_, r)| r.as_ref().map_or(true, |r| r.error.is_some()));
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
