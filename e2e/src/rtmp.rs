//! Real RTMP peers on the host: an nginx-rtmp origin that records what it
//! receives, ffmpeg as a publisher, ffprobe to judge the recordings.

use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::process::Command;

const NGINX_RTMP_MODULE: &str = "/usr/lib/nginx/modules/ngx_rtmp_module.so";

/// An nginx-rtmp origin outside the cluster, as a real origin would be:
/// application `live`, every published stream recorded to its own FLV file.
pub struct Origin {
    dir: PathBuf,
    listen: SocketAddrV4,
    nginx: Child,
}

impl Origin {
    /// Starts nginx listening on `listen` (use [`crate::cluster::HOST_IP`] so
    /// pods reach it and nothing outside the machine does).
    pub fn start(listen: SocketAddrV4) -> Result<Self> {
        ensure_tools()?;
        let dir = std::env::temp_dir().join(format!(
            "lossless-ingest-origin-{}-{}",
            std::process::id(),
            listen.port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("rec"))?;
        let conf = format!(
            "load_module {NGINX_RTMP_MODULE};
# One process, no privilege drop: the test owns it and the recordings.
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
rtmp {{
    server {{
        listen {listen};
        chunk_size 4096;
        application live {{
            live on;
            record all;
            record_unique on;
            record_path {dir}/rec;
        }}
    }}
}}
",
            dir = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf)?;
        let nginx = std::process::Command::new("nginx")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx (Debian packages nginx, libnginx-mod-rtmp)")?;
        let origin = Self { dir, listen, nginx };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&SocketAddr::V4(listen), Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "nginx-rtmp did not listen on {listen}; see {}",
                    origin.dir.join("error.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(origin)
    }

    /// The URL template ingest pods push to.
    pub fn upstream_template(&self) -> String {
        format!("rtmp://{}/live/{{stream}}", self.listen)
    }

    /// Recordings of `stream` (one per publish, `record_unique`).
    pub fn recordings(&self, stream: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.join("rec"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{stream}-")) && n.ends_with(".flv"))
        });
        files.sort();
        files
    }

    pub fn error_log(&self) -> PathBuf {
        self.dir.join("error.log")
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = self.nginx.kill();
        let _ = self.nginx.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
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
