//! Real RTMP peers on the host: an nginx-rtmp origin that records what it
//! receives (the ingest pod crate's [`Origin`]), ffmpeg as a publisher,
//! ffprobe to judge the recordings.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result, bail};
use ingest_pod::origin::Origin;
use ingest_pod::publisher::{Progress, Publisher, PublisherConfig, PublisherReport};
use tokio::process::Command;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cluster::HOST_IP;

/// An nginx-rtmp origin outside the cluster, as a real origin would be: on
/// the host side of the node bridge ([`HOST_IP`], a free port), application
/// `live`, every publish recorded to its own FLV file in a temporary
/// directory that goes with it.
pub struct HostOrigin {
    // Declared first: nginx stops before its directory is removed.
    origin: Origin,
    dir: tempfile::TempDir,
}

impl HostOrigin {
    /// Installs nginx-rtmp and ffmpeg when absent, then starts the origin.
    pub fn start() -> Result<Self> {
        ensure_tools()?;
        let dir = tempfile::Builder::new().prefix("lossless-ingest-origin-").tempdir()?;
        let origin = Origin::start(dir.path(), &HOST_IP.to_string()).context("starting the nginx-rtmp origin")?;
        Ok(Self { origin, dir })
    }

    /// The upstream URL template ingest pods push to: `rtmp://HOST_IP:PORT/{app}/{stream}`.
    pub fn upstream_template(&self) -> String {
        format!("rtmp://{}/{{app}}/{{stream}}", self.origin.addr())
    }

    /// Where the recordings are (for [`ingest_pod::audit::audit_dir`]).
    pub fn record_dir(&self) -> PathBuf {
        self.origin.record_dir()
    }

    /// Recordings of `stream` in publish order (one per upstream publish).
    pub fn recordings(&self, stream: &str) -> Vec<PathBuf> {
        ingest_pod::audit::find_recordings(&self.record_dir(), stream).unwrap_or_default()
    }

    pub fn error_log(&self) -> PathBuf {
        self.dir.path().join("error.log")
    }
}

/// Installs nginx, its RTMP module and ffmpeg when absent (`cluster deps smoke`).
pub fn ensure_tools() -> Result<()> {
    let status = std::process::Command::new(crate::Cluster::script())
        .args(["deps", "smoke"])
        .status()?;
    if !status.success() {
        bail!("`cluster deps smoke` failed ({status})");
    }
    Ok(())
}

/// Publishes `seconds` of a synthetic test stream (H.264 with a keyframe every
/// 30 frames, AAC) to `url` with ffmpeg, in real time.
pub async fn publish(url: &str, seconds: u32) -> Result<()> {
    let t = seconds.to_string();
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc=size=320x240:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args([
            "-t",
            &t,
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            "-g",
            "30",
        ])
        .args(["-c:a", "aac", "-f", "flv", url])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running ffmpeg")?;
    if !out.status.success() {
        bail!(
            "ffmpeg publish to {url} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Duration in seconds of the video stream ffprobe finds in `path`.
pub async fn video_duration(path: &Path) -> Result<f64> {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=codec_name:format=duration",
        ])
        .args(["-of", "default=noprint_wrappers=1"])
        .arg(path)
        .output()
        .await
        .context("running ffprobe")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains("codec_name=h264") {
        bail!("no H.264 video in {}: {text}", path.display());
    }
    text.lines()
        .find_map(|l| l.strip_prefix("duration="))
        .and_then(|d| d.trim().parse().ok())
        .with_context(|| format!("no duration in {}: {text}", path.display()))
}

/// A capable test publisher (announces both Go Away and Reconnect Request)
/// streaming in the background until [`BackgroundPublisher::stop`].
pub struct BackgroundPublisher {
    stop: CancellationToken,
    progress: watch::Receiver<Progress>,
    task: JoinHandle<ingest_pod::publisher::Result<PublisherReport>>,
}

impl BackgroundPublisher {
    /// Starts publishing a small 30 fps stream (a keyframe a second) to `url`.
    pub fn start(url: &str) -> Result<Self> {
        let publisher = Publisher::new(PublisherConfig {
            go_away: true,
            reconnect: true,
            fps: 30,
            gop: 30,
            video_bitrate_bps: 500_000,
            width: 320,
            height: 240,
            ..PublisherConfig::new(url)
        })?;
        let progress = publisher.progress();
        let stop = CancellationToken::new();
        let task = tokio::spawn(publisher.run(stop.clone()));
        Ok(Self { stop, progress, task })
    }

    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    /// Stops publishing (a clean teardown) and returns what was sent.
    pub async fn stop(mut self) -> Result<PublisherReport> {
        self.stop.cancel();
        let report = (&mut self.task).await.context("publisher task")??;
        Ok(report)
    }
}

impl Drop for BackgroundPublisher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
