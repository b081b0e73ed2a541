//! Real RTMP peers on the host: an nginx-rtmp origin that records what it
//! receives (the ingest pod crate's [`Origin`]), ffmpeg as a publisher,
//! ffprobe to judge the recordings.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ingest_testkit::ffmpeg::TestStream;
use ingest_testkit::origin::Origin;
use ingest_testkit::publisher::{Progress, Publisher, PublisherConfig, PublisherReport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
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
    hooks: Option<Hooks>,
    dir: tempfile::TempDir,
}

impl HostOrigin {
    /// Installs nginx-rtmp and ffmpeg when absent, then starts the origin.
    pub fn start() -> Result<Self> {
        ensure_tools()?;
        let dir = tempfile::Builder::new().prefix("lossless-ingest-origin-").tempdir()?;
        let origin = Origin::start(dir.path(), &HOST_IP.to_string()).context("starting the nginx-rtmp origin")?;
        Ok(Self {
            origin,
            hooks: None,
            dir,
        })
    }

    /// [`HostOrigin::start`] with nginx-rtmp's publish notifications sent to
    /// an HTTP endpoint of ours ([`Hooks`]), which times every upstream
    /// publish: the handover stall at the origin.
    pub async fn start_with_hooks() -> Result<Self> {
        ensure_tools()?;
        let hooks = Hooks::start().await?;
        let dir = tempfile::Builder::new().prefix("lossless-ingest-origin-").tempdir()?;
        let origin = Origin::start_with_hooks(dir.path(), &HOST_IP.to_string(), Some(&hooks.url()))
            .context("starting the nginx-rtmp origin")?;
        Ok(Self {
            origin,
            hooks: Some(hooks),
            dir,
        })
    }

    /// The publish notifications so far (empty without hooks).
    pub fn notifications(&self) -> Vec<Notification> {
        self.hooks.as_ref().map(Hooks::events).unwrap_or_default()
    }

    /// The upstream URL template ingest pods push to: `rtmp://HOST_IP:PORT/{app}/{stream}`.
    pub fn upstream_template(&self) -> String {
        format!("rtmp://{}/{{app}}/{{stream}}", self.origin.addr())
    }

    /// Where the recordings are (for [`ingest_testkit::audit::audit_dir`]).
    pub fn record_dir(&self) -> PathBuf {
        self.origin.record_dir()
    }

    /// Recordings of `stream` in publish order (one per upstream publish).
    pub fn recordings(&self, stream: &str) -> Vec<PathBuf> {
        ingest_testkit::audit::find_recordings(&self.record_dir(), stream).unwrap_or_default()
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
    let out = ffmpeg_test_stream(url, seconds)
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

/// ffmpeg publishing `seconds` of a synthetic test stream (H.264 with a
/// keyframe every 30 frames, AAC) to `url` in real time.
fn ffmpeg_test_stream(url: &str, seconds: u32) -> Command {
    TestStream {
        nostdin: true,
        ..TestStream::new(seconds)
    }
    .command(url)
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
    task: JoinHandle<ingest_testkit::publisher::Result<PublisherReport>>,
}

impl BackgroundPublisher {
    /// Starts publishing a small 30 fps stream (a keyframe a second) to `url`.
    pub fn start(url: &str) -> Result<Self> {
        Self::with_signals(url, true, true)
    }

    /// [`BackgroundPublisher::start`] announcing only the given signals.
    pub fn with_signals(url: &str, go_away: bool, reconnect: bool) -> Result<Self> {
        Self::spawn(PublisherConfig {
            go_away,
            reconnect,
            fps: 30,
            gop: 30,
            video_bitrate_bps: 500_000,
            width: 320,
            height: 240,
            ..PublisherConfig::new(url)
        })
    }

    /// A 15 fps, 100 kbit/s stream (a keyframe a second), both signals:
    /// for benchmarks with hundreds of publishers.
    pub fn low_bitrate(url: &str) -> Result<Self> {
        Self::spawn(PublisherConfig {
            go_away: true,
            reconnect: true,
            fps: 15,
            gop: 15,
            video_bitrate_bps: 100_000,
            width: 160,
            height: 120,
            ..PublisherConfig::new(url)
        })
    }

    fn spawn(cfg: PublisherConfig) -> Result<Self> {
        let publisher = Publisher::new(cfg)?;
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

/// One nginx-rtmp notification as our endpoint received it.
#[derive(Debug, Clone)]
pub struct Notification {
    pub at: Instant,
    /// `publish` or `publish_done`.
    pub call: String,
    /// The stream name.
    pub name: String,
    /// nginx's id of the RTMP connection (one upstream publish attempt).
    pub client: String,
}

/// A tiny HTTP endpoint on loopback for nginx-rtmp's `on_*` notifications:
/// answers 200 to each POST and keeps what it was told, with the time.
pub struct Hooks {
    addr: std::net::SocketAddr,
    events: Arc<Mutex<Vec<Notification>>>,
    task: JoinHandle<()>,
}

/// The most a notification request may hold (nginx sends a few hundred bytes).
const HOOK_REQUEST_LIMIT: usize = 16 * 1024;

impl Hooks {
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    if let Ok(Some(n)) = serve_hook(stream).await
                        && let Ok(mut events) = sink.lock()
                    {
                        events.push(n);
                    }
                });
            }
        });
        Ok(Self { addr, events, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}/notify", self.addr)
    }

    pub fn events(&self) -> Vec<Notification> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl Drop for Hooks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one HTTP/1.x POST (headers, then Content-Length bytes of form
/// body), answers 200 and returns the notification it carried.
async fn serve_hook(mut stream: TcpStream) -> Result<Option<Notification>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let (head_end, length) = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, length);
        }
        if buf.len() > HOOK_REQUEST_LIMIT {
            bail!("notification headers over {HOOK_REQUEST_LIMIT} bytes");
        }
    };
    let at = Instant::now();
    if head_end + length > HOOK_REQUEST_LIMIT {
        bail!("notification of {length} bytes");
    }
    while buf.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    stream
        .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await?;
    let body = &buf[head_end..buf.len().min(head_end + length)];
    let field = |key: &str| {
        form_urlencoded::parse(body)
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Ok(Some(Notification {
        at,
        call: field("call"),
        name: field("name"),
        client: field("clientid"),
    }))
}

/// Shorter upstream publishes were refused by nginx ("already publishing":
/// the ingest relay retries every few milliseconds and closes each refused
/// attempt at once); a publish that carried media lasts seconds.
const REFUSED_PUBLISH: Duration = Duration::from_millis(500);

/// Handover stalls of `stream` at the origin: for consecutive upstream
/// publishes that nginx admitted, the time from the older one's
/// `publish_done` to the newer one's `publish`. nginx admits a publish when
/// our endpoint's answer reaches it, and removes a closed publish before its
/// `publish_done` goes out, so a newer `publish` may arrive first: that
/// stall counts as zero (it was below the hooks' latency, about a millisecond).
pub fn stalls(events: &[Notification], stream: &str) -> Vec<Duration> {
    let mut ordered: Vec<&Notification> = events.iter().filter(|e| e.name == stream).collect();
    ordered.sort_by_key(|e| e.at);
    // (client, publish, done) per publish attempt.
    let mut attempts: Vec<(&str, Instant, Option<Instant>)> = Vec::new();
    for e in ordered {
        match e.call.as_str() {
            "publish" => attempts.push((e.client.as_str(), e.at, None)),
            "publish_done" => {
                if let Some(a) = attempts.iter_mut().rev().find(|a| a.0 == e.client && a.2.is_none()) {
                    a.2 = Some(e.at);
                }
            }
            _ => {}
        }
    }
    let admitted: Vec<(Instant, Option<Instant>)> = attempts
        .into_iter()
        .filter(|a| {
            a.2.is_none_or(|done| done.saturating_duration_since(a.1) >= REFUSED_PUBLISH)
        })
        .map(|a| (a.1, a.2))
        .collect();
    admitted
        .windows(2)
        .filter_map(|w| Some(w[1].0.saturating_duration_since(w[0].1?)))
        .collect()
}

/// ffmpeg publishing a synthetic stream in real time until stopped: the
/// incapable publisher (it announces neither signal).
pub struct FfmpegPublisher {
    pub stream: String,
    stop: CancellationToken,
    task: JoinHandle<Result<FfmpegExit>>,
}

/// How and when an ffmpeg publisher ended.
#[derive(Debug)]
pub struct FfmpegExit {
    pub status: std::process::ExitStatus,
    pub at: Instant,
    pub stderr: String,
}

impl FfmpegPublisher {
    /// Starts ffmpeg publishing to `url` (`rtmp://.../live/<stream>`) for up to ten minutes.
    pub fn start(url: &str) -> Result<Self> {
        let stream = url.rsplit('/').next().unwrap_or_default().to_owned();
        let mut child = ffmpeg_test_stream(url, 600)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting ffmpeg")?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut stderr = child.stderr.take();
            tokio::select! {
                status = child.wait() => {
                    let at = Instant::now();
                    let mut text = String::new();
                    if let Some(pipe) = stderr.as_mut() {
                        let _ = pipe.read_to_string(&mut text).await;
                    }
                    Ok(FfmpegExit { status: status?, at, stderr: text })
                }
                _ = token.cancelled() => {
                    let _ = child.kill().await;
                    bail!("stopped")
                }
            }
        });
        Ok(Self { stream, stop, task })
    }

    /// Waits up to `timeout` for ffmpeg to end by itself.
    pub async fn wait(mut self, timeout: Duration) -> Result<FfmpegExit> {
        match tokio::time::timeout(timeout, &mut self.task).await {
            Ok(joined) => joined.context("ffmpeg task")?,
            Err(_) => bail!("ffmpeg ({}) still running after {timeout:?}", self.stream),
        }
    }
}

impl Drop for FfmpegPublisher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
