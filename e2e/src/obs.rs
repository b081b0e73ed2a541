//! A real encoder (issue 9, scenario 9): Debian's OBS Studio 29, a Go Away
//! client, headless under Xvfb, publishing while its ingest pod drains, and
//! audited against its own local recording.
//!
//! OBS streams to a custom RTMP server and records "same as stream" (the
//! same encoder packets) to FLV. A small Lua script of ours, loaded with
//! the scene collection, sequences the outputs so the recording lies inside
//! the stream: recording starts once streaming has, and stops before it.
//! Every recorded audio/video packet must then reach the origin exactly
//! once ([`ingest_testkit::audit::audit_local_recording`]); what the stream
//! carried before and after the recording counts as "unknown", not lost.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ingest_pod::drain::Phase;
use ingest_testkit::audit::{self, AuditReport};
use ingest_testkit::lab::{Balancer, LocalPod};
use ingest_testkit::origin::Origin;
use tokio::process::{Child, Command};

use crate::cluster::{Cluster, eventually};
use crate::lossless::{Stage, ingest_pods, kubectl_drain, say};
use crate::rtmp::{self, Hooks};

/// OBS 29.0.2's version number as it stores it (`LastVersion`): major << 24
/// | minor << 16 | patch. With it and `FirstRun`, no wizard opens.
const OBS_LAST_VERSION: u32 = (29 << 24) | 2;
/// Names of the profile, scene collection and scene we write.
const PROFILE: &str = "lossless";
const SCENE: &str = "Main";
/// How often the control script looks at its inbox (milliseconds).
const CONTROL_TICK_MS: u32 = 100;
/// Starting OBS up to a live stream and recording (Xvfb, software GL).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Stopping the recording, then the stream (it sends up to the stop time).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// OBS's own shutdown after SIGINT.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Namespace of [`obs_node_drain`].
pub const OBS_NODE_DRAIN_NS: &str = "obs-drain";

/// What OBS publishes and how.
#[derive(Debug, Clone)]
pub struct ObsConfig {
    /// `rtmp://host:port/app` (OBS's "Server").
    pub server: String,
    /// The stream key (the stream name at the origin).
    pub key: String,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub video_kbps: u32,
    pub audio_kbps: u32,
    /// Seconds between keyframes.
    pub keyint_sec: u32,
    /// OBS's auto-reconnect delay after an unplanned disconnect.
    pub retry_delay_sec: u32,
    /// Length of the looped test clip; longer than a run, so no picture or
    /// sound repeats (the audit identifies packets by their bytes).
    pub clip_sec: u32,
}

impl ObsConfig {
    /// 640x360 at 30 fps, 800 kbit/s x264 with a keyframe a second, to the
    /// publish URL `rtmp://host:port/app/key`.
    pub fn new(url: &str) -> Result<Self> {
        let (server, key) = url
            .rsplit_once('/')
            .filter(|(server, key)| server.starts_with("rtmp://") && server.len() > 7 && !key.is_empty())
            .with_context(|| format!("not an rtmp://host/app/key URL: {url}"))?;
        Ok(Self {
            server: server.to_owned(),
            key: key.to_owned(),
            width: 640,
            height: 360,
            fps: 30,
            video_kbps: 800,
            audio_kbps: 128,
            keyint_sec: 1,
            retry_delay_sec: 1,
            clip_sec: 180,
        })
    }
}

/// Installs OBS Studio, Xvfb (with xvfb-run and xauth) and ffmpeg when absent.
pub fn ensure_installed() -> Result<()> {
    let have = |p: &str| Path::new(p).exists();
    if have("/usr/bin/obs") && have("/usr/bin/xvfb-run") && have("/usr/bin/xauth") && have("/usr/bin/ffmpeg") {
        return Ok(());
    }
    let apt = |args: &[&str]| -> Result<()> {
        let status = std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        ensure!(status.success(), "apt-get {} failed ({status})", args.join(" "));
        Ok(())
    };
    apt(&["update", "-q"])?;
    apt(&["install", "-y", "-q", "obs-studio", "xvfb", "xauth", "ffmpeg"])
}

/// A test clip OBS loops: a moving test pattern with a frame counter and
/// pink noise, so every encoded packet differs. Made once per size and
/// kept in the temporary directory for later runs.
async fn test_clip(cfg: &ObsConfig) -> Result<PathBuf> {
    let path = std::env::temp_dir().join(format!(
        "lossless-ingest-obs-clip-{}x{}-{}fps-{}s.mp4",
        cfg.width, cfg.height, cfg.fps, cfg.clip_sec
    ));
    if path.exists() {
        return Ok(path);
    }
    let partial = path.with_extension(format!("{}.mp4", std::process::id()));
    let video = format!("testsrc2=size={}x{}:rate={}", cfg.width, cfg.height, cfg.fps);
    let out = Command::new("nice")
        .args([
            "-n",
            "10",
            "ffmpeg",
            "-hide_banner",
            "-loglevel",
            "error",
            "-nostdin",
            "-y",
        ])
        .args(["-f", "lavfi", "-i", &video])
        .args([
            "-f",
            "lavfi",
            "-i",
            "anoisesrc=color=pink:sample_rate=44100:amplitude=0.3",
        ])
        .args([
            "-t",
            &cfg.clip_sec.to_string(),
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
        ])
        .args(["-crf", "30", "-g", &cfg.fps.to_string(), "-pix_fmt", "yuv420p"])
        .args(["-c:a", "aac", "-b:a", "96k", "-shortest"])
        .arg(&partial)
        .stdin(Stdio::null())
        .output()
        .await
        .context("running ffmpeg")?;
    ensure!(
        out.status.success(),
        "ffmpeg could not make the test clip ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

/// The control script: starts recording once streaming is live, and on a
/// `stop` file stops recording, then streaming, noting each step in
/// `status` (one word a line).
fn control_script(control: &Path) -> String {
    format!(
        r#"-- Written by lossless-ingest's OBS harness.
obs = obslua
local dir = "{dir}"
local state = "wait-stream"
local rec_stopped = false

local function note(word)
  local f = io.open(dir .. "/status", "a")
  if f then f:write(word .. "\n"); f:close() end
end

local function exists(name)
  local f = io.open(dir .. "/" .. name, "r")
  if f then f:close(); return true end
  return false
end

local function on_event(event)
  if event == obs.OBS_FRONTEND_EVENT_RECORDING_STOPPED then rec_stopped = true end
end

local function tick()
  if state == "wait-stream" and obs.obs_frontend_streaming_active() then
    note("streaming")
    obs.obs_frontend_recording_start()
    state = "wait-record"
  elseif state == "wait-record" and obs.obs_frontend_recording_active() then
    note("recording")
    state = "recording"
  elseif state == "recording" and exists("stop") then
    obs.obs_frontend_recording_stop()
    state = "stopping-record"
  elseif state == "stopping-record" and rec_stopped and not obs.obs_frontend_recording_active() then
    note("recording-stopped")
    obs.obs_frontend_streaming_stop()
    state = "stopping-stream"
  elseif state == "stopping-stream" and not obs.obs_frontend_streaming_active() then
    note("stopped")
    state = "done"
  end
end

function script_description()
  return "lossless-ingest: record inside the stream, stop on request"
end

function script_load(settings)
  obs.obs_frontend_add_event_callback(on_event)
  obs.timer_add(tick, {tick})
end
"#,
        dir = lua_escape(&control.display().to_string()),
        tick = CONTROL_TICK_MS
    )
}

fn lua_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The private OBS tree under `root`: `config/obs-studio/{global.ini,
/// basic/profiles/<p>/{basic.ini,service.json}, basic/scenes/<c>.json}`.
fn write_config(root: &Path, cfg: &ObsConfig, clip: &Path, script: &Path, rec: &Path) -> Result<()> {
    let obs = root.join("config/obs-studio");
    let profile = obs.join("basic/profiles").join(PROFILE);
    let scenes = obs.join("basic/scenes");
    std::fs::create_dir_all(&profile)?;
    std::fs::create_dir_all(&scenes)?;
    write_global(&obs)?;
    write_profile(&profile, cfg, rec)?;
    write_scene_collection(&scenes, clip, script)
}

/// `global.ini`: which profile and scene collection, and no question asked.
fn write_global(obs: &Path) -> Result<()> {
    // FirstRun and LastVersion: no auto-configuration wizard, no "what's
    // new"; no confirmations; the tray takes the minimized window.
    std::fs::write(
        obs.join("global.ini"),
        format!(
            "[General]\nFirstRun=true\nLastVersion={OBS_LAST_VERSION}\nConfirmOnExit=false\nEnableAutoUpdates=false\n\n\
             [Basic]\nProfile={PROFILE}\nProfileDir={PROFILE}\nSceneCollection={PROFILE}\nSceneCollectionFile={PROFILE}\n\n\
             [BasicWindow]\nSysTrayEnabled=true\nSysTrayWhenStarted=true\nSysTrayMinimizeToTray=true\n\
             WarnBeforeStartingStream=false\nWarnBeforeStoppingStream=false\nWarnBeforeStoppingRecord=false\n\
             RecordWhenStreaming=false\nKeepRecordingWhenStreamStops=true\nPreviewEnabled=false\n"
        ),
    )?;
    Ok(())
}

/// The profile: output settings (`basic.ini`) and where to stream (`service.json`).
fn write_profile(profile: &Path, cfg: &ObsConfig, rec: &Path) -> Result<()> {
    // Simple output mode; x264 options fix the GOP (no scene cuts);
    // recording quality "Stream" shares the stream's encoders.
    std::fs::write(
        profile.join("basic.ini"),
        format!(
            "[General]\nName={PROFILE}\n\n\
             [Output]\nMode=Simple\nReconnect=true\nRetryDelay={retry}\nMaxRetries=20\n\
             FilenameFormatting=obs-%CCYY-%MM-%DD-%hh-%mm-%ss\n\n\
             [SimpleOutput]\nFilePath={rec}\nRecFormat=flv\nVBitrate={vkbps}\nABitrate={akbps}\n\
             UseAdvanced=true\nPreset=veryfast\nx264Settings=keyint={keyint} min-keyint={keyint} scenecut=0\n\
             StreamEncoder=x264\nRecEncoder=x264\nRecQuality=Stream\nRecRB=false\n\n\
             [Video]\nBaseCX={w}\nBaseCY={h}\nOutputCX={w}\nOutputCY={h}\nFPSType=0\nFPSCommon={fps}\n\n\
             [Audio]\nSampleRate=44100\nChannelSetup=Stereo\n",
            retry = cfg.retry_delay_sec,
            rec = rec.display(),
            vkbps = cfg.video_kbps,
            akbps = cfg.audio_kbps,
            keyint = cfg.keyint_sec * cfg.fps,
            w = cfg.width,
            h = cfg.height,
            fps = cfg.fps,
        ),
    )?;
    let service = serde_json::json!({
        "type": "rtmp_custom",
        "settings": {"server": cfg.server, "key": cfg.key, "use_auth": false, "bwtest": false},
    });
    std::fs::write(profile.join("service.json"), serde_json::to_vec_pretty(&service)?)?;
    Ok(())
}

/// The scene collection: the clip on a loop and the control script.
fn write_scene_collection(scenes: &Path, clip: &Path, script: &Path) -> Result<()> {
    // One scene, one media source looping the clip (no devices), and the
    // control script (frontend-tools keeps scripts with the collection).
    let collection = serde_json::json!({
        "name": PROFILE,
        "current_scene": SCENE,
        "current_program_scene": SCENE,
        "scene_order": [{"name": SCENE}],
        "sources": [
            {
                "id": "scene", "versioned_id": "scene", "name": SCENE,
                "settings": {"id_counter": 1, "items": [{
                    "name": "Clip", "id": 1, "visible": true, "locked": false,
                    "pos": {"x": 0.0, "y": 0.0}, "scale": {"x": 1.0, "y": 1.0}, "rot": 0.0,
                    "align": 5, "bounds_type": 0, "bounds": {"x": 0.0, "y": 0.0}, "bounds_align": 0,
                    "crop_left": 0, "crop_top": 0, "crop_right": 0, "crop_bottom": 0
                }]}
            },
            {
                "id": "ffmpeg_source", "versioned_id": "ffmpeg_source", "name": "Clip",
                "settings": {
                    "local_file": clip.display().to_string(), "is_local_file": true, "looping": true,
                    "restart_on_activate": false, "close_when_inactive": false, "hw_decode": false
                }
            }
        ],
        "groups": [],
        "transitions": [],
        "current_transition": "Fade",
        "transition_duration": 300,
        "quick_transitions": [],
        "saved_projectors": [],
        "modules": {"scripts-tool": [{"path": script.display().to_string(), "settings": {}}]},
    });
    std::fs::write(
        scenes.join(format!("{PROFILE}.json")),
        serde_json::to_vec_pretty(&collection)?,
    )?;
    Ok(())
}

/// OBS Studio running headless (xvfb-run), streaming and recording.
pub struct ObsPublisher {
    pub cfg: ObsConfig,
    child: Child,
    /// Kills OBS if we are dropped before it exits (killing xvfb-run's
    /// shell would leave OBS and Xvfb running).
    _guard: KillOnDrop,
    root: tempfile::TempDir,
    started: Instant,
}

struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(obs_child) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// A finished OBS run.
#[derive(Debug)]
pub struct ObsRun {
    /// The local FLV recording (inside the stream's time span).
    pub recording: PathBuf,
    /// OBS's log of the run.
    pub log: PathBuf,
    pub exit: ExitStatus,
    /// OBS did not exit within [`EXIT_TIMEOUT`] of SIGINT (after both
    /// outputs had stopped) and was killed.
    pub hung_on_exit: bool,
    /// What the log says about reconnects.
    pub reconnects: Reconnects,
    /// Keeps the recording and the log until dropped.
    pub dir: tempfile::TempDir,
}

impl ObsRun {
    /// OBS ended with a failure (abort, crash) or hung in its shutdown.
    pub fn crashed(&self) -> bool {
        self.hung_on_exit || !self.exit.success()
    }
}

/// Reconnect events in an OBS log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reconnects {
    /// "Silent reconnect signal received from server": a Go Away acted upon.
    pub go_aways: usize,
    /// Reconnects after an unplanned disconnect ("Reconnecting in ...").
    pub unplanned: usize,
    /// Successful connections to the server (the first included).
    pub connections: usize,
    /// From each Go Away to the next successful connection, by the log's clock.
    pub gaps: Vec<Duration>,
}

/// Reads reconnect events from an OBS log (`HH:MM:SS.mmm: text` lines).
pub fn parse_reconnects(log: &str) -> Reconnects {
    let mut r = Reconnects::default();
    let mut go_away_at: Option<f64> = None;
    for line in log.lines() {
        let at = line.get(..12).and_then(clock_seconds);
        if line.contains("Silent reconnect signal received") {
            r.go_aways += 1;
            go_away_at = at;
        } else if line.contains("Reconnecting in") {
            r.unplanned += 1;
        } else if line.contains("[rtmp stream") && line.contains("successful") {
            r.connections += 1;
            if let (Some(from), Some(to)) = (go_away_at.take(), at) {
                // Past midnight the clock wraps.
                let secs = if to >= from { to - from } else { to + 86_400.0 - from };
                r.gaps.push(Duration::from_secs_f64(secs));
            }
        }
    }
    r
}

fn clock_seconds(s: &str) -> Option<f64> {
    let mut parts = s.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let sec: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + sec)
}

impl ObsPublisher {
    /// Installs what is missing, writes a fresh configuration under a
    /// private HOME and XDG_CONFIG_HOME, launches OBS and waits until it
    /// streams and records.
    pub async fn start(cfg: ObsConfig) -> Result<Self> {
        tokio::task::spawn_blocking(ensure_installed).await??;
        let clip = test_clip(&cfg).await?;
        let root = tempfile::Builder::new().prefix("lossless-ingest-obs-").tempdir()?;
        let control = root.path().join("control");
        let rec = root.path().join("rec");
        let home = root.path().join("home");
        for d in [&control, &rec, &home] {
            std::fs::create_dir_all(d)?;
        }
        let script = control.join("control.lua");
        std::fs::write(&script, control_script(&control))?;
        write_config(root.path(), &cfg, &clip, &script, &rec)?;
        let stdout = std::fs::File::create(root.path().join("obs.out"))?;
        let child = Command::new("nice")
            .args(["-n", "10", "xvfb-run", "-a", "-s", "-screen 0 1280x720x24"])
            .args(["obs", "--profile", PROFILE, "--collection", PROFILE, "--scene", SCENE])
            .args(["--startstreaming", "--minimize-to-tray", "--multi"])
            .args(["--disable-missing-files-check"])
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", root.path().join("config"))
            .stdin(Stdio::null())
            .stdout(stdout.try_clone()?)
            .stderr(stdout)
            .kill_on_drop(true)
            .spawn()
            .context("starting xvfb-run obs")?;
        let mut obs = Self {
            cfg,
            _guard: KillOnDrop(child.id()),
            child,
            root,
            started: Instant::now(),
        };
        if let Err(e) = obs.wait_status("recording", START_TIMEOUT).await {
            let tail = obs.log_tail();
            obs.kill().await;
            return Err(e.context(tail));
        }
        Ok(obs)
    }

    /// Seconds since launch.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn control(&self) -> PathBuf {
        self.root.path().join("control")
    }

    fn statuses(&self) -> Vec<String> {
        std::fs::read_to_string(self.control().join("status"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits for the control script to note `word`; fails early if OBS exits.
    async fn wait_status(&mut self, word: &str, timeout: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            if self.statuses().iter().any(|s| s == word) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("OBS exited ({status}) before '{word}'");
            }
            if t.elapsed() > timeout {
                bail!(
                    "OBS did not reach '{word}' in {timeout:?} (status {:?})",
                    self.statuses()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// OBS's current log file (`obs-studio/logs/` in the private config).
    pub fn log_path(&self) -> Option<PathBuf> {
        let dir = self.root.path().join("config/obs-studio/logs");
        let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        logs.sort();
        logs.pop()
    }

    /// The last lines of OBS's log, for error messages.
    pub fn log_tail(&self) -> String {
        let Some(path) = self.log_path() else {
            let out = std::fs::read_to_string(self.root.path().join("obs.out")).unwrap_or_default();
            return format!("no OBS log; its output:\n{}", tail(&out, 40));
        };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        format!("OBS log {}:\n{}", path.display(), tail(&text, 40))
    }

    /// Reconnects so far, from the log.
    pub fn reconnects(&self) -> Reconnects {
        self.log_path()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| parse_reconnects(&t))
            .unwrap_or_default()
    }

    /// The pid of `obs` itself.
    fn obs_pid(&self) -> Option<u32> {
        obs_child(self.child.id()?)
    }

    /// Stops the recording, then the stream (the control script), then
    /// OBS itself with SIGINT, its clean shutdown (SIGTERM kills OBS 29 at
    /// once). Returns the finished recording and the log.
    pub async fn stop(mut self) -> Result<ObsRun> {
        std::fs::write(self.control().join("stop"), b"")?;
        if let Err(e) = self.wait_status("stopped", STOP_TIMEOUT).await {
            let tail = self.log_tail();
            self.kill().await;
            return Err(e.context(tail));
        }
        let pid = self.obs_pid().context("OBS is no longer running")?;
        signal("-INT", pid).await?;
        // Both outputs have stopped, so the recording is complete even if
        // OBS then hangs in its own shutdown (it does, now and then): kill
        // it and say so, the run can still be audited.
        let (exit, hung_on_exit) = match tokio::time::timeout(EXIT_TIMEOUT, self.child.wait()).await {
            Ok(status) => (status?, false),
            Err(_) => {
                self.kill().await;
                (self.child.wait().await?, true)
            }
        };
        let log = self.log_path().context("OBS wrote no log")?;
        let rec_dir = self.root.path().join("rec");
        let mut recordings: Vec<PathBuf> = std::fs::read_dir(&rec_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "flv"))
            .collect();
        ensure!(
            recordings.len() == 1,
            "want one recording in {}, found {recordings:?}\n{}",
            rec_dir.display(),
            self.log_tail()
        );
        let reconnects = parse_reconnects(&std::fs::read_to_string(&log)?);
        Ok(ObsRun {
            recording: recordings.remove(0),
            log,
            exit,
            hung_on_exit,
            reconnects,
            dir: self.root,
        })
    }

    async fn kill(&mut self) {
        if let Some(pid) = self.obs_pid() {
            let _ = signal("-KILL", pid).await;
        }
        let _ = self.child.kill().await;
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// OBS under xvfb-run's shell `parent` (`nice` execs xvfb-run, so the
/// shell is our child and OBS is its child).
fn obs_child(parent: u32) -> Option<u32> {
    children(parent)
        .into_iter()
        .find(|&pid| comm(pid).as_deref() == Some("obs"))
}

/// Direct children of `pid` (from `/proc/*/stat`).
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    // The command may hold spaces and parentheses: the ppid
                    // is the second field after the last ')'.
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

async fn signal(sig: &str, pid: u32) -> Result<()> {
    let status = Command::new("kill").arg(sig).arg(pid.to_string()).status().await?;
    ensure!(status.success(), "kill {sig} {pid} failed ({status})");
    Ok(())
}

/// One loopback run: what the audit found and how OBS moved.
#[derive(Debug)]
pub struct LoopbackRun {
    pub audit: AuditReport,
    pub reconnects: Reconnects,
    /// Handover stalls at the origin (publish notifications).
    pub stalls: Vec<Duration>,
    /// The drain of the pod OBS was on, from SIGTERM to its end.
    pub drain: Duration,
    /// How it ended: Drained, or TimedOut when a connection stayed open
    /// to the deadline.
    pub drain_phase: Phase,
    /// The exit status of OBS, when it did not exit cleanly.
    pub crash: Option<String>,
    pub log: String,
}

/// Set to keep the origin's and OBS's directories of loopback runs.
pub const KEEP_ENV: &str = "OBS_LOOPBACK_KEEP";

/// Timing of a loopback run.
#[derive(Debug, Clone, Copy)]
pub struct LoopbackTiming {
    /// Streaming before the drain.
    pub before: Duration,
    /// Streaming after the drain finished.
    pub after: Duration,
}

/// Scenario 9 on loopback (no Kubernetes): two in-process ingest pods
/// behind a readiness-aware balancer, an nginx-rtmp origin with publish
/// notifications, OBS publishing through the balancer; the pod OBS is on
/// drains as on SIGTERM (Go Away), OBS reconnects to the other pod; then
/// the origin's recordings are audited against OBS's own recording.
pub async fn loopback_drain(timing: LoopbackTiming) -> Result<LoopbackRun> {
    let dir = tempfile::Builder::new()
        .prefix("lossless-ingest-obs-origin-")
        .tempdir()?;
    let hooks = Hooks::start().await?;
    let origin = Origin::start_with_hooks(dir.path(), "127.0.0.1", Some(&hooks.url()))?;
    let (mut pod_a, mut pod_b, balancer) = loopback_pods(&origin).await?;
    let stream = "obs";
    let obs = ObsPublisher::start(ObsConfig::new(&format!("rtmp://{}/live/{stream}", balancer.addr))?).await?;
    say(&format!(
        "OBS streaming and recording through the balancer {} ({:.1?} after launch)",
        balancer.addr,
        obs.uptime()
    ));
    ensure!(pod_a.publishers() == 1, "OBS is not publishing on pod-a");
    pod_b.registry.set_serving(true);
    tokio::time::sleep(timing.before).await;

    let (phase, drain) = match sigterm_until_drained(&mut pod_a).await {
        Ok(d) => d,
        Err(e) => return Err(give_up(obs, e).await),
    };
    pod_a.wait().await?;
    say(&format!(
        "pod-a {} after {drain:.1?}; pod-b has {} publisher(s)",
        phase.label(),
        pod_b.publishers()
    ));
    tokio::time::sleep(timing.after).await;

    let run = obs.stop().await?;
    stop_when_relayed(&mut pod_b).await?;
    let record_dir = origin.record_dir();
    drop(origin);
    let audit = audit::audit_local_recording(stream, &run.recording, &record_dir)?;
    let log = std::fs::read_to_string(&run.log)?;
    let crash = run.crashed().then(|| run.exit.to_string());
    let reconnects = run.reconnects.clone();
    if std::env::var_os(KEEP_ENV).is_some() {
        say(&format!(
            "kept (${KEEP_ENV}): origin {}, OBS {}",
            dir.keep().display(),
            run.dir.keep().display()
        ));
    }
    Ok(LoopbackRun {
        audit,
        reconnects,
        stalls: rtmp::stalls(&hooks.events(), stream),
        drain,
        drain_phase: phase,
        crash,
        log,
    })
}

/// pod-a and pod-b relaying to `origin`, behind a balancer; pod-b not
/// ready yet, so OBS lands on pod-a (pod-b becomes ready once it does).
async fn loopback_pods(origin: &Origin) -> Result<(LocalPod, LocalPod, Balancer)> {
    let flags = [
        "--propagation-delay",
        "1s",
        "--grace-period",
        "30s",
        "--drain-deadline",
        "20s",
    ];
    let pod_a = LocalPod::start_relaying_to("pod-a", origin, &flags).await?;
    let pod_b = LocalPod::start_relaying_to("pod-b", origin, &flags).await?;
    pod_b.registry.set_serving(false);
    let balancer = Balancer::start(vec![pod_a.backend(), pod_b.backend()]).await?;
    Ok((pod_a, pod_b, balancer))
}

/// SIGTERM to pod-a, then its drain's end: the phase and how long it took.
async fn sigterm_until_drained(pod_a: &mut LocalPod) -> Result<(Phase, Duration)> {
    say("SIGTERM to pod-a: it leaves the balancer, waits 1 s, sends Go Away");
    let t = Instant::now();
    pod_a.sigterm();
    eventually("pod-a drained", Duration::from_secs(60), || async {
        let status = pod_a.drainer.status();
        match status.as_ref().map(|d| d.phase) {
            Some(phase @ (Phase::Drained | Phase::TimedOut)) => Ok((phase, t.elapsed())),
            _ => bail!("pod-a: {status:?}"),
        }
    })
    .await
}

/// Stops pod-b once its relay has ended the upstream publish (after OBS's
/// stream stopped).
async fn stop_when_relayed(pod_b: &mut LocalPod) -> Result<()> {
    eventually("pod-b relays done", Duration::from_secs(20), || async {
        ensure!(pod_b.registry.relays_active() == 0, "relays still active");
        Ok(())
    })
    .await?;
    pod_b.sigterm();
    let _ = pod_b.wait().await;
    Ok(())
}

/// Stops OBS after a failed step; the error, with the end of OBS's log.
async fn give_up(obs: ObsPublisher, err: anyhow::Error) -> anyhow::Error {
    let tail = obs.log_tail();
    let _ = obs.stop().await;
    err.context(tail)
}

/// Scenario 9 on the cluster: OBS publishes through the ingest Service,
/// the node of the pod it lands on is drained with `kubectl drain`, OBS
/// follows the Go Away to another pod, and the origin's recordings hold
/// every packet of OBS's local recording exactly once, in order.
pub async fn obs_node_drain(c: Arc<Cluster>) -> Result<()> {
    let stage = Stage::install(&c, OBS_NODE_DRAIN_NS, &[]).await?;
    let stream = "obs";
    let obs = ObsPublisher::start(ObsConfig::new(&stage.url(stream))?).await?;
    say(&format!(
        "OBS {} streaming and recording ({:.1?} after launch)",
        stage.url(stream),
        obs.uptime()
    ));
    let found = eventually("OBS on an ingest pod", Duration::from_secs(30), || async {
        ingest_pods(&c, &stage.ns)
            .await?
            .into_iter()
            .find(|p| p.streams.iter().any(|s| s == stream))
            .context("OBS is on no ingest pod yet")
    })
    .await;
    let pod = match found {
        Ok(p) => p,
        Err(e) => return Err(give_up(obs, e).await),
    };
    say(&format!("OBS is on {} ({})", pod.name, pod.node));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let drained = kubectl_drain(&c, &pod.node, Duration::from_secs(300)).await;
    let uncordon = c.kubectl(&["uncordon", &pod.node]).await;
    let node_drain = match drained {
        Ok(d) => d,
        Err(e) => return Err(give_up(obs, e).await),
    };
    uncordon?;
    say(&format!(
        "kubectl drain {} succeeded in {:.1?}",
        pod.node, node_drain.took
    ));
    let now_on = ingest_pods(&c, &stage.ns)
        .await?
        .into_iter()
        .find(|p| p.streams.iter().any(|s| s == stream));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let run = obs.stop().await?;
    let record_dir = stage.origin.record_dir();
    let audit = eventually("a lossless audit at the origin", Duration::from_secs(30), || async {
        let a = audit::audit_local_recording(stream, &run.recording, &record_dir)?;
        ensure!(a.lossless(), "{a}");
        Ok(a)
    })
    .await
    .with_context(|| format!("OBS log {}", run.log.display()))?;
    let stalls = rtmp::stalls(&stage.origin.notifications(), stream);
    say(&format!(
        "{audit}; OBS moved {} -> {}; Go Away {} reconnect gap {:?}; stall at origin {:?}; exit {}",
        pod.name,
        now_on.map_or("?".into(), |p| p.name),
        run.reconnects.go_aways,
        run.reconnects.gaps,
        stalls,
        run.exit
    ));
    ensure!(
        run.reconnects.go_aways >= 1,
        "OBS never acted on a Go Away (see {})",
        run.log.display()
    );
    ensure!(
        !run.crashed(),
        "OBS {} (see {}); the run was lossless all the same",
        if run.hung_on_exit {
            format!("hung in its shutdown after both outputs stopped, killed: {}", run.exit)
        } else {
            format!("exited with {}", run.exit)
        },
        run.log.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_the_publish_url() -> Result<()> {
        let c = ObsConfig::new("rtmp://10.0.0.1:1935/live/obs")?;
        assert_eq!(
            (c.server.as_str(), c.key.as_str()),
            ("rtmp://10.0.0.1:1935/live", "obs")
        );
        assert!(ObsConfig::new("rtmp://host/").is_err());
        assert!(ObsConfig::new("http://host/live/x").is_err());
        Ok(())
    }

    #[test]
    fn reads_reconnects_from_the_log() {
        let log = "\
05:37:16.883: [rtmp stream: 'simple_stream'] Connection to rtmp://a/live successful
05:37:20.100: [rtmp stream: 'simple_stream'] Silent reconnect signal received from server
05:37:20.350: [rtmp stream: 'simple_stream'] Connection to rtmp://a/live successful
05:37:30.000: Output 'simple_stream': Reconnecting in 1.00 seconds..
";
        let r = parse_reconnects(log);
        assert_eq!((r.go_aways, r.unplanned, r.connections), (1, 1, 2));
        assert_eq!(r.gaps, vec![Duration::from_millis(250)]);
    }

    #[test]
    fn the_control_script_names_its_directory() {
        let s = control_script(Path::new("/tmp/a \"b\""));
        assert!(s.contains(r#"local dir = "/tmp/a \"b\"""#));
        assert!(s.contains("obs.timer_add(tick, 100)"));
    }
}
