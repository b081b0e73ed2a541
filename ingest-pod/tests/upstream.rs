//! The origin hiccups: the path to it breaks, then it crashes and comes
//! back. The publisher's one connection to the pod is never cut; the relay
//! reconnects with backoff and delivers in order everything it buffered
//! meanwhile.
//!
//! What the origin may lack: messages on the wire when it went away, and
//! video frames that start a new upstream publish in the middle of a GOP,
//! which nginx-rtmp's recorder skips until the next keyframe ("record:
//! skipping until keyframe"): they cannot be decoded without the keyframe
//! that went to the previous publish.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ingest_pod::metrics::Metrics;
use ingest_rtmp::media::Kind;
use ingest_testkit::audit;
use ingest_testkit::lab::{Link, LocalPod};
use ingest_testkit::origin::Origin;
use ingest_testkit::publisher::{Progress, Publisher, PublisherConfig, PublisherReport, SentFrame};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Waits until `n` more video frames went out.
async fn frames_more(progress: &mut watch::Receiver<Progress>, n: u64) {
    let target = progress.borrow().video_frames + n;
    tokio::time::timeout(
        Duration::from_secs(20),
        progress.wait_for(|p| p.video_frames >= target || p.done),
    )
    .await
    .expect("the publisher keeps streaming")
    .expect("publisher alive");
}

/// A wall-clock window (Unix ms) in which the origin went away.
struct Outage {
    what: &'static str,
    began_ms: u64,
    over_ms: u64,
}

impl Outage {
    /// How far back before an outage a frame may still have been in flight:
    /// one media read interval, one relay write, socket buffers.
    const IN_FLIGHT_MS: u64 = 1000;

    /// `sent[i]` may be missing at the origin because of this outage: it
    /// was on the wire, or it is a video frame after the outage that came
    /// before the next keyframe.
    fn may_lose(&self, sent: &[SentFrame], i: usize) -> bool {
        let frame = &sent[i];
        let in_flight = frame.sent_at_ms + Self::IN_FLIGHT_MS >= self.began_ms && frame.sent_at_ms <= self.over_ms;
        let before_next_keyframe = frame.kind == Kind::Video
            && !frame.keyframe
            && frame.sent_at_ms + Self::IN_FLIGHT_MS >= self.began_ms
            && !sent[..i].iter().any(|f| f.keyframe && f.sent_at_ms >= self.began_ms);
        in_flight || before_next_keyframe
    }

    fn describe(outages: &[Outage]) -> String {
        outages
            .iter()
            .map(|o| format!("{} {}..{}", o.what, o.began_ms, o.over_ms))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_outages_never_cut_the_publisher() {
    ingest_runtime::init_logs(ingest_runtime::LogFormat::Text);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx-rtmp");
    let link = Link::start(origin.addr()).await.expect("link");
    let template = format!("rtmp://{}/live/{{stream}}", link.addr);
    let pod = LocalPod::start("pod", &["--upstream", &template]).await.expect("pod");
    let cfg = PublisherConfig {
        fps: 30,
        gop: 30,
        video_bitrate_bps: 1_000_000,
        width: 320,
        height: 240,
        ..PublisherConfig::new(format!("rtmp://{}/live/outage", pod.rtmp))
    };
    let publisher = Publisher::new(cfg).expect("publisher");
    let mut progress = publisher.progress();
    let stop = CancellationToken::new();
    let task = tokio::spawn(publisher.run(stop.clone()));
    frames_more(&mut progress, 90).await;
    assert_eq!(link.forwarded(), 1, "one upstream connection so far");
    let metrics = pod.registry.metrics().clone();
    let mut outages = Vec::new();

    // 1. The path to the origin breaks for 1.5 s: both ends are reset and
    // new connections are reset as they arrive.
    let began_ms = now_ms();
    link.cut().await;
    outages.push(Outage {
        what: "link cut",
        began_ms,
        over_ms: now_ms(),
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let attempts = link.refused();
    link.restore();
    // Back-off doubling from 20 ms tries about 6 times in 1.5 s; a fixed
    // 10 ms retry would try about 150 times.
    assert!(
        (2..=12).contains(&attempts),
        "{attempts} attempts while the origin was unreachable for 1.5 s"
    );
    frames_more(&mut progress, 90).await;
    assert_eq!(link.forwarded(), 2, "the relay reconnected once the path was back");

    // 2. The origin crashes; a new nginx listens on the same port.
    let began_ms = now_ms();
    tokio::task::block_in_place(|| origin.crash_and_restart()).expect("nginx restarted");
    outages.push(Outage {
        what: "origin crash",
        began_ms,
        over_ms: now_ms(),
    });
    frames_more(&mut progress, 90).await;
    assert!(link.forwarded() >= 3, "the relay reconnected to the new origin");

    stop.cancel();
    let report = task.await.expect("join").expect("publisher");
    let registry = pod.registry.clone();
    tokio::time::timeout(Duration::from_secs(20), async {
        while registry.relays_active() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the relay flushed after the publisher left");
    // The relay can finish before the session reads the publisher's close
    // (its deleteStream ends the publish first): wait for the connection too.
    tokio::time::timeout(Duration::from_secs(5), async {
        while registry.totals().ended == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the publisher's connection ended");

    // The publisher never noticed.
    assert_eq!(report.error, None);
    assert_eq!(report.connections, 1, "the publisher's one connection was never cut");
    assert_eq!(report.unplanned_reconnects, 0);
    assert!(report.signals.is_empty());
    assert_eq!(pod.registry.totals().ended, 1, "one publish, ended by the publisher");
    assert_eq!(metrics.relay_reconnects.get(), 2, "one reconnect per outage");
    assert!(metrics.relay_retries.get() > attempts, "every refused attempt counted");
    assert_eq!(metrics.relay_dropped_bytes.get(), 0, "nothing dropped from the buffer");

    let record_dir = origin.record_dir();
    drop(origin); // nginx closes its recordings
    let result = audit::audit_dir(&report.stream, &report.sent, &record_dir).expect("audit");
    println!("{result}");
    assert!(
        result.sessions >= 3,
        "one upstream publish before and after each outage: {result}"
    );
    assert_eq!(
        (
            result.duplicated,
            result.out_of_order,
            result.unknown,
            result.timestamp_violations,
            result.timeline_violations
        ),
        (0, 0, 0, 0, 0),
        "{result}"
    );
    // What the origin lacks went missing in an outage; everything the pod
    // buffered meanwhile arrived.
    let mut lost = 0;
    for (i, frame) in report.sent.iter().enumerate() {
        if result.lost_seqs.binary_search(&frame.seq).is_err() {
            continue;
        }
        lost += 1;
        assert!(
            outages.iter().any(|o| o.may_lose(&report.sent, i)),
            "{:?} frame {} (keyframe: {}) sent at {} went missing outside any outage ({})",
            frame.kind,
            frame.seq,
            frame.keyframe,
            frame.sent_at_ms,
            Outage::describe(&outages)
        );
    }
    assert_eq!(lost, result.lost);
    println!("{lost} messages missing at the origin, all explained by the outages");
}

/// An origin that refuses the stream (here: an application it does not
/// have) is not retried for ever: after a few refusals the relay gives up,
/// and the publisher gets `NetStream.Publish.Failed` and is closed, so its
/// encoder shows the failure instead of streaming into a buffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_ends_with_an_error_to_the_publisher() {
    use bytes::Bytes;
    use ingest_pod::rtmp::client;
    use ingest_rtmp::message::Message;
    use ingest_rtmp::url::RtmpUrl;

    ingest_runtime::init_logs(ingest_runtime::LogFormat::Text);
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx-rtmp");
    let template = format!("rtmp://{}/nosuchapp/{{stream}}", origin.addr());
    let pod = LocalPod::start("pod", &["--upstream", &template]).await.expect("pod");
    let url = RtmpUrl::parse(&format!("rtmp://{}/live/refused", pod.rtmp)).expect("url");
    let client::Publishing {
        mut reader,
        mut writer,
        stream_id,
    } = client::publish(&url, "test", Vec::new(), Duration::from_secs(5))
        .await
        .expect("the pod accepts the publish");
    let ended = async {
        let mut ts = 0u32;
        loop {
            let key = ts.is_multiple_of(1000);
            let mut body = vec![if key { 0x17 } else { 0x27 }, 1, 0, 0, 0];
            body.resize(2000, 0);
            let video = Message::Video {
                stream_id,
                timestamp: ts,
                payload: Bytes::from(body),
            };
            if writer.send(&video).await.is_err() {
                return None;
            }
            ts += 40;
            match tokio::time::timeout(Duration::from_millis(40), reader.next()).await {
                Ok(Ok(Some(Message::Command { command, .. }))) if command.name == "onStatus" => {
                    return Some(client::status_text(&command));
                }
                Ok(Ok(None) | Err(_)) => return None,
                _ => {}
            }
        }
    };
    let status = tokio::time::timeout(Duration::from_secs(30), ended)
        .await
        .expect("the publisher is told within 30 s");
    let (code, desc) = status.expect("an onStatus before the close");
    assert_eq!(code, "NetStream.Publish.Failed", "{desc}");
    assert!(desc.contains("origin refuses"), "{desc}");
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match reader.next().await {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the pod closes the connection after the error");
    assert_eq!(pod.registry.metrics().relay_refused.get(), 1);
}

/// Starts nginx-rtmp behind a [`Link`], a pod relaying to it with `extra`
/// flags, and a capable publisher at `bitrate_bps` that streams until cancelled.
struct Lab {
    origin: Origin,
    link: Link,
    pod: LocalPod,
    progress: watch::Receiver<Progress>,
    stop: CancellationToken,
    publisher: tokio::task::JoinHandle<ingest_testkit::publisher::Result<PublisherReport>>,
    _dir: tempfile::TempDir,
}

impl Lab {
    async fn start(stream: &str, bitrate_bps: u64, extra: &[&str]) -> Self {
        Self::launch(stream, bitrate_bps, extra, false).await
    }

    /// [`Lab::start`] behind [`Link::start_narrow`].
    async fn start_narrow(stream: &str, bitrate_bps: u64, extra: &[&str]) -> Self {
        Self::launch(stream, bitrate_bps, extra, true).await
    }

    async fn launch(stream: &str, bitrate_bps: u64, extra: &[&str], narrow: bool) -> Self {
        ingest_runtime::init_logs(ingest_runtime::LogFormat::Text);
        let dir = tempfile::tempdir().expect("tempdir");
        let origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx-rtmp");
        let link = if narrow {
            Link::start_narrow(origin.addr()).await
        } else {
            Link::start(origin.addr()).await
        }
        .expect("link");
        let template = format!("rtmp://{}/live/{{stream}}", link.addr);
        let mut flags = vec!["--upstream", template.as_str()];
        flags.extend_from_slice(extra);
        let pod = LocalPod::start("pod", &flags).await.expect("pod");
        let cfg = PublisherConfig {
            fps: 30,
            gop: 30,
            video_bitrate_bps: bitrate_bps,
            width: 320,
            height: 240,
            ..PublisherConfig::new(format!("rtmp://{}/live/{stream}", pod.rtmp))
        };
        let publisher = Publisher::new(cfg).expect("publisher");
        let progress = publisher.progress();
        let stop = CancellationToken::new();
        let publisher = tokio::spawn(publisher.run(stop.clone()));
        Self {
            origin,
            link,
            pod,
            progress,
            stop,
            publisher,
            _dir: dir,
        }
    }

    /// Stops the publisher and returns its report once the relay is gone.
    async fn finish(self) -> (PublisherReport, audit::AuditReport, Metrics) {
        self.stop.cancel();
        let report = self.publisher.await.expect("join").expect("publisher");
        let registry = self.pod.registry.clone();
        tokio::time::timeout(Duration::from_secs(40), async {
            while registry.relays_active() > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the relay flushed after the publisher left");
        assert_eq!(report.error, None);
        assert_eq!(report.connections, 1, "the publisher's one connection was never cut");
        let metrics = registry.metrics().clone();
        let record_dir = self.origin.record_dir();
        drop(self.origin); // nginx closes its recordings
        let result = audit::audit_dir(&report.stream, &report.sent, &record_dir).expect("audit");
        println!("{result}");
        (report, result, metrics)
    }
}

/// Nothing duplicated, reordered or unknown at the origin, and every
/// message missing there is explained by one of `outages`.
fn assert_only_outage_losses(report: &PublisherReport, result: &audit::AuditReport, outages: &[Outage]) {
    assert_eq!(
        (
            result.duplicated,
            result.out_of_order,
            result.unknown,
            result.timestamp_violations,
            result.timeline_violations
        ),
        (0, 0, 0, 0, 0),
        "{result}"
    );
    for (i, frame) in report.sent.iter().enumerate() {
        if result.lost_seqs.binary_search(&frame.seq).is_ok() {
            assert!(
                outages.iter().any(|o| o.may_lose(&report.sent, i)),
                "{:?} frame {} sent at {} went missing outside any outage ({})",
                frame.kind,
                frame.seq,
                frame.sent_at_ms,
                Outage::describe(outages)
            );
        }
    }
}

/// Waits (up to `limit`) until `done` holds, polling every 20 ms.
async fn within(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(started.elapsed())
}

/// The origin goes silent without a reset (a dead node, a partition): the
/// relay notices by itself, and reconnects once the origin is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_origin_is_noticed_and_the_relay_reconnects() {
    let mut lab = Lab::start("silent", 1_000_000, &[]).await;
    frames_more(&mut lab.progress, 90).await;
    let metrics = lab.pod.registry.metrics().clone();

    let began_ms = now_ms();
    lab.link.blackhole();
    // The link never resets the connection: only the relay can give it up.
    let detected = within(Duration::from_secs(20), || metrics.relay_reconnects.get() >= 1).await;
    let Some(detection) = detected else {
        panic!(
            "the relay did not notice the silent origin within 20 s (target ~10 s): {} reconnects, {} bytes relayed",
            metrics.relay_reconnects.get(),
            metrics.bytes_relayed.get()
        );
    };
    lab.link.restore();
    let over_ms = now_ms();
    let outages = [
        // What the relay wrote into the silence is gone.
        Outage {
            what: "origin silent",
            began_ms,
            over_ms,
        },
        // The publish after it starts mid-GOP: the recorder skips video
        // until the next keyframe.
        Outage {
            what: "reconnect",
            began_ms: over_ms,
            over_ms,
        },
    ];
    frames_more(&mut lab.progress, 90).await;
    let forwarded = lab.link.forwarded();
    let (report, result, metrics) = lab.finish().await;
    println!("silent origin noticed after {detection:?}; {forwarded} upstream connections");
    assert_eq!(metrics.relay_reconnects.get(), 1, "one reconnect for one silence");
    assert!(forwarded >= 2, "the relay published again once the origin was back");
    assert!(result.sessions >= 2, "{result}");
    assert_only_outage_losses(&report, &result, &outages);
}

/// A relay whose publisher left while the origin takes nothing (its writes
/// block) gives up at its flush timeout: a drain never waits on it longer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_to_a_silent_origin_gives_up_at_its_flush_timeout() {
    let flush_timeout = Duration::from_secs(2);
    // 8 Mbit/s fills the socket buffers on the way within seconds.
    let mut lab = Lab::start("wedged", 8_000_000, &["--relay-flush-timeout", "2s"]).await;
    frames_more(&mut lab.progress, 60).await;
    let metrics = lab.pod.registry.metrics().clone();
    lab.link.stall();
    // The relay's writes block: media piles up in its queue.
    let backlog = within(Duration::from_secs(30), || metrics.relay_buffer_bytes.get() > 1_000_000).await;
    assert!(backlog.is_some(), "the relay's writes never blocked");
    lab.stop.cancel();
    let report = (&mut lab.publisher).await.expect("join").expect("publisher");
    assert_eq!(report.error, None);
    let left = Instant::now();
    lab.pod.sigterm();
    let exited = tokio::time::timeout(Duration::from_secs(60), lab.pod.wait()).await;
    let waited = left.elapsed();
    println!("pod exited {waited:?} after the publisher left (flush timeout {flush_timeout:?})");
    assert!(exited.is_ok(), "the pod did not exit within 60 s");
    // Generous: the bound is the flush timeout, not the 10 s silence
    // detection nor the 30 s grace period.
    assert!(
        waited < flush_timeout + Duration::from_secs(5),
        "the drain waited {waited:?} on a relay to a silent origin (flush timeout {flush_timeout:?})"
    );
    assert_eq!(lab.pod.registry.relays_active(), 0);
}

/// The path resets in the middle of a burst (the relay flushing what it
/// buffered during an outage): what the origin had is not sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_in_the_middle_of_a_burst_duplicates_nothing() {
    // A narrow path: the relay's kernel takes each 256 kB write in parts.
    let mut lab = Lab::start_narrow("midbatch", 2_000_000, &[]).await;
    frames_more(&mut lab.progress, 60).await;
    let metrics = lab.pod.registry.metrics().clone();

    // An outage builds a backlog of several writes' worth (2 Mbit/s for 2 s+).
    let began_ms = now_ms();
    lab.link.cut().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The reconnect carries the handshake and the publish (about 5 kB),
    // then the backlog: the origin gets the first few kB of the first
    // write, the relay's kernel has taken more of it, the rest fails.
    lab.link.reset_after(12_000);
    lab.link.restore();
    let reset = within(Duration::from_secs(20), || lab.link.resets_mid_stream() >= 1).await;
    assert!(reset.is_some(), "the link reset the relay's connection mid-burst");
    let reset_ms = now_ms();
    let outages = [
        // The backlog: what was on the wire at the reset is lost.
        Outage {
            what: "cut, then a reset mid-burst",
            began_ms,
            over_ms: reset_ms,
        },
        // The publish after the reset starts mid-GOP: the recorder skips
        // video until the next keyframe.
        Outage {
            what: "reset",
            began_ms: reset_ms,
            over_ms: reset_ms,
        },
    ];
    frames_more(&mut lab.progress, 90).await;
    let forwarded = lab.link.forwarded();
    let (report, result, metrics_after) = lab.finish().await;
    println!(
        "{forwarded} upstream connections, {} reconnects, {} bytes relayed",
        metrics.relay_reconnects.get(),
        metrics.bytes_relayed.get()
    );
    assert!(forwarded >= 3, "a connection before, during and after the reset");
    assert_eq!(metrics_after.relay_reconnects.get(), 2, "the cut and the reset");
    assert_only_outage_losses(&report, &result, &outages);
}

/// A healthy origin is never taken for a silent one, even when the stream
/// is too slow to fill an acknowledgement window within the I/O timeout:
/// its answers to pings keep the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_origin_is_never_taken_for_silent() {
    let mut lab = Lab::start("healthy", 100_000, &["--relay-io-timeout", "1s"]).await;
    // Six seconds: several I/O timeouts, no acknowledgement window filled.
    frames_more(&mut lab.progress, 180).await;
    let forwarded = lab.link.forwarded();
    let (_, result, metrics) = lab.finish().await;
    assert_eq!(metrics.relay_reconnects.get(), 0, "no reconnect from a healthy origin");
    assert_eq!(forwarded, 1, "one upstream connection");
    assert!(result.lossless(), "{result}");
}
