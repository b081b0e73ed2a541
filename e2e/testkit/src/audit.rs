//! The loss audit: what a publisher sent against what the origin recorded.
//!
//! Audio/video messages are matched by payload hash over the origin's
//! recordings of the stream, concatenated in order. Sequence headers and
//! metadata are re-sent on every reconnect (and nginx-rtmp may rewrite
//! them), so they are only counted. Timestamps are judged within each
//! upstream publish session; across a handover only the publisher's own
//! timeline counts, since it restarts RTMP time at 0 on each connection.
//!
//! A real encoder is audited against its own local recording
//! ([`sent_from_recording`]), matched with [`Matching::ENCODER_RECORDING`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use thiserror::Error;

use crate::publisher::{LogLine, SentFrame};
use ingest_rtmp::flv::{self, TAG_AUDIO, TAG_VIDEO};
use ingest_rtmp::media::{self, Kind};

/// The shortest numeric suffix taken for a recording's time (a Unix time in
/// seconds has 10 digits), so `<stream>-1-<time>.flv` of a stream named
/// `<stream>-1` is not taken for `<stream>`.
const MIN_TIME_DIGITS: usize = 9;
/// Lost sequence numbers a report prints.
const LOST_SAMPLES: usize = 10;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Flv { path: PathBuf, source: flv::Error },
    #[error("{path}:{line}: {source}")]
    Log {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// One recording file's tags.
#[derive(Debug, Clone)]
pub struct Recording {
    pub path: PathBuf,
    pub tags: Vec<flv::Tag>,
}

/// The outcome for one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditReport {
    pub stream: String,
    /// Audio/video messages the publisher sent (sequence headers excluded).
    pub sent: usize,
    /// Audio/video messages in the recordings (sequence headers excluded).
    pub received: usize,
    /// Sent, never received.
    pub lost: usize,
    /// Extra copies of messages received more than once.
    pub duplicated: usize,
    /// Received after a message sent later than it.
    pub out_of_order: usize,
    /// Received, never sent.
    pub unknown: usize,
    /// Metadata and sequence headers in the recordings.
    pub config_messages: usize,
    /// Non-empty recording files (one per upstream publish with `record_unique on`).
    pub recordings: usize,
    /// Upstream publish sessions: files, or parts of a file after re-sent
    /// configuration when recordings are appended.
    pub sessions: usize,
    /// Times a timestamp went back within one session.
    pub timestamp_violations: usize,
    /// Times the publisher's timeline went back across the concatenation.
    pub timeline_violations: usize,
    /// Sequence numbers of the lost messages, in order.
    pub lost_seqs: Vec<u64>,
}

impl AuditReport {
    /// Every message arrived exactly once, in order, never back in time.
    pub fn lossless(&self) -> bool {
        self.sent > 0
            && self.lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.timestamp_violations == 0
            && self.timeline_violations == 0
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} sent {} received {} lost {} duplicated {} out-of-order {} unknown {} config {} recordings {} \
             sessions {} ts-violations {} timeline-violations {}",
            self.stream,
            if self.lossless() { "LOSSLESS" } else { "LOSS" },
            self.sent,
            self.received,
            self.lost,
            self.duplicated,
            self.out_of_order,
            self.unknown,
            self.config_messages,
            self.recordings,
            self.sessions,
            self.timestamp_violations,
            self.timeline_violations,
        )?;
        if !self.lost_seqs.is_empty() {
            write!(
                f,
                " first-lost {:?}",
                &self.lost_seqs[..self.lost_seqs.len().min(LOST_SAMPLES)]
            )?;
        }
        Ok(())
    }
}

/// Numeric suffixes of `<stream>-<time>.flv` (nginx-rtmp `record_unique`)
/// or `<stream>-<time>-<n>.flv` (the ingest pod's own recordings).
fn recording_key(file_name: &str, stream: &str) -> Option<(u64, u64)> {
    let rest = file_name
        .strip_prefix(stream)?
        .strip_prefix('-')?
        .strip_suffix(".flv")?;
    let (time, n) = rest.split_once('-').unwrap_or((rest, "0"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if time.len() < MIN_TIME_DIGITS || !digits(time) || !digits(n) {
        return None;
    }
    Some((time.parse().ok()?, n.parse().ok()?))
}

/// The recordings of `stream` in `dir`, in publish order: by the numeric
/// suffix, then by modification time.
pub fn find_recordings(dir: &Path, stream: &str) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(key) = recording_key(&name, stream) {
            let mtime = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((key, mtime, entry.path()));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, _, p)| p).collect())
}

pub fn read_recordings(paths: &[PathBuf]) -> Result<Vec<Recording>> {
    paths
        .iter()
        .map(|path| {
            let file = File::open(path).map_err(io_err(path))?;
            let tags = flv::read_tags(BufReader::new(file)).map_err(|source| Error::Flv {
                path: path.clone(),
                source,
            })?;
            Ok(Recording {
                path: path.clone(),
                tags,
            })
        })
        .collect()
}

/// Configuration rather than media: sequence headers, and the video
/// end-of-sequence marker a recording muxer writes last (libavformat's
/// FLV muxer does), which no encoder produced as a frame.
fn is_config(kind: Kind, payload: &[u8]) -> bool {
    media::is_sequence_header(kind, payload) || (kind == Kind::Video && is_video_sequence_end(payload))
}

/// An AVC/HEVC end of sequence (packet type 2) or an Enhanced RTMP SequenceEnd.
fn is_video_sequence_end(payload: &[u8]) -> bool {
    match payload.first() {
        Some(&b0) if b0 & 0x80 != 0 => b0 & 0x0f == 2,
        Some(&b0) => matches!(b0 & 0x0f, 7 | 12) && payload.get(1) == Some(&2),
        None => false,
    }
}

/// Which bytes of a payload identify it in the audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PayloadKey {
    /// The whole payload ([`media::payload_hash`]): what the test publisher logs.
    #[default]
    Exact,
    /// The payload with a video packet's 24-bit composition time offset
    /// zeroed. An encoder's recording muxer and its RTMP muxer may round
    /// that offset to milliseconds differently (OBS: libavformat against
    /// its own flv-mux), while the coded picture is the same.
    WithoutCompositionTime,
}

impl PayloadKey {
    /// The audit's identity of an audio/video payload.
    pub fn hash(self, kind: Kind, payload: &[u8]) -> String {
        match (self, kind, composition_time_range(payload)) {
            (PayloadKey::WithoutCompositionTime, Kind::Video, Some(range)) => {
                let mut masked = payload.to_vec();
                masked[range].fill(0);
                media::payload_hash(&masked)
            }
            _ => media::payload_hash(payload),
        }
    }
}

/// Where a video payload carries its composition time offset: legacy
/// AVC/HEVC NALU packets after the packet type byte, Enhanced RTMP
/// CodedFrames after the FourCC.
fn composition_time_range(payload: &[u8]) -> Option<std::ops::Range<usize>> {
    let &b0 = payload.first()?;
    let range = if b0 & 0x80 != 0 {
        // Enhanced RTMP: packet type 1 = CodedFrames (with the offset).
        (b0 & 0x0f == 1).then_some(5..8)?
    } else {
        // Codec 7 (AVC) or 12 (HEVC), AVCPacketType 1 = NALU.
        (matches!(b0 & 0x0f, 7 | 12) && payload.get(1) == Some(&1)).then_some(2..5)?
    };
    (payload.len() >= range.end).then_some(range)
}

/// How the audit matches received messages to sent ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Matching {
    pub key: PayloadKey,
    /// Judge order and timeline per track. Set when the sent list comes
    /// from a recording, whose muxer may interleave audio and video
    /// differently from the wire (ties and near-ties of timestamps).
    pub per_track_order: bool,
}

impl Matching {
    /// The test publisher's log: exact payloads, wire order.
    pub const EXACT: Matching = Matching {
        key: PayloadKey::Exact,
        per_track_order: false,
    };
    /// An encoder's local recording (see [`sent_from_recording`]).
    pub const ENCODER_RECORDING: Matching = Matching {
        key: PayloadKey::WithoutCompositionTime,
        per_track_order: true,
    };
}

/// The audio/video messages of a publisher's own recording of what it
/// streamed (for example OBS recording "same as stream" to FLV), as the
/// list [`audit_with`] compares the origin's recordings against: sequence
/// headers, end-of-sequence markers and metadata left out as the audit
/// leaves them out, `pts` the recording's timeline, one connection.
pub fn sent_from_recording(tags: &[flv::Tag], key: PayloadKey) -> Vec<SentFrame> {
    let mut sent = Vec::new();
    for tag in tags {
        let kind = match tag.tag_type {
            TAG_AUDIO => Kind::Audio,
            TAG_VIDEO => Kind::Video,
            _ => continue,
        };
        if is_config(kind, &tag.data) {
            continue;
        }
        sent.push(SentFrame {
            seq: sent.len() as u64,
            kind,
            keyframe: kind == Kind::Video && media::is_video_keyframe(&tag.data),
            pts: u64::from(tag.timestamp),
            conn: 0,
            conn_ts: tag.timestamp,
            size: tag.data.len(),
            hash: key.hash(kind, &tag.data),
            sent_at_ms: 0,
            sent_at_us: 0,
        });
    }
    sent
}

/// Audits the recordings of `stream` in `record_dir` against a publisher's
/// local FLV recording `local` ([`Matching::ENCODER_RECORDING`]).
pub fn audit_local_recording(stream: &str, local: &Path, record_dir: &Path) -> Result<AuditReport> {
    let local = read_recordings(&[local.to_owned()])?;
    let sent = sent_from_recording(
        local.first().map_or(&[][..], |r| &r.tags[..]),
        Matching::ENCODER_RECORDING.key,
    );
    let recordings = read_recordings(&find_recordings(record_dir, stream)?)?;
    Ok(audit_with(stream, &sent, &recordings, Matching::ENCODER_RECORDING))
}

/// Compares the frames a publisher sent with the recordings, in order.
pub fn audit(stream: &str, sent: &[SentFrame], recordings: &[Recording]) -> AuditReport {
    audit_with(stream, sent, recordings, Matching::EXACT)
}

/// Sent frames by identity. A payload sent more than once (an encoder's
/// silence or a repeated frame) is matched to its copies in order, so
/// each copy must arrive once.
struct SentIndex<'a> {
    copies: HashMap<&'a str, (Vec<usize>, usize)>,
}

impl<'a> SentIndex<'a> {
    fn new(sent: &'a [SentFrame]) -> Self {
        let mut copies: HashMap<&str, (Vec<usize>, usize)> = HashMap::with_capacity(sent.len());
        for (i, f) in sent.iter().enumerate() {
            copies.entry(f.hash.as_str()).or_default().0.push(i);
        }
        Self { copies }
    }

    /// The next copy of `hash` not yet received, or the first copy again
    /// when all were (a duplicate); `None` if never sent.
    fn take(&mut self, hash: &str) -> Option<usize> {
        let (indices, next) = self.copies.get_mut(hash)?;
        match indices.get(*next) {
            Some(&i) => {
                *next += 1;
                Some(i)
            }
            None => indices.first().copied(),
        }
    }
}

/// [`audit`] with a choice of payload identity and order.
pub fn audit_with(stream: &str, sent: &[SentFrame], recordings: &[Recording], matching: Matching) -> AuditReport {
    let mut report = AuditReport {
        stream: stream.to_owned(),
        // nginx-rtmp opens a file for a publish it then refuses ("already
        // publishing"): count only recordings that hold something.
        recordings: recordings.iter().filter(|r| !r.tags.is_empty()).count(),
        ..Default::default()
    };
    let mut index = SentIndex::new(sent);
    report.sent = sent.len();
    let mut seen = vec![0u32; sent.len()];
    // Highest sent index and last publisher pts so far, per track when
    // order is judged per track (slot 0 otherwise).
    let mut highest: [Option<usize>; 2] = [None; 2];
    let mut last_pts: [Option<u64>; 2] = [None; 2];
    for rec in recordings {
        // nginx-rtmp leaves an empty file for a publish it refused.
        if rec.tags.is_empty() {
            continue;
        }
        report.sessions += 1;
        let mut session_media = 0usize;
        let mut last_ts: Option<u32> = None;
        for tag in &rec.tags {
            let kind = match tag.tag_type {
                TAG_AUDIO => Kind::Audio,
                TAG_VIDEO => Kind::Video,
                _ => {
                    report.config_messages += 1;
                    continue;
                }
            };
            if is_config(kind, &tag.data) {
                report.config_messages += 1;
                // Configuration after media in one file: an appended next session.
                if session_media > 0 {
                    report.sessions += 1;
                    session_media = 0;
                    last_ts = None;
                }
                continue;
            }
            report.received += 1;
            session_media += 1;
            if last_ts.is_some_and(|t| tag.timestamp < t) {
                report.timestamp_violations += 1;
            }
            last_ts = Some(tag.timestamp);
            let Some(i) = index.take(&matching.key.hash(kind, &tag.data)) else {
                report.unknown += 1;
                continue;
            };
            seen[i] += 1;
            if seen[i] > 1 {
                report.duplicated += 1;
                continue;
            }
            let track = usize::from(matching.per_track_order && kind == Kind::Video);
            if highest[track].is_some_and(|h| i < h) {
                report.out_of_order += 1;
            } else {
                highest[track] = Some(i);
            }
            if last_pts[track].is_some_and(|p| sent[i].pts < p) {
                report.timeline_violations += 1;
            }
            last_pts[track] = Some(sent[i].pts);
        }
    }
    for (i, n) in seen.iter().enumerate() {
        if *n == 0 {
            report.lost += 1;
            report.lost_seqs.push(sent[i].seq);
        }
    }
    report
}

/// [`audit`] over the recordings of `stream` found in `dir`.
pub fn audit_dir(stream: &str, sent: &[SentFrame], dir: &Path) -> Result<AuditReport> {
    let recordings = read_recordings(&find_recordings(dir, stream)?)?;
    Ok(audit(stream, sent, &recordings))
}

/// The frames in a publisher's JSON lines log, by stream. A cut last line
/// (the publisher was killed mid-write) is skipped.
pub fn read_publisher_log(path: &Path) -> Result<BTreeMap<String, Vec<SentFrame>>> {
    let file = File::open(path).map_err(io_err(path))?;
    let lines: Vec<String> = BufReader::new(file)
        .lines()
        .collect::<Result<_, _>>()
        .map_err(io_err(path))?;
    let mut out: BTreeMap<String, Vec<SentFrame>> = BTreeMap::new();
    for (n, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<LogLine>(line) {
            Ok(LogLine::Frame { stream, frame }) => out.entry(stream).or_default().push(frame),
            Ok(LogLine::Event { stream, .. }) => {
                out.entry(stream).or_default();
            }
            Err(_) if n + 1 == lines.len() => {}
            Err(source) => {
                return Err(Error::Log {
                    path: path.to_owned(),
                    line: n + 1,
                    source,
                });
            }
        }
    }
    Ok(out)
}

/// Every `*.jsonl` publisher log in `dir`, merged by stream.
pub fn read_log_dir(dir: &Path) -> Result<BTreeMap<String, Vec<SentFrame>>> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    paths.sort();
    let mut out: BTreeMap<String, Vec<SentFrame>> = BTreeMap::new();
    for path in paths {
        for (stream, frames) in read_publisher_log(&path)? {
            out.entry(stream).or_default().extend(frames);
        }
    }
    for frames in out.values_mut() {
        frames.sort_by_key(|f| f.seq);
    }
    Ok(out)
}

/// Audits every stream of the publisher logs in `log_dir` against the
/// recordings in `record_dir`.
pub fn audit_all(log_dir: &Path, record_dir: &Path) -> Result<Vec<AuditReport>> {
    read_log_dir(log_dir)?
        .iter()
        .map(|(stream, sent)| audit_dir(stream, sent, record_dir))
        .collect()
}

/// A table of reports, one line per stream and a total.
pub fn table(reports: &[AuditReport]) -> String {
    let row = |name: &str, r: &AuditReport, verdict: &str| {
        format!(
            "{:<24} {:>8} {:>8} {:>6} {:>5} {:>5} {:>7} {:>6} {:>5} {:>5} {:>5}  {}\n",
            name,
            r.sent,
            r.received,
            r.lost,
            r.duplicated,
            r.out_of_order,
            r.unknown,
            r.config_messages,
            r.sessions,
            r.timestamp_violations,
            r.timeline_violations,
            verdict
        )
    };
    let mut s = format!(
        "{:<24} {:>8} {:>8} {:>6} {:>5} {:>5} {:>7} {:>6} {:>5} {:>5} {:>5}  {}\n",
        "stream", "sent", "received", "lost", "dup", "ooo", "unknown", "config", "sess", "ts", "tl", "verdict"
    );
    let mut total = AuditReport::default();
    for r in reports {
        s.push_str(&row(&r.stream, r, if r.lossless() { "lossless" } else { "LOSS" }));
        total.sent += r.sent;
        total.received += r.received;
        total.lost += r.lost;
        total.duplicated += r.duplicated;
        total.out_of_order += r.out_of_order;
        total.unknown += r.unknown;
        total.config_messages += r.config_messages;
        total.sessions += r.sessions;
        total.timestamp_violations += r.timestamp_violations;
        total.timeline_violations += r.timeline_violations;
    }
    let lossless = reports.iter().filter(|r| r.lossless()).count();
    s.push_str(&row("total", &total, &format!("{lossless}/{} lossless", reports.len())));
    s
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use anyhow::Context;

    use super::*;
    use crate::publisher::{AAC_SEQUENCE_HEADER, MediaGenerator, PublisherConfig, Sample};
    use ingest_rtmp::flv::{FlvWriter, TAG_SCRIPT};

    fn samples(stream: &str, frames: u64) -> (MediaGenerator, Vec<Sample>) {
        let mut cfg = PublisherConfig::new(format!("rtmp://h/live/{stream}"));
        (cfg.fps, cfg.gop, cfg.video_bitrate_bps, cfg.frames) = (30, 10, 100_000, Some(frames));
        let generator = MediaGenerator::new(stream, &cfg);
        let all = generator.clone().collect();
        (generator, all)
    }

    fn sent(samples: &[Sample]) -> Vec<SentFrame> {
        let frame = |s: &Sample| SentFrame {
            seq: s.seq,
            kind: s.kind,
            keyframe: s.keyframe,
            pts: s.pts,
            conn: 0,
            conn_ts: s.pts as u32,
            size: s.payload.len(),
            hash: media::payload_hash(&s.payload),
            sent_at_ms: 0,
            sent_at_us: 0,
        };
        samples.iter().map(frame).collect()
    }

    fn dir(name: &str) -> anyhow::Result<PathBuf> {
        let d = std::env::temp_dir().join(format!("ingest-audit-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d)?;
        Ok(d)
    }

    fn write_media(w: &mut FlvWriter<impl Write>, media: &[&Sample], base: u64) -> anyhow::Result<()> {
        for s in media {
            let tag = if s.kind == Kind::Video { TAG_VIDEO } else { TAG_AUDIO };
            w.write_tag(tag, (s.pts - base) as u32, &s.payload)?;
        }
        Ok(())
    }

    /// Writes a recording as nginx-rtmp does: configuration, then media
    /// with timestamps from 0.
    fn record(path: &Path, g: &MediaGenerator, media: &[&Sample]) -> anyhow::Result<()> {
        let mut w = FlvWriter::new(File::create(path)?, true, true)?;
        w.write_tag(TAG_SCRIPT, 0, &g.metadata())?;
        w.write_tag(TAG_VIDEO, 0, &g.video_sequence_header())?;
        w.write_tag(TAG_AUDIO, 0, &g.audio_sequence_header().context("no audio")?)?;
        write_media(&mut w, media, media.first().map_or(0, |s| s.pts))?;
        w.flush()?;
        Ok(())
    }

    /// Tags of one session in memory: a video sequence header, then media
    /// with timestamps from `base`.
    fn session(g: &MediaGenerator, media: &[&Sample], base: u64) -> anyhow::Result<Vec<flv::Tag>> {
        let mut buf = Vec::new();
        {
            let mut w = FlvWriter::new(&mut buf, true, true)?;
            w.write_tag(TAG_VIDEO, 0, &g.video_sequence_header())?;
            write_media(&mut w, media, base)?;
        }
        Ok(flv::read_tags(&buf[..])?)
    }

    fn in_memory(tags: Vec<flv::Tag>) -> [Recording; 1] {
        [Recording {
            path: "memory".into(),
            tags,
        }]
    }

    #[test]
    fn lossless_across_two_recordings() -> anyhow::Result<()> {
        let (g, all) = samples("a", 40);
        let d = dir("lossless")?;
        let split = all
            .iter()
            .position(|s| s.keyframe && s.pts >= 500)
            .context("no keyframe")?;
        let (before, after): (Vec<&Sample>, Vec<&Sample>) = all.iter().partition(|s| s.seq < split as u64);
        record(&d.join("a-1700000001.flv"), &g, &before)?;
        record(&d.join("a-1700000002.flv"), &g, &after)?;
        // A stream whose name extends this one is not taken.
        record(&d.join("a-1-1700000001.flv"), &g, &[&all[0]])?;
        // What nginx-rtmp leaves for a publish it refused.
        File::create(d.join("a-1700000003.flv"))?;
        let r = audit_dir("a", &sent(&all), &d)?;
        assert!(r.lossless(), "{r}");
        assert_eq!(
            (r.sent, r.received, r.recordings, r.sessions, r.config_messages),
            (all.len(), all.len(), 2, 2, 6)
        );
        assert!(r.to_string().contains("LOSSLESS"));
        Ok(())
    }

    #[test]
    fn finds_lost_duplicated_and_reordered_frames() -> anyhow::Result<()> {
        let (g, all) = samples("b", 30);
        let s = sent(&all);
        let d = dir("loss")?;
        // Lost: frame 5 missing.
        let lost: Vec<&Sample> = all.iter().filter(|x| x.seq != 5).collect();
        record(&d.join("b-1700000001.flv"), &g, &lost)?;
        let r = audit_dir("b", &s, &d)?;
        assert_eq!(
            (r.lost, r.duplicated, r.out_of_order, r.lost_seqs.clone()),
            (1, 0, 0, vec![5])
        );
        assert!(!r.lossless());
        // Duplicated: the old pod and the new one both delivered frames 10..13.
        let refs: Vec<&Sample> = all.iter().collect();
        record(&d.join("b-1700000001.flv"), &g, &refs[..13])?;
        record(&d.join("b-1700000002.flv"), &g, &refs[10..])?;
        let r = audit_dir("b", &s, &d)?;
        assert_eq!((r.lost, r.duplicated, r.out_of_order, r.sessions), (0, 3, 0, 2));
        assert!(!r.lossless());
        // Out of order: 7 after 8.
        let mut swapped = refs.clone();
        swapped.swap(7, 8);
        let r = audit("b", &s, &in_memory(session(&g, &swapped, 0)?));
        assert_eq!((r.lost, r.duplicated, r.out_of_order), (0, 0, 1));
        assert!(!r.lossless());
        // Frames never sent are counted, not fatal.
        let r = audit("b", &s[1..], &in_memory(session(&g, &refs, 0)?));
        assert_eq!((r.unknown, r.lost), (1, 0));
        Ok(())
    }

    #[test]
    fn timestamps_are_judged_per_session() -> anyhow::Result<()> {
        let (g, all) = samples("c", 20);
        let refs: Vec<&Sample> = all.iter().collect();
        // One appended file holding two sessions, each restarting at 0: fine.
        let mut t = session(&g, &refs[..10], 0)?;
        t.extend(session(&g, &refs[10..], all[10].pts)?);
        let r = audit("c", &sent(&all), &in_memory(t.clone()));
        assert_eq!((r.sessions, r.timestamp_violations), (2, 0));
        assert!(r.lossless(), "{r}");
        // Without configuration between them the jump back is a violation.
        let second_config = t
            .iter()
            .rposition(|tag| media::is_video_sequence_header(&tag.data))
            .context("no config")?;
        t.remove(second_config);
        let r = audit("c", &sent(&all), &in_memory(t));
        assert_eq!((r.sessions, r.timestamp_violations), (1, 1));
        assert!(!r.lossless());
        Ok(())
    }

    /// An AVC NALU packet: frame type, packet type 1, composition time, data.
    fn avc(key: bool, cts: u32, n: u32) -> Vec<u8> {
        let mut p = vec![if key { 0x17 } else { 0x27 }, 1];
        p.extend_from_slice(&cts.to_be_bytes()[1..]);
        p.extend_from_slice(&[0, 0, 0, 5, 0x41]);
        p.extend_from_slice(&n.to_be_bytes());
        p
    }

    /// An AAC raw frame; equal `n` give equal payloads (silence repeats).
    fn aac(n: u32) -> Vec<u8> {
        let mut p = vec![0xaf, 1];
        p.extend_from_slice(&n.to_be_bytes());
        p
    }

    /// Media of an encoder: (tag type, timestamp, payload), video every
    /// 33 ms with a keyframe every 10 frames, audio every 23 ms.
    fn encoder_media(cts_shift: u32) -> Vec<(u8, u32, Vec<u8>)> {
        let mut out = Vec::new();
        for n in 0..40u32 {
            out.push((TAG_VIDEO, n * 33, avc(n % 10 == 0, 67 + cts_shift, n)));
        }
        for n in 0..57u32 {
            // Silence at the start: the first three frames are equal.
            out.push((TAG_AUDIO, n * 23, aac(n.saturating_sub(2))));
        }
        // Video first on a tie; a recording muxer may break ties the other way.
        out.sort_by_key(|(t, ts, _)| (*ts, *t == TAG_AUDIO));
        out
    }

    fn flv_tags(config: bool, media: &[(u8, u32, Vec<u8>)], base: u32) -> anyhow::Result<Vec<flv::Tag>> {
        let mut buf = Vec::new();
        {
            let mut w = FlvWriter::new(&mut buf, true, true)?;
            if config {
                w.write_tag(TAG_SCRIPT, 0, b"onMetaData")?;
                w.write_tag(TAG_VIDEO, 0, &[0x17, 0, 0, 0, 0, 1, 0x64])?;
                w.write_tag(TAG_AUDIO, 0, &AAC_SEQUENCE_HEADER)?;
            }
            for (t, ts, p) in media {
                w.write_tag(*t, ts - base, p)?;
            }
        }
        Ok(flv::read_tags(&buf[..])?)
    }

    #[test]
    fn audits_an_encoder_against_its_local_recording() -> anyhow::Result<()> {
        // The local recording: rounded one way, audio first on ties.
        let mut local_media = encoder_media(1);
        local_media.sort_by_key(|(t, ts, _)| (*ts, *t == TAG_VIDEO));
        // libavformat ends the file with an AVC end of sequence.
        local_media.push((TAG_VIDEO, 39 * 33, vec![0x17, 2, 0, 0, 0]));
        let local = flv_tags(true, &local_media, 0)?;
        let sent = sent_from_recording(&local, PayloadKey::WithoutCompositionTime);
        assert_eq!(sent.len(), 97, "sequence headers, its end and metadata are left out");
        assert_eq!(
            (sent[0].kind, sent[1].kind, sent[1].keyframe),
            (Kind::Audio, Kind::Video, true)
        );
        assert_eq!(sent.iter().filter(|f| f.keyframe).count(), 4);
        assert_eq!(sent.iter().map(|f| f.pts).max(), Some(56 * 23));

        // The stream: rounded the other way, video first on ties, one
        // handover at a keyframe (time restarts at 0), and a second of
        // media the recording does not hold (started earlier).
        let wire = encoder_media(0);
        let split = wire
            .iter()
            .position(|(t, ts, p)| *t == TAG_VIDEO && *ts > 500 && p[0] == 0x17)
            .context("no keyframe")?;
        let base = wire[split].1;
        let mut early = vec![(TAG_VIDEO, 0, avc(true, 0, 999))];
        early.extend(wire[..split].iter().map(|(t, ts, p)| (*t, ts + 1, p.clone())));
        let origin = [
            Recording {
                path: "one".into(),
                tags: flv_tags(true, &early, 0)?,
            },
            Recording {
                path: "two".into(),
                tags: flv_tags(true, &wire[split..], base)?,
            },
        ];
        let r = audit_with("obs", &sent, &origin, Matching::ENCODER_RECORDING);
        assert!(r.lossless(), "{r}");
        assert_eq!((r.received, r.unknown, r.sessions), (98, 1, 2));
        // Exact payloads differ in the composition time, and wire order in ties.
        let r = audit_with("obs", &sent, &origin, Matching::EXACT);
        assert_eq!((r.lost, r.unknown), (40, 41));
        let exact = sent_from_recording(&local, PayloadKey::Exact);
        let r = audit_with(
            "obs",
            &exact,
            &origin,
            Matching {
                key: PayloadKey::Exact,
                per_track_order: false,
            },
        );
        assert!(r.lost > 0 && !r.lossless(), "{r}");

        // A repeated payload must arrive as often as it was sent.
        let mut cut = origin.clone();
        let silence = cut[0]
            .tags
            .iter()
            .position(|t| t.tag_type == TAG_AUDIO && t.data[..] == aac(0)[..])
            .context("no silence")?;
        cut[0].tags.remove(silence);
        let r = audit_with("obs", &sent, &cut, Matching::ENCODER_RECORDING);
        assert_eq!((r.lost, r.duplicated), (1, 0), "{r}");
        cut[1].tags.push(cut[0].tags[silence].clone());
        cut[1].tags.push(cut[0].tags[silence].clone());
        let r = audit_with("obs", &sent, &cut, Matching::ENCODER_RECORDING);
        assert_eq!((r.lost, r.duplicated), (0, 1), "{r}");
        Ok(())
    }

    #[test]
    fn composition_time_is_masked_only_where_it_is() {
        let key = PayloadKey::WithoutCompositionTime;
        assert_eq!(
            key.hash(Kind::Video, &avc(false, 1, 7)),
            key.hash(Kind::Video, &avc(false, 2, 7))
        );
        assert_ne!(
            key.hash(Kind::Video, &avc(false, 1, 7)),
            key.hash(Kind::Video, &avc(false, 1, 8))
        );
        assert_ne!(
            PayloadKey::Exact.hash(Kind::Video, &avc(false, 1, 7)),
            PayloadKey::Exact.hash(Kind::Video, &avc(false, 2, 7))
        );
        // Enhanced RTMP CodedFrames ('avc1'): the offset follows the FourCC.
        let ex = |cts: u8| [0x91, b'a', b'v', b'c', b'1', 0, 0, cts, 9, 9];
        assert_eq!(key.hash(Kind::Video, &ex(1)), key.hash(Kind::Video, &ex(2)));
        // Sequence headers, audio and short payloads are hashed whole.
        assert_eq!(composition_time_range(&[0x17, 0, 0, 0, 1]), None);
        assert_eq!(composition_time_range(&[0x17, 1, 0]), None);
        assert_eq!(composition_time_range(&[0x90, b'a', b'v', b'c', b'1']), None);
        assert!(is_config(Kind::Video, &[0x17, 2, 0, 0, 0]) && is_config(Kind::Video, &[0x92, b'a', b'v', b'c', b'1']));
        assert!(!is_config(Kind::Video, &avc(true, 0, 1)) && !is_config(Kind::Audio, &[0xaf, 2]));
        assert_eq!(key.hash(Kind::Audio, &aac(3)), media::payload_hash(&aac(3)));
    }

    #[test]
    fn orders_recordings_and_reads_logs() -> anyhow::Result<()> {
        assert_eq!(recording_key("k-1700000000.flv", "k"), Some((1_700_000_000, 0)));
        assert_eq!(
            recording_key("k-1700000000123-7.flv", "k"),
            Some((1_700_000_000_123, 7))
        );
        assert_eq!(recording_key("k-1-1700000000.flv", "k"), None);
        assert_eq!(recording_key("k-1700000000.mp4", "k"), None);
        let d = dir("logs")?;
        let (_, all) = samples("s", 5);
        let mut f = File::create(d.join("s.jsonl"))?;
        for frame in sent(&all) {
            serde_json::to_writer(
                &mut f,
                &LogLine::Frame {
                    stream: "s".into(),
                    frame,
                },
            )?;
            f.write_all(b"\n")?;
        }
        // A line cut by a killed publisher.
        f.write_all(b"{\"type\":\"fra")?;
        let logs = read_log_dir(&d)?;
        assert_eq!(logs["s"], sent(&all));
        let table = table(&[audit("s", &logs["s"], &[])]);
        assert!(table.contains("LOSS") && table.contains("0/1 lossless"), "{table}");
        Ok(())
    }
}
