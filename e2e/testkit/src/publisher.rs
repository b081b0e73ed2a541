//! A capable test publisher: the client side of RTMP Go Away and Enhanced
//! RTMP Reconnect Request, with synthetic media whose every audio/video
//! payload is unique, so [`crate::audit`] can account for each one.
//!
//! It behaves like OBS 28+ after a signal: keep sending until the next
//! keyframe is due, move without FCUnpublish/deleteStream, restart RTMP
//! timestamps at 0 on the new connection and re-send metadata and sequence
//! headers first. Frames that fall due while no connection can take them
//! wait in memory, like an encoder's output buffer; none is skipped.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use ingest_pod::registry::SignalKind;
use ingest_pod::rtmp::client::{self, status_text};
use ingest_pod::rtmp::conn::{self, Reader, Writer};
use ingest_rtmp::amf0::{self, Value};
use ingest_rtmp::media::{self, Kind};
use ingest_rtmp::message::{Message, UserControl};
use ingest_rtmp::url::{self, RtmpUrl};

/// AAC frames carry 1024 samples at this rate.
pub const AUDIO_SAMPLE_RATE: u64 = 44_100;
const AUDIO_SAMPLES_PER_FRAME: u64 = 1024;
/// Bytes of one audio payload (about 128 kbit/s of AAC).
pub const AUDIO_FRAME_BYTES: usize = 371;
/// AAC LC, 44.1 kHz, stereo.
pub const AAC_SEQUENCE_HEADER: [u8; 4] = [0xaf, 0x00, 0x12, 0x10];
/// A keyframe is this many times larger than an inter frame.
const KEYFRAME_WEIGHT: u64 = 4;
/// Smallest video payload: headers, stream id and sequence number fit.
const MIN_VIDEO_FRAME_BYTES: usize = 64;
/// NAL header bytes of an IDR slice and of a non-IDR reference slice.
const NAL_IDR: u8 = 0x65;
const NAL_SLICE: u8 = 0x41;
/// Onstatus code of the Enhanced RTMP v2 Reconnect Request.
pub const RECONNECT_REQUEST_CODE: &str = "NetConnection.Connect.ReconnectRequest";
/// How long a closed connection may take to see the server's EOF before
/// its reader is dropped.
const CLOSE_DRAIN: Duration = Duration::from_secs(5);
/// Retry delays while (re)connecting; "busy" is the server still holding
/// the stream of the connection just left.
const RETRY_BUSY: Duration = Duration::from_millis(50);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum Error {
    #[error("bad URL: {0}")]
    Url(#[from] url::Error),
    #[error(transparent)]
    Conn(#[from] conn::Error),
    #[error("server refused: {0}")]
    Refused(String),
    #[error("server is busy with this stream: {0}")]
    Busy(String),
    #[error("server closed the connection")]
    Closed,
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("publisher log: {0}")]
    Log(#[source] std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<client::Error> for Error {
    fn from(e: client::Error) -> Self {
        match e {
            client::Error::Conn(e) => Error::Conn(e),
            client::Error::Refused(why) => Error::Refused(why),
            client::Error::Busy(why) => Error::Busy(why),
            client::Error::Closed => Error::Closed,
            client::Error::Timeout(what) => Error::Timeout(what),
        }
    }
}

/// What to publish, where, and which extensions to announce.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// `rtmp://host:port/app/stream`.
    pub url: String,
    /// Announce `supportsGoAway` and act on Go Away.
    pub go_away: bool,
    /// Announce `capsEx` with the Reconnect bit and act on Reconnect Request.
    pub reconnect: bool,
    pub fps: u32,
    /// Frames per GOP: a keyframe every `gop` video frames.
    pub gop: u32,
    /// Sets the size of the video payloads.
    pub video_bitrate_bps: u64,
    pub audio: bool,
    pub width: u32,
    pub height: u32,
    /// Stop after this much media time (with `frames`, whichever is first).
    pub duration: Option<Duration>,
    /// Stop after this many video frames.
    pub frames: Option<u64>,
    /// JSON lines file: every frame sent and every event.
    pub log: Option<PathBuf>,
    /// Timeout of each step of connecting, publishing and writing.
    pub step_timeout: Duration,
    /// How long to keep trying to (re)connect before giving up.
    pub connect_timeout: Duration,
}

impl PublisherConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            go_away: true,
            reconnect: true,
            fps: 30,
            gop: 30,
            video_bitrate_bps: 2_500_000,
            audio: true,
            width: 1280,
            height: 720,
            duration: None,
            frames: None,
            log: None,
            step_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// One synthetic audio or video frame on the publisher's timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Position in the stream, audio and video together, from 0.
    pub seq: u64,
    pub kind: Kind,
    pub keyframe: bool,
    /// Milliseconds on the publisher's timeline (continuous across reconnects).
    pub pts: u64,
    pub payload: Bytes,
}

/// Deterministic synthetic media: an AVC-like video track and an AAC-like
/// audio track, interleaved by timestamp.
#[derive(Debug, Clone)]
pub struct MediaGenerator {
    stream_id: [u8; 8],
    fps: u64,
    gop: u64,
    key_bytes: usize,
    inter_bytes: usize,
    audio: bool,
    seq: u64,
    video_index: u64,
    audio_index: u64,
    max_video: Option<u64>,
    end_pts: Option<u64>,
    width: u32,
    height: u32,
    video_bitrate_bps: u64,
}

impl MediaGenerator {
    pub fn new(stream: &str, cfg: &PublisherConfig) -> Self {
        let digest = Sha256::digest(stream.as_bytes());
        let mut stream_id = [0u8; 8];
        stream_id.copy_from_slice(&digest[..8]);
        let fps = u64::from(cfg.fps.max(1));
        let gop = u64::from(cfg.gop.max(1));
        // Sizes keep the average at the bitrate: one keyframe of weight K and gop-1 inter frames.
        let per_frame = cfg.video_bitrate_bps / 8 / fps;
        let inter = (per_frame * gop / (gop - 1 + KEYFRAME_WEIGHT)) as usize;
        let inter_bytes = inter.max(MIN_VIDEO_FRAME_BYTES);
        Self {
            stream_id,
            fps,
            gop,
            key_bytes: (inter_bytes as u64 * KEYFRAME_WEIGHT) as usize,
            inter_bytes,
            audio: cfg.audio,
            seq: 0,
            video_index: 0,
            audio_index: 0,
            max_video: cfg.frames,
            end_pts: cfg.duration.map(|d| d.as_millis() as u64),
            width: cfg.width,
            height: cfg.height,
            video_bitrate_bps: cfg.video_bitrate_bps,
        }
    }

    fn video_pts(&self) -> u64 {
        self.video_index * 1000 / self.fps
    }

    fn audio_pts(&self) -> u64 {
        self.audio_index * AUDIO_SAMPLES_PER_FRAME * 1000 / AUDIO_SAMPLE_RATE
    }

    fn video_left(&self) -> bool {
        self.max_video.is_none_or(|m| self.video_index < m) && self.end_pts.is_none_or(|e| self.video_pts() < e)
    }

    fn audio_left(&self) -> bool {
        // Audio ends with the video when the length is given in frames.
        let video_end = self.max_video.map(|m| m * 1000 / self.fps);
        self.audio
            && self.end_pts.is_none_or(|e| self.audio_pts() < e)
            && video_end.is_none_or(|e| self.audio_pts() < e)
    }

    /// Which track comes next (video first on a tie), if any.
    fn next_kind(&self) -> Option<Kind> {
        match (self.video_left(), self.audio_left()) {
            (true, true) if self.audio_pts() < self.video_pts() => Some(Kind::Audio),
            (true, _) => Some(Kind::Video),
            (false, true) => Some(Kind::Audio),
            (false, false) => None,
        }
    }

    /// Timestamp of the next frame; `None` when the stream is over.
    pub fn peek_pts(&self) -> Option<u64> {
        self.next_kind().map(|k| {
            if k == Kind::Video {
                self.video_pts()
            } else {
                self.audio_pts()
            }
        })
    }

    /// Ends the stream after the frames already produced.
    pub fn stop(&mut self) {
        self.max_video = Some(self.video_index);
        self.audio = false;
    }

    /// The frames produced so far.
    pub fn produced(&self) -> u64 {
        self.seq
    }

    /// Produces a frame with a payload no other frame of any stream has:
    /// the stream id and sequence number lead the codec data.
    fn produce(&mut self) -> Option<Sample> {
        let kind = self.next_kind()?;
        let seq = self.seq;
        self.seq += 1;
        let mut rng = Rng::new(u64::from_be_bytes(self.stream_id) ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let sample = match kind {
            Kind::Video => {
                let keyframe = self.video_index.is_multiple_of(self.gop);
                let pts = self.video_pts();
                self.video_index += 1;
                let size = if keyframe { self.key_bytes } else { self.inter_bytes };
                let mut p = BytesMut::with_capacity(size);
                // FLV VideoTagHeader: frame type + AVC, NALU packet, composition time 0.
                p.put_slice(&[if keyframe { 0x17 } else { 0x27 }, 0x01, 0, 0, 0]);
                p.put_u32((size - 9) as u32);
                p.put_u8(if keyframe { NAL_IDR } else { NAL_SLICE });
                p.put_slice(&self.stream_id);
                p.put_u64(seq);
                rng.fill(&mut p, size);
                Sample {
                    seq,
                    kind,
                    keyframe,
                    pts,
                    payload: p.freeze(),
                }
            }
            Kind::Audio => {
                let pts = self.audio_pts();
                self.audio_index += 1;
                let mut p = BytesMut::with_capacity(AUDIO_FRAME_BYTES);
                p.put_slice(&[0xaf, 0x01]);
                p.put_slice(&self.stream_id);
                p.put_u64(seq);
                rng.fill(&mut p, AUDIO_FRAME_BYTES);
                Sample {
                    seq,
                    kind,
                    keyframe: false,
                    pts,
                    payload: p.freeze(),
                }
            }
        };
        Some(sample)
    }

    /// The AVC sequence header: an AVCDecoderConfigurationRecord with a
    /// constrained-baseline SPS for the configured size and a PPS.
    pub fn video_sequence_header(&self) -> Bytes {
        let (sps, pps) = (sps(self.width, self.height), pps());
        let mut p = BytesMut::new();
        p.put_slice(&[0x17, 0x00, 0, 0, 0]);
        // version 1, profile, compatibility, level, 4-byte NALU lengths, one SPS.
        p.put_slice(&[1, sps[1], sps[2], sps[3], 0xff, 0xe1]);
        p.put_u16(sps.len() as u16);
        p.put_slice(&sps);
        p.put_u8(1);
        p.put_u16(pps.len() as u16);
        p.put_slice(&pps);
        p.freeze()
    }

    pub fn audio_sequence_header(&self) -> Option<Bytes> {
        self.audio.then(|| Bytes::from_static(&AAC_SEQUENCE_HEADER))
    }

    /// `@setDataFrame` `onMetaData` as OBS sends it.
    pub fn metadata(&self) -> Bytes {
        let mut props = vec![
            ("duration", Value::Number(0.0)),
            ("width", Value::Number(f64::from(self.width))),
            ("height", Value::Number(f64::from(self.height))),
            ("videodatarate", Value::Number(self.video_bitrate_bps as f64 / 1000.0)),
            ("framerate", Value::Number(self.fps as f64)),
            ("videocodecid", Value::Number(7.0)),
        ];
        if self.audio {
            props.extend([
                ("audiodatarate", Value::Number(128.0)),
                ("audiosamplerate", Value::Number(AUDIO_SAMPLE_RATE as f64)),
                ("audiosamplesize", Value::Number(16.0)),
                ("audiochannels", Value::Number(2.0)),
                ("stereo", Value::Boolean(true)),
                ("audiocodecid", Value::Number(10.0)),
            ]);
        }
        props.push(("encoder", Value::string("lossless-ingest publisher")));
        let array = Value::EcmaArray(props.into_iter().map(|(k, v)| (k.to_owned(), v)).collect());
        amf0::encode_all(&[Value::string("@setDataFrame"), Value::string("onMetaData"), array]).freeze()
    }
}

impl Iterator for MediaGenerator {
    type Item = Sample;

    fn next(&mut self) -> Option<Sample> {
        self.produce()
    }
}

/// xorshift64*: cheap filler bytes, the same for the same seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, out: &mut BytesMut, len: usize) {
        while out.len() < len {
            let word = self.next_u64().to_be_bytes();
            let n = (len - out.len()).min(8);
            out.put_slice(&word[..n]);
        }
    }
}

/// Bit writer for the exp-Golomb fields of SPS and PPS.
#[derive(Default)]
struct Bits {
    out: Vec<u8>,
    acc: u8,
    n: u8,
}

impl Bits {
    fn bit(&mut self, b: bool) {
        self.acc = (self.acc << 1) | u8::from(b);
        self.n += 1;
        if self.n == 8 {
            self.out.push(self.acc);
            (self.acc, self.n) = (0, 0);
        }
    }

    fn bits(&mut self, v: u32, count: u8) {
        for i in (0..count).rev() {
            self.bit((v >> i) & 1 == 1);
        }
    }

    fn ue(&mut self, v: u32) {
        let x = v + 1;
        let len = 32 - x.leading_zeros() as u8;
        self.bits(0, len - 1);
        self.bits(x, len);
    }

    fn se(&mut self, v: i32) {
        self.ue(if v > 0 { (2 * v - 1) as u32 } else { (-2 * v) as u32 });
    }

    /// rbsp_trailing_bits, then emulation prevention.
    fn finish(mut self, header: u8) -> Vec<u8> {
        self.bit(true);
        while self.n != 0 {
            self.bit(false);
        }
        let mut nal = vec![header];
        let mut zeros = 0;
        for b in self.out {
            if zeros >= 2 && b <= 3 {
                nal.push(3);
                zeros = 0;
            }
            zeros = if b == 0 { zeros + 1 } else { 0 };
            nal.push(b);
        }
        nal
    }
}

/// Constrained Baseline, level 3.1, one reference frame, cropped to size.
fn sps(width: u32, height: u32) -> Vec<u8> {
    let (mbs_w, mbs_h) = (width.div_ceil(16).max(1), height.div_ceil(16).max(1));
    let mut b = Bits::default();
    b.bits(66, 8); // profile_idc
    b.bits(0xc0, 8); // constraint_set0/1
    b.bits(31, 8); // level_idc
    b.ue(0); // seq_parameter_set_id
    b.ue(0); // log2_max_frame_num_minus4
    b.ue(2); // pic_order_cnt_type
    b.ue(1); // max_num_ref_frames
    b.bit(false); // gaps_in_frame_num_value_allowed_flag
    b.ue(mbs_w - 1);
    b.ue(mbs_h - 1);
    b.bit(true); // frame_mbs_only_flag
    b.bit(true); // direct_8x8_inference_flag
    let (crop_right, crop_bottom) = ((mbs_w * 16 - width.max(1)) / 2, (mbs_h * 16 - height.max(1)) / 2);
    b.bit(crop_right + crop_bottom > 0);
    if crop_right + crop_bottom > 0 {
        b.ue(0);
        b.ue(crop_right);
        b.ue(0);
        b.ue(crop_bottom);
    }
    b.bit(false); // vui_parameters_present_flag
    b.finish(0x67)
}

fn pps() -> Vec<u8> {
    let mut b = Bits::default();
    b.ue(0); // pic_parameter_set_id
    b.ue(0); // seq_parameter_set_id
    b.bit(false); // entropy_coding_mode_flag (CAVLC)
    b.bit(false); // bottom_field_pic_order_in_frame_present_flag
    b.ue(0); // num_slice_groups_minus1
    b.ue(0); // num_ref_idx_l0_default_active_minus1
    b.ue(0); // num_ref_idx_l1_default_active_minus1
    b.bit(false); // weighted_pred_flag
    b.bits(0, 2); // weighted_bipred_idc
    b.se(0); // pic_init_qp_minus26
    b.se(0); // pic_init_qs_minus26
    b.se(0); // chroma_qp_index_offset
    b.bit(true); // deblocking_filter_control_present_flag
    b.bit(false); // constrained_intra_pred_flag
    b.bit(false); // redundant_pic_cnt_present_flag
    b.finish(0x68)
}

/// One audio or video message the publisher wrote successfully.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentFrame {
    pub seq: u64,
    pub kind: Kind,
    #[serde(default)]
    pub keyframe: bool,
    /// Publisher timeline, milliseconds.
    pub pts: u64,
    /// Index of the connection (0 for the first).
    pub conn: u32,
    /// RTMP timestamp on that connection (restarts at 0 on each).
    pub conn_ts: u32,
    pub size: usize,
    /// [`media::payload_hash`] of the payload.
    pub hash: String,
    /// Wall clock when the write completed, Unix milliseconds.
    #[serde(default)]
    pub sent_at_ms: u64,
    /// The same instant in Unix microseconds (latency measurements).
    #[serde(default)]
    pub sent_at_us: u64,
}

/// A line of the publisher's JSON lines log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LogLine {
    Frame {
        stream: String,
        #[serde(flatten)]
        frame: SentFrame,
    },
    Event {
        stream: String,
        t_ms: u64,
        event: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conn: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
}

/// What a publisher did, for assertions and the audit.
#[derive(Debug, Clone, Default)]
pub struct PublisherReport {
    pub stream: String,
    /// Every audio/video message written, in order.
    pub sent: Vec<SentFrame>,
    /// Connections that reached "publishing".
    pub connections: u32,
    /// Signals received, with the Reconnect Request's tcUrl as sent.
    pub signals: Vec<(SignalKind, Option<String>)>,
    /// Reconnects after a connection broke without a signal.
    pub unplanned_reconnects: u32,
    /// Frames produced but never written (stopped while disconnected).
    pub abandoned: u64,
    /// Why the publisher stopped early, if it did.
    pub error: Option<String>,
}

impl PublisherReport {
    /// The longest wall-clock gap between consecutive frames that went out on
    /// different connections: the publisher's side of a handover stall.
    pub fn max_switch_gap(&self) -> Option<Duration> {
        self.sent
            .windows(2)
            .filter(|w| w[0].conn != w[1].conn)
            .map(|w| Duration::from_millis(w[1].sent_at_ms.saturating_sub(w[0].sent_at_ms)))
            .max()
    }
}

/// Live counters, for tests that wait for "N frames sent".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub frames: u64,
    pub video_frames: u64,
    pub connections: u32,
    pub signals: u32,
    pub unplanned_reconnects: u32,
    pub done: bool,
}

/// One publisher; [`Publisher::run`] streams until the end or cancellation.
pub struct Publisher {
    cfg: Arc<PublisherConfig>,
    url: RtmpUrl,
    progress: watch::Sender<Progress>,
}

impl Publisher {
    pub fn new(cfg: PublisherConfig) -> Result<Self> {
        let url = RtmpUrl::parse(&cfg.url)?;
        if cfg.fps == 0 || cfg.fps > 1000 || cfg.gop == 0 {
            return Err(Error::Config("fps must be 1..=1000 and gop at least 1"));
        }
        Ok(Self {
            cfg: Arc::new(cfg),
            url,
            progress: watch::Sender::new(Progress::default()),
        })
    }

    pub fn stream(&self) -> &str {
        &self.url.stream
    }

    /// Live progress; `wait_for(|p| p.frames >= n)` waits for n frames sent.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Publishes until the configured length is sent or `shutdown` fires,
    /// then tears the stream down. Fails only if the first connection
    /// cannot be made; later failures end the run with `report.error`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<PublisherReport> {
        let span = info_span!("publisher", stream = %self.url.stream);
        async move {
            let mut state = State::new(self.cfg.clone(), self.url.clone(), self.progress.clone())?;
            let first = tokio::select! {
                r = connect_retrying(self.url.clone(), self.cfg.clone(), Duration::ZERO) => r?,
                () = shutdown.cancelled() => return Err(Error::Cancelled),
            };
            state.install(first, self.url.clone(), None)?;
            let outcome = state.run_loop(&shutdown).await;
            let finished = state.finish().await;
            let error = outcome.and(finished).err();
            if let Some(err) = &error {
                warn!(%err, "publisher stopped");
                let _ = state.event("error", None, Some(err.to_string()));
            }
            state.log_flush();
            state.progress.send_modify(|p| p.done = true);
            Ok(PublisherReport {
                stream: self.url.stream.clone(),
                sent: state.sent,
                connections: state.connections,
                signals: state.signals,
                unplanned_reconnects: state.unplanned,
                abandoned: state.queue.len() as u64,
                error: error.map(|e| e.to_string()),
            })
        }
        .instrument(span)
        .await
    }
}

/// Publishes with `cfg` until the end or `shutdown`.
pub async fn publish(cfg: PublisherConfig, shutdown: CancellationToken) -> Result<PublisherReport> {
    Publisher::new(cfg)?.run(shutdown).await
}

/// Runs many publishers at once, starting them `stagger` apart.
pub async fn run_many(
    configs: Vec<PublisherConfig>,
    stagger: Duration,
    shutdown: CancellationToken,
) -> Vec<(String, Result<PublisherReport>)> {
    let mut tasks = Vec::with_capacity(configs.len());
    for (i, cfg) in configs.into_iter().enumerate() {
        let name = RtmpUrl::parse(&cfg.url)
            .map(|u| u.stream)
            .unwrap_or_else(|_| cfg.url.clone());
        let shutdown = shutdown.clone();
        let delay = stagger * i as u32;
        tasks.push((
            name,
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                publish(cfg, shutdown).await
            }),
        ));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for (name, task) in tasks {
        let result = task
            .await
            .unwrap_or_else(|e| Err(Error::Refused(format!("publisher task failed: {e}"))));
        out.push((name, result));
    }
    out
}

/// A table of publisher outcomes, one line per stream.
pub fn summary_table(results: &[(String, Result<PublisherReport>)]) -> String {
    let mut s = format!(
        "{:<24} {:>8} {:>6} {:>8} {:>9} {:>9}  {}\n",
        "stream", "frames", "conns", "signals", "unplanned", "abandoned", "error"
    );
    for (name, r) in results {
        match r {
            Ok(r) => s.push_str(&format!(
                "{:<24} {:>8} {:>6} {:>8} {:>9} {:>9}  {}\n",
                name,
                r.sent.len(),
                r.connections,
                r.signals.len(),
                r.unplanned_reconnects,
                r.abandoned,
                r.error.as_deref().unwrap_or("-")
            )),
            Err(e) => s.push_str(&format!(
                "{name:<24} {:>8} {:>6} {:>8} {:>9} {:>9}  {e}\n",
                "-", "-", "-", "-", "-"
            )),
        }
    }
    s
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Unix microseconds: what [`SentFrame::sent_at_us`] holds.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A connection that reached "publishing", before its reader is spawned.
pub struct Link {
    reader: Reader,
    writer: Writer,
    stream_id: u32,
}

/// What the reading task of a connection reports.
#[derive(Debug)]
enum Event {
    /// A message to send back (ping response, acknowledgement).
    Reply(Message),
    Signal(SignalKind, Option<String>),
    Status(String),
    Closed(String),
}

/// Connects and publishes, announcing the configured capabilities.
pub async fn open(url: &RtmpUrl, cfg: &PublisherConfig) -> Result<Link> {
    let mut extra = Vec::new();
    if cfg.go_away {
        extra.push(("supportsGoAway".to_owned(), Value::Boolean(true)));
    }
    if cfg.reconnect {
        extra.push(("capsEx".to_owned(), Value::Number(1.0)));
    }
    let p = client::publish(
        url,
        "FMLE/3.0 (compatible; lossless-ingest-publisher)",
        extra,
        cfg.step_timeout,
    )
    .await?;
    Ok(Link {
        reader: p.reader,
        writer: p.writer,
        stream_id: p.stream_id,
    })
}

/// [`open`] with retries for `cfg.connect_timeout`, after `delay`.
async fn connect_retrying(url: RtmpUrl, cfg: Arc<PublisherConfig>, delay: Duration) -> Result<Link> {
    tokio::time::sleep(delay).await;
    let deadline = Instant::now() + cfg.connect_timeout;
    let mut backoff = RETRY_MIN;
    loop {
        match open(&url, &cfg).await {
            Ok(link) => return Ok(link),
            Err(err) if Instant::now() >= deadline => return Err(err),
            Err(Error::Busy(why)) => {
                debug!(target = %url.addr(), %why, "stream still busy on the server, retrying");
                tokio::time::sleep(RETRY_BUSY).await;
            }
            Err(err) => {
                warn!(target = %url.addr(), %err, retry_in = ?backoff, "connect failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Reads the connection until the server closes it, so acknowledgements,
/// pings and signals are seen while the main task writes.
async fn read_loop(mut reader: Reader, events: mpsc::UnboundedSender<Event>) {
    loop {
        let event = match reader.next().await {
            Ok(Some(Message::UserControl(UserControl::PingRequest(t)))) => {
                Some(Event::Reply(Message::UserControl(UserControl::PingResponse(t))))
            }
            Ok(Some(Message::GoAway(_))) => Some(Event::Signal(SignalKind::GoAway, None)),
            Ok(Some(Message::Command { command, .. })) if command.name == "onStatus" => {
                let (code, desc) = status_text(&command);
                if code == RECONNECT_REQUEST_CODE {
                    let info = command.args.iter().find(|v| v.get("code").is_some());
                    let tc_url = info
                        .and_then(|i| i.get("tcUrl"))
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    Some(Event::Signal(SignalKind::ReconnectRequest, tc_url))
                } else {
                    Some(Event::Status(format!("{code} {desc}")))
                }
            }
            Ok(Some(_)) => None,
            Ok(None) => {
                let _ = events.send(Event::Closed("server closed the connection".into()));
                return;
            }
            Err(err) => {
                let _ = events.send(Event::Closed(err.to_string()));
                return;
            }
        };
        // After a switch nobody listens; keep draining to the server's EOF.
        if let Some(e) = event {
            let _ = events.send(e);
        }
        if let Some(ack) = reader.ack_due() {
            let _ = events.send(Event::Reply(ack));
        }
    }
}

/// The connection frames currently go to.
struct Conn {
    index: u32,
    url: RtmpUrl,
    writer: Writer,
    stream_id: u32,
    events: mpsc::UnboundedReceiver<Event>,
    reader: JoinHandle<()>,
    /// Publisher pts of the first frame on this connection: its RTMP time 0.
    base_pts: Option<u64>,
}

impl Conn {
    /// Closes without FCUnpublish/deleteStream, so the server keeps the
    /// logical stream for the reconnect; the reader drains to EOF so the
    /// close is a FIN, not a reset that could discard unread media.
    async fn close_quietly(mut self, step: Duration) {
        let _ = tokio::time::timeout(step, self.writer.shutdown()).await;
        let Conn { reader, index, .. } = self;
        tokio::spawn(async move {
            let abort = reader.abort_handle();
            if tokio::time::timeout(CLOSE_DRAIN, reader).await.is_err() {
                debug!(conn = index, "server kept the old connection open; dropping it");
                abort.abort();
            }
        });
    }
}

/// Where the next connection stands.
enum Switch {
    Idle,
    /// Go Away seen: at the next keyframe, close and connect again.
    AtKeyframe,
    /// A new connection is being made in the background.
    Connecting {
        task: JoinHandle<Result<Link>>,
        url: RtmpUrl,
        why: Option<SignalKind>,
    },
    /// Reconnect Request: the new connection publishes; move at the next keyframe.
    Ready {
        link: Box<Link>,
        url: RtmpUrl,
    },
}

/// What a new connection receives before its first frame.
struct MediaConfig {
    metadata: Bytes,
    video: Bytes,
    audio: Option<Bytes>,
}

struct State {
    cfg: Arc<PublisherConfig>,
    stream: String,
    media: MediaGenerator,
    config: MediaConfig,
    /// Frames due and not yet written: the encoder's buffer.
    queue: VecDeque<Sample>,
    conn: Option<Conn>,
    switch: Switch,
    connections: u32,
    unplanned: u32,
    sent: Vec<SentFrame>,
    signals: Vec<(SignalKind, Option<String>)>,
    log: Option<BufWriter<File>>,
    progress: watch::Sender<Progress>,
}

async fn next_event(conn: &mut Option<Conn>) -> Event {
    match conn {
        Some(c) => c
            .events
            .recv()
            .await
            .unwrap_or_else(|| Event::Closed("reader ended".into())),
        None => std::future::pending().await,
    }
}

async fn connected(switch: &mut Switch) -> Result<Link> {
    match switch {
        Switch::Connecting { task, .. } => task
            .await
            .unwrap_or_else(|e| Err(Error::Refused(format!("connect task failed: {e}")))),
        _ => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl State {
    fn new(cfg: Arc<PublisherConfig>, url: RtmpUrl, progress: watch::Sender<Progress>) -> Result<Self> {
        let media = MediaGenerator::new(&url.stream, &cfg);
        let log = match &cfg.log {
            Some(path) => Some(BufWriter::new(File::create(path).map_err(Error::Log)?)),
            None => None,
        };
        Ok(Self {
            config: MediaConfig {
                metadata: media.metadata(),
                video: media.video_sequence_header(),
                audio: media.audio_sequence_header(),
            },
            media,
            cfg,
            stream: url.stream,
            queue: VecDeque::new(),
            conn: None,
            switch: Switch::Idle,
            connections: 0,
            unplanned: 0,
            sent: Vec::new(),
            signals: Vec::new(),
            log,
            progress,
        })
    }

    fn write_log(&mut self, line: &LogLine) -> Result<()> {
        if let Some(log) = &mut self.log {
            serde_json::to_writer(&mut *log, line).map_err(|e| Error::Log(e.into()))?;
            log.write_all(b"\n").map_err(Error::Log)?;
        }
        Ok(())
    }

    fn log_flush(&mut self) {
        if let Some(log) = &mut self.log
            && let Err(err) = log.flush()
        {
            warn!(%err, "cannot flush the publisher log");
        }
    }

    fn event(&mut self, event: &str, conn: Option<u32>, detail: Option<String>) -> Result<()> {
        let line = LogLine::Event {
            stream: self.stream.clone(),
            t_ms: unix_ms(),
            event: event.to_owned(),
            conn,
            detail,
        };
        self.write_log(&line)?;
        // Events are rare and mark what a reader of a cut log most needs.
        self.log_flush();
        Ok(())
    }

    /// Makes `link` the current connection; the previous one, if any, was
    /// already taken away by the caller.
    fn install(&mut self, link: Link, url: RtmpUrl, why: Option<&str>) -> Result<()> {
        let index = self.connections;
        self.connections += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(link.reader, tx).instrument(info_span!("conn", index)));
        info!(conn = index, target = %url.addr(), why = why.unwrap_or("start"), "publishing");
        let detail = format!("{} {}", url.tc_url(), why.unwrap_or("start"));
        self.conn = Some(Conn {
            index,
            url,
            writer: link.writer,
            stream_id: link.stream_id,
            events: rx,
            reader,
            base_pts: None,
        });
        self.progress.send_modify(|p| p.connections = self.connections);
        self.event("connected", Some(index), Some(detail))
    }

    fn start_connecting(&mut self, url: RtmpUrl, why: Option<SignalKind>, delay: Duration) {
        let task = tokio::spawn(connect_retrying(url.clone(), self.cfg.clone(), delay).in_current_span());
        self.switch = Switch::Connecting { task, url, why };
    }

    async fn run_loop(&mut self, shutdown: &CancellationToken) -> Result<()> {
        let start = Instant::now();
        let mut stopping = false;
        loop {
            let now = start.elapsed().as_millis() as u64;
            while self.media.peek_pts().is_some_and(|pts| pts <= now) {
                self.queue.extend(self.media.next());
            }
            self.pump().await?;
            let finished = self.media.peek_pts().is_none() && self.queue.is_empty();
            if finished || (stopping && self.conn.is_none()) {
                return Ok(());
            }
            let due = self.media.peek_pts().map(|pts| start + Duration::from_millis(pts));
            tokio::select! {
                biased;
                () = shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    self.media.stop();
                }
                event = next_event(&mut self.conn) => self.on_event(event).await?,
                link = connected(&mut self.switch) => self.on_connected(link)?,
                () = sleep_until(due) => {}
            }
        }
    }

    /// Writes the queued frames, moving connections at keyframes.
    async fn pump(&mut self) -> Result<()> {
        while let Some(front) = self.queue.front() {
            if front.keyframe {
                self.at_keyframe().await?;
            }
            let Some(conn) = self.conn.as_mut() else { return Ok(()) };
            let Some(sample) = self.queue.pop_front() else { break };
            match send(conn, &sample, &self.config, self.cfg.step_timeout).await {
                Ok(conn_ts) => {
                    let (index, ts) = (conn.index, conn_ts);
                    self.record_sent(&sample, index, ts)?;
                }
                Err(err) => {
                    self.queue.push_front(sample);
                    self.lost_connection(err.to_string()).await?;
                }
            }
        }
        Ok(())
    }

    /// A keyframe is next: the point where a signalled publisher moves.
    async fn at_keyframe(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.switch, Switch::Idle) {
            Switch::AtKeyframe => {
                let Some(old) = self.conn.take() else { return Ok(()) };
                let url = old.url.clone();
                info!(conn = old.index, "go away: leaving at the keyframe");
                self.event("leaving", Some(old.index), Some("go_away".into()))?;
                old.close_quietly(self.cfg.step_timeout).await;
                self.start_connecting(url, Some(SignalKind::GoAway), Duration::ZERO);
            }
            Switch::Ready { link, url } => {
                let old = self.conn.take();
                self.install(*link, url, Some("reconnect_request"))?;
                if let Some(old) = old {
                    self.event("switched", Some(old.index), Some("reconnect_request".into()))?;
                    old.close_quietly(self.cfg.step_timeout).await;
                }
            }
            other => self.switch = other,
        }
        Ok(())
    }

    fn record_sent(&mut self, sample: &Sample, conn: u32, conn_ts: u32) -> Result<()> {
        let sent_at_us = unix_us();
        let frame = SentFrame {
            seq: sample.seq,
            kind: sample.kind,
            keyframe: sample.keyframe,
            pts: sample.pts,
            conn,
            conn_ts,
            size: sample.payload.len(),
            hash: media::payload_hash(&sample.payload),
            sent_at_ms: sent_at_us / 1000,
            sent_at_us,
        };
        if self.log.is_some() {
            self.write_log(&LogLine::Frame {
                stream: self.stream.clone(),
                frame: frame.clone(),
            })?;
        }
        self.sent.push(frame);
        let video = u64::from(sample.kind == Kind::Video);
        self.progress.send_modify(|p| {
            p.frames += 1;
            p.video_frames += video;
        });
        Ok(())
    }

    async fn on_event(&mut self, event: Event) -> Result<()> {
        match event {
            Event::Reply(msg) => {
                let step = self.cfg.step_timeout;
                let Some(conn) = self.conn.as_mut() else { return Ok(()) };
                conn.writer.queue(&msg);
                let flushed = tokio::time::timeout(step, conn.writer.flush()).await;
                if let Err(err) = flushed
                    .map_err(|_| Error::Timeout("writing"))
                    .and_then(|r| r.map_err(Error::from))
                {
                    self.lost_connection(err.to_string()).await?;
                }
            }
            Event::Signal(kind, tc_url) => self.on_signal(kind, tc_url)?,
            Event::Status(text) => {
                info!(status = %text, "server status");
                let index = self.conn.as_ref().map(|c| c.index);
                self.event("status", index, Some(text))?;
            }
            Event::Closed(reason) => self.lost_connection(reason).await?,
        }
        Ok(())
    }

    fn on_signal(&mut self, kind: SignalKind, tc_url: Option<String>) -> Result<()> {
        let Some(conn) = self.conn.as_ref() else { return Ok(()) };
        let (index, current) = (conn.index, conn.url.clone());
        self.signals.push((kind, tc_url.clone()));
        self.progress.send_modify(|p| p.signals += 1);
        let detail = format!("{} {}", kind.label(), tc_url.as_deref().unwrap_or(""));
        let capable = match kind {
            SignalKind::GoAway => self.cfg.go_away,
            SignalKind::ReconnectRequest => self.cfg.reconnect,
        };
        if !capable || !matches!(self.switch, Switch::Idle) {
            info!(kind = kind.label(), capable, "signal ignored");
            return self.event("signal_ignored", Some(index), Some(detail.trim().to_owned()));
        }
        info!(
            kind = kind.label(),
            tc_url = tc_url.as_deref().unwrap_or(""),
            "signal received"
        );
        self.event("signal", Some(index), Some(detail.trim().to_owned()))?;
        match kind {
            SignalKind::GoAway => self.switch = Switch::AtKeyframe,
            SignalKind::ReconnectRequest => {
                let target = match tc_url {
                    Some(tc) => {
                        let resolved = url::resolve_tc_url(&current.tc_url(), &tc);
                        RtmpUrl::from_tc_url(&resolved, &current.stream).unwrap_or_else(|err| {
                            warn!(%tc, %err, "unusable tcUrl in the reconnect request; reconnecting to the same URL");
                            current.clone()
                        })
                    }
                    None => current.clone(),
                };
                // Make before break: the new connection publishes while frames still go to the old one.
                self.start_connecting(target, Some(SignalKind::ReconnectRequest), Duration::ZERO);
            }
        }
        Ok(())
    }

    fn on_connected(&mut self, link: Result<Link>) -> Result<()> {
        let Switch::Connecting { url, why, .. } = std::mem::replace(&mut self.switch, Switch::Idle) else {
            return Ok(());
        };
        let why_label = why.map_or("unplanned", SignalKind::label);
        match link {
            Ok(link) if self.conn.is_some() => {
                debug!(target = %url.addr(), "new connection ready; moving at the next keyframe");
                self.switch = Switch::Ready {
                    link: Box::new(link),
                    url,
                };
                let index = self.conn.as_ref().map(|c| c.index);
                self.event("ready", index, Some(why_label.to_owned()))
            }
            Ok(link) => self.install(link, url, Some(why_label)),
            Err(err) if self.conn.is_some() => {
                warn!(%err, "could not reach the new target; staying on the current connection");
                let index = self.conn.as_ref().map(|c| c.index);
                self.event("switch_failed", index, Some(err.to_string()))
            }
            Err(err) => Err(err),
        }
    }

    /// The current connection broke (or the server closed it).
    async fn lost_connection(&mut self, reason: String) -> Result<()> {
        let Some(old) = self.conn.take() else { return Ok(()) };
        old.reader.abort();
        let planned = !matches!(self.switch, Switch::Idle);
        info!(conn = old.index, %reason, planned, "connection lost");
        self.event("connection_lost", Some(old.index), Some(reason))?;
        match std::mem::replace(&mut self.switch, Switch::Idle) {
            // Signalled and the new connection is ready: move now rather than wait for a keyframe.
            Switch::Ready { link, url } => self.install(*link, url, Some("reconnect_request"))?,
            connecting @ Switch::Connecting { .. } => self.switch = connecting,
            Switch::AtKeyframe => self.start_connecting(old.url, Some(SignalKind::GoAway), Duration::ZERO),
            Switch::Idle => {
                self.unplanned += 1;
                self.progress.send_modify(|p| p.unplanned_reconnects += 1);
                warn!(conn = old.index, "unplanned disconnect; reconnecting");
                self.start_connecting(old.url, None, RETRY_MIN);
            }
        }
        Ok(())
    }

    /// Tears the stream down on the current connection.
    async fn finish(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.switch, Switch::Idle) {
            Switch::Connecting { task, .. } => task.abort(),
            Switch::Ready { mut link, .. } => {
                let _ = tokio::time::timeout(self.cfg.step_timeout, link.writer.shutdown()).await;
            }
            _ => {}
        }
        if !self.queue.is_empty() {
            warn!(frames = self.queue.len(), "stopped with frames never sent");
        }
        let Some(mut conn) = self.conn.take() else {
            return Ok(());
        };
        let name = Value::string(self.stream.clone());
        conn.writer
            .queue(&Message::command(0, "FCUnpublish", 6.0, vec![Value::Null, name]));
        conn.writer.queue(&Message::command(
            0,
            "deleteStream",
            7.0,
            vec![Value::Null, Value::Number(f64::from(conn.stream_id))],
        ));
        let step = self.cfg.step_timeout;
        let closed = tokio::time::timeout(step, conn.writer.shutdown()).await;
        let abort = conn.reader.abort_handle();
        if tokio::time::timeout(step, &mut conn.reader).await.is_err() {
            abort.abort();
        }
        self.event("unpublished", Some(conn.index), None)?;
        info!(conn = conn.index, frames = self.sent.len(), "unpublished");
        closed.map_err(|_| Error::Timeout("closing"))?.map_err(Error::from)
    }
}

/// Writes one frame, preceded on a fresh connection by metadata and
/// sequence headers at time 0. Returns the RTMP timestamp used.
async fn send(conn: &mut Conn, sample: &Sample, config: &MediaConfig, step: Duration) -> Result<u32> {
    let sid = conn.stream_id;
    let base = match conn.base_pts {
        Some(base) => base,
        None => {
            conn.writer.queue(&Message::Data {
                stream_id: sid,
                timestamp: 0,
                payload: config.metadata.clone(),
            });
            conn.writer.queue(&Message::Video {
                stream_id: sid,
                timestamp: 0,
                payload: config.video.clone(),
            });
            if let Some(audio) = &config.audio {
                conn.writer.queue(&Message::Audio {
                    stream_id: sid,
                    timestamp: 0,
                    payload: audio.clone(),
                });
            }
            conn.base_pts = Some(sample.pts);
            sample.pts
        }
    };
    let timestamp = sample.pts.saturating_sub(base) as u32;
    let payload = sample.payload.clone();
    conn.writer.queue(&match sample.kind {
        Kind::Video => Message::Video {
            stream_id: sid,
            timestamp,
            payload,
        },
        Kind::Audio => Message::Audio {
            stream_id: sid,
            timestamp,
            payload,
        },
    });
    tokio::time::timeout(step, conn.writer.flush())
        .await
        .map_err(|_| Error::Timeout("writing media"))??;
    Ok(timestamp)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use anyhow::Context;
    use tokio::net::TcpListener;

    use super::*;
    use ingest_rtmp::chunk::Limits;
    use ingest_rtmp::message::Command;

    fn config(url: String, frames: u64) -> PublisherConfig {
        let mut cfg = PublisherConfig::new(url);
        // 100 fps and a GOP of 10: a keyframe every 100 ms keeps the tests short.
        (cfg.fps, cfg.gop, cfg.video_bitrate_bps, cfg.frames) = (100, 10, 400_000, Some(frames));
        cfg
    }

    #[test]
    fn generated_payloads_are_unique_with_keyframes_every_gop() {
        let mut cfg = config("rtmp://h/live/x".into(), 300);
        cfg.gop = 30;
        let a: Vec<Sample> = MediaGenerator::new("x", &cfg).collect();
        let b: Vec<Sample> = MediaGenerator::new("y", &cfg).collect();
        let hashes: HashSet<String> = a.iter().chain(&b).map(|s| media::payload_hash(&s.payload)).collect();
        assert_eq!(hashes.len(), a.len() + b.len());
        // Deterministic: the same stream gives the same bytes.
        assert_eq!(a, MediaGenerator::new("x", &cfg).collect::<Vec<_>>());
        let video: Vec<&Sample> = a.iter().filter(|s| s.kind == Kind::Video).collect();
        assert_eq!(video.len(), 300);
        for (i, v) in video.iter().enumerate() {
            assert_eq!(v.keyframe, i % 30 == 0);
            assert_eq!(media::is_video_keyframe(&v.payload), v.keyframe);
            assert!(!media::is_video_sequence_header(&v.payload));
            // The NALU length covers the rest of the payload.
            let len = u32::from_be_bytes([v.payload[5], v.payload[6], v.payload[7], v.payload[8]]) as usize;
            assert_eq!(len + 9, v.payload.len());
        }
        // Audio spans the video's 3 s at 1024/44100 s per frame, interleaved by time.
        let audio = a.iter().filter(|s| s.kind == Kind::Audio).count();
        assert_eq!(audio, 130);
        assert!(a.windows(2).all(|w| w[0].pts <= w[1].pts && w[0].seq + 1 == w[1].seq));
        let key = video[0].payload.len() as u64;
        let total: u64 = video.iter().map(|v| v.payload.len() as u64).sum();
        assert!(key > 3 * video[1].payload.len() as u64);
        assert!((total * 8 / 3).abs_diff(400_000) < 20_000, "bitrate {}", total * 8 / 3);
    }

    #[test]
    fn parses_durations() {}

    #[test]
    fn configuration_is_plausible() -> anyhow::Result<()> {
        let cfg = config("rtmp://h/live/x".into(), 1);
        let g = MediaGenerator::new("x", &cfg);
        let avc = g.video_sequence_header();
        assert!(media::is_video_sequence_header(&avc));
        // Version 1, Constrained Baseline 3.1, 4-byte lengths, one SPS (NAL type 7).
        assert_eq!(&avc[5..11], &[1, 66, 0xc0, 31, 0xff, 0xe1]);
        assert_eq!(avc[13] & 0x1f, 7);
        let sps_len = usize::from(u16::from_be_bytes([avc[11], avc[12]]));
        assert_eq!(avc[13 + sps_len], 1);
        assert_eq!(avc[16 + sps_len] & 0x1f, 8);
        assert!(media::is_audio_sequence_header(
            &g.audio_sequence_header().context("no audio")?
        ));
        let meta = amf0::decode_all(&g.metadata())?;
        assert_eq!(meta[1].as_str(), Some("onMetaData"));
        assert_eq!(meta[2].get("videocodecid").and_then(Value::as_number), Some(7.0));
        assert_eq!(meta[2].get("width").and_then(Value::as_number), Some(1280.0));
        Ok(())
    }

    /// What a fake server saw on one connection.
    #[derive(Debug, Default)]
    struct Seen {
        connect: Option<Value>,
        commands: Vec<String>,
        published: Option<String>,
        /// (message type, timestamp, payload) of data, audio and video.
        media: Vec<(u8, u32, Bytes)>,
        pong: Option<u32>,
        /// Length of `media` when the signal was sent.
        signalled_at: Option<usize>,
    }

    impl Seen {
        fn frames(&self) -> Vec<&(u8, u32, Bytes)> {
            self.media
                .iter()
                .filter(|(t, _, p)| match *t {
                    8 => !media::is_audio_sequence_header(p),
                    9 => !media::is_video_sequence_header(p),
                    _ => false,
                })
                .collect()
        }

        fn hashes(&self) -> Vec<String> {
            self.frames().iter().map(|(_, _, p)| media::payload_hash(p)).collect()
        }

        fn tore_down(&self) -> bool {
            self.commands.iter().any(|c| c == "FCUnpublish" || c == "deleteStream")
        }
    }

    /// Answers connect, createStream and publish like an ingest would.
    async fn answer(w: &mut Writer, command: &Command) -> anyhow::Result<()> {
        let txn = command.transaction;
        match command.name.as_str() {
            "connect" => {
                let info = Value::object([("code", Value::string("NetConnection.Connect.Success"))]);
                w.send(&Message::command(0, "_result", txn, vec![Value::Null, info]))
                    .await?;
            }
            "createStream" => {
                w.send(&Message::command(
                    0,
                    "_result",
                    txn,
                    vec![Value::Null, Value::Number(1.0)],
                ))
                .await?;
            }
            "publish" => {
                let info = Value::object([
                    ("level", Value::string("status")),
                    ("code", Value::string("NetStream.Publish.Start")),
                ]);
                w.send(&Message::command(1, "onStatus", 0.0, vec![Value::Null, info]))
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Serves one publisher, sending `signal` after `after` video frames,
    /// until the publisher closes.
    async fn fake_server(listener: &TcpListener, signal: Option<(usize, Message)>) -> anyhow::Result<Seen> {
        let (tcp, _) = listener.accept().await?;
        let (mut r, mut w) = conn::accept(tcp, Duration::from_secs(5), Limits::default()).await?;
        w.send(&Message::UserControl(UserControl::PingRequest(42))).await?;
        let mut seen = Seen::default();
        let mut signal = signal;
        let mut videos = 0;
        while let Some(msg) = r.next_within(Duration::from_secs(10)).await? {
            match msg {
                Message::Command { command, .. } => {
                    seen.commands.push(command.name.clone());
                    match command.name.as_str() {
                        "connect" => seen.connect = command.object().cloned(),
                        "publish" => seen.published = command.arg(0).and_then(Value::as_str).map(str::to_owned),
                        _ => {}
                    }
                    answer(&mut w, &command).await?;
                }
                Message::UserControl(UserControl::PingResponse(t)) => seen.pong = Some(t),
                Message::Data { timestamp, payload, .. } => seen.media.push((18, timestamp, payload)),
                Message::Audio { timestamp, payload, .. } => seen.media.push((8, timestamp, payload)),
                Message::Video { timestamp, payload, .. } => {
                    videos += usize::from(!media::is_video_sequence_header(&payload));
                    seen.media.push((9, timestamp, payload));
                    if let Some((_, msg)) = signal.take_if(|(after, _)| videos >= *after) {
                        seen.signalled_at = Some(seen.media.len());
                        w.send(&msg).await?;
                    }
                }
                _ => {}
            }
        }
        Ok(seen)
    }

    /// The frames of both connections are exactly the sent ones; the new
    /// connection starts with configuration, then a keyframe at time 0.
    fn assert_handover(report: &PublisherReport, first: &Seen, second: &Seen) -> anyhow::Result<()> {
        let received: Vec<String> = first.hashes().into_iter().chain(second.hashes()).collect();
        let sent: Vec<String> = report.sent.iter().map(|f| f.hash.clone()).collect();
        assert_eq!(received, sent);
        assert_eq!(report.sent.len(), 100 + 44, "all frames of 1 s at 100 fps, with audio");
        assert_eq!(first.published.as_deref(), Some("s1"));
        assert_eq!(second.published.as_deref(), Some("s1"));
        assert!(
            !first.tore_down(),
            "left without FCUnpublish/deleteStream: {:?}",
            first.commands
        );
        assert!(second.tore_down(), "tore down at the end: {:?}", second.commands);
        assert_eq!(first.pong, Some(42));
        // Configuration first on the new connection, all at time 0.
        let config: Vec<(u8, u32)> = second.media.iter().take(3).map(|m| (m.0, m.1)).collect();
        assert_eq!(config, vec![(18, 0), (9, 0), (8, 0)]);
        let (kind, ts, payload) = second
            .frames()
            .first()
            .copied()
            .context("nothing on the new connection")?;
        assert_eq!((*kind, *ts), (9, 0));
        assert!(media::is_video_keyframe(payload), "the switch happens at a keyframe");
        // The old connection kept going after the signal, up to the keyframe.
        let after_signal = first.media.len() - first.signalled_at.context("no signal sent")?;
        assert!(
            first.frames().len() > 30 && after_signal < 30,
            "{after_signal} messages after the signal"
        );
        // RTMP time never goes back on either connection; the publisher's timeline is continuous.
        for seen in [first, second] {
            assert!(seen.frames().windows(2).all(|w| w[0].1 <= w[1].1));
        }
        assert!(
            report
                .sent
                .windows(2)
                .all(|w| w[0].pts <= w[1].pts && w[0].seq + 1 == w[1].seq)
        );
        let switch = report
            .sent
            .iter()
            .find(|f| f.conn == 1)
            .context("nothing sent on connection 1")?;
        assert!(switch.keyframe && switch.conn_ts == 0);
        assert_eq!((report.connections, report.unplanned_reconnects), (2, 0));
        assert!(report.error.is_none(), "{:?}", report.error);
        Ok(())
    }

    #[tokio::test]
    async fn go_away_moves_at_a_keyframe_without_losing_frames() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let server = tokio::spawn(async move {
            let go_away = Message::GoAway(Bytes::from_static(&[0; 4]));
            let first = fake_server(&listener, Some((25, go_away))).await?;
            let second = fake_server(&listener, None).await?;
            anyhow::Ok((first, second))
        });
        let dir = std::env::temp_dir().join(format!("ingest-publisher-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut cfg = config(format!("rtmp://127.0.0.1:{port}/live/s1"), 100);
        cfg.reconnect = false;
        cfg.log = Some(dir.join("s1.jsonl"));
        let publisher = Publisher::new(cfg)?;
        let mut progress = publisher.progress();
        let run = tokio::spawn(publisher.run(CancellationToken::new()));
        progress.wait_for(|p| p.video_frames >= 10).await?;
        let report = run.await??;
        let (first, second) = server.await??;
        let connect = first.connect.as_ref().context("no connect")?;
        assert_eq!(connect.get("supportsGoAway"), Some(&Value::Boolean(true)));
        assert_eq!(connect.get("capsEx"), None);
        assert_eq!(report.signals, vec![(SignalKind::GoAway, None)]);
        assert_handover(&report, &first, &second)?;
        // The log holds the same frames.
        let logged = crate::audit::read_publisher_log(&dir.join("s1.jsonl"))?;
        assert_eq!(logged.get("s1"), Some(&report.sent));
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[tokio::test]
    async fn reconnect_request_makes_before_breaking() -> anyhow::Result<()> {
        let old = TcpListener::bind("127.0.0.1:0").await?;
        let new = TcpListener::bind("127.0.0.1:0").await?;
        let old_port = old.local_addr()?.port();
        let tc_url = format!("rtmp://127.0.0.1:{}/live", new.local_addr()?.port());
        let info = Value::object([
            ("level", Value::string("status")),
            ("code", Value::string(RECONNECT_REQUEST_CODE)),
            ("description", Value::string("draining")),
            ("tcUrl", Value::string(tc_url.clone())),
        ]);
        let request = Message::command(0, "onStatus", 0.0, vec![Value::Null, info]);
        let first = tokio::spawn(async move { fake_server(&old, Some((25, request))).await });
        let second = tokio::spawn(async move { fake_server(&new, None).await });
        let mut cfg = config(format!("rtmp://127.0.0.1:{old_port}/live/s1"), 100);
        cfg.go_away = false;
        let report = publish(cfg, CancellationToken::new()).await?;
        let (first, second) = (first.await??, second.await??);
        let connect = first.connect.as_ref().context("no connect")?;
        assert_eq!(connect.get("capsEx"), Some(&Value::Number(1.0)));
        assert_eq!(connect.get("supportsGoAway"), None);
        let new_tc_url = second
            .connect
            .as_ref()
            .and_then(|c| c.get("tcUrl"))
            .and_then(Value::as_str);
        assert_eq!(new_tc_url, Some(&*tc_url));
        assert_eq!(report.signals, vec![(SignalKind::ReconnectRequest, Some(tc_url))]);
        assert_handover(&report, &first, &second)
    }

    #[tokio::test]
    async fn cancellation_tears_down_and_unplanned_breaks_reconnect() -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let server = tokio::spawn(async move {
            // The first connection dies without a signal after a few frames.
            let (tcp, _) = listener.accept().await?;
            let (mut r, mut w) = conn::accept(tcp, Duration::from_secs(5), Limits::default()).await?;
            let mut media = 0;
            while media < 20 {
                match r.next().await? {
                    None => break,
                    Some(Message::Command { command, .. }) => answer(&mut w, &command).await?,
                    Some(Message::Video { .. } | Message::Audio { .. }) => media += 1,
                    Some(_) => {}
                }
            }
            drop((r, w));
            fake_server(&listener, None).await
        });
        let mut cfg = config(format!("rtmp://127.0.0.1:{port}/live/s1"), 0);
        cfg.frames = None;
        let publisher = Publisher::new(cfg)?;
        let mut progress = publisher.progress();
        let stop = CancellationToken::new();
        let run = tokio::spawn(publisher.run(stop.clone()));
        progress.wait_for(|p| p.connections == 2 && p.frames >= 60).await?;
        stop.cancel();
        let report = run.await??;
        let second = server.await??;
        assert_eq!(report.unplanned_reconnects, 1);
        assert!(second.tore_down());
        assert!(report.error.is_none(), "{:?}", report.error);
        // Nothing queued was skipped: the second connection got every frame after the first's.
        let sent_second: Vec<String> = report
            .sent
            .iter()
            .filter(|f| f.conn == 1)
            .map(|f| f.hash.clone())
            .collect();
        assert_eq!(second.hashes(), sent_second);
        assert!(report.sent.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
        Ok(())
    }
}
