//! The handover: two ingest pods behind a readiness-aware balancer, both
//! relaying to a real nginx-rtmp origin; the pod a capable publisher landed
//! on is drained; every audio/video message reaches the origin exactly once
//! and in order (payload hashes of the origin's recordings).

mod common;

use std::time::Duration;

use common::metric;
use ingest_pod::drain::{DrainSpec, IncapablePolicy};
use ingest_pod::registry::SignalKind;
use ingest_testkit::audit;
use ingest_testkit::ffmpeg::TestStream;
use ingest_testkit::lab::{Balancer, LocalPod};
use ingest_testkit::origin::Origin;
use ingest_testkit::publisher::{Publisher, PublisherConfig, PublisherReport};
use tokio_util::sync::CancellationToken;

struct Lab {
    _dir: tempfile::TempDir,
    origin: Option<Origin>,
    pods: Vec<LocalPod>,
    balancer: Balancer,
}

async fn lab(extra: &[&str]) -> Lab {
    ingest_runtime::init_logs(ingest_runtime::LogFormat::Text);
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx-rtmp");
    let mut args = vec!["--propagation-delay", "300ms", "--grace-period", "20s"];
    args.extend_from_slice(extra);
    let a = LocalPod::start_relaying_to("pod-a", &origin, &args)
        .await
        .expect("pod a");
    let b = LocalPod::start_relaying_to("pod-b", &origin, &args)
        .await
        .expect("pod b");
    let balancer = Balancer::start(vec![a.backend(), b.backend()]).await.expect("balancer");
    Lab {
        _dir: dir,
        origin: Some(origin),
        pods: vec![a, b],
        balancer,
    }
}

async fn until(what: &str, secs: u64, mut check: impl FnMut() -> bool) {
    for _ in 0..secs * 20 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {secs}s waiting for {what}");
}

fn config(url: String, go_away: bool, reconnect: bool) -> PublisherConfig {
    PublisherConfig {
        go_away,
        reconnect,
        fps: 30,
        gop: 15,
        video_bitrate_bps: 400_000,
        width: 320,
        height: 240,
        ..PublisherConfig::new(url)
    }
}

/// Runs one publisher through the balancer, calls `drain` on the pod it
/// landed on once it streams, and returns its report after the move.
async fn publish_through_drain(
    lab: &mut Lab,
    cfg: PublisherConfig,
    drain: impl FnOnce(&mut LocalPod),
) -> (PublisherReport, usize) {
    let publisher = Publisher::new(cfg).expect("publisher");
    let stream = publisher.stream().to_owned();
    let progress = publisher.progress();
    let stop = CancellationToken::new();
    let task = tokio::spawn(publisher.run(stop.clone()));
    let p = progress.clone();
    until("2 s of media", 20, || p.borrow().video_frames >= 60).await;
    let landed = lab
        .pods
        .iter()
        .position(|pod| {
            pod.registry
                .connections()
                .iter()
                .any(|c| c.stream.as_deref() == Some(stream.as_str()))
        })
        .expect("publisher on a pod");
    drain(&mut lab.pods[landed]);
    let p = progress.clone();
    until("the publisher moved", 20, || p.borrow().connections >= 2).await;
    let drained = lab.pods[landed].registry.clone();
    until("the drained pod emptied and flushed", 20, || {
        drained.connection_count() == 0 && drained.relays_active() == 0
    })
    .await;
    // Keep streaming on the new pod for a while, then stop cleanly.
    let p = progress.clone();
    let moved_at = p.borrow().video_frames;
    until("1 s more on the new pod", 20, || {
        p.borrow().video_frames >= moved_at + 30
    })
    .await;
    stop.cancel();
    let report = task.await.expect("join").expect("publisher");
    for pod in &lab.pods {
        let r = pod.registry.clone();
        // The relay can finish before the session reads the publisher's
        // close (its deleteStream ends the publish first).
        until("relays finished and publishers gone", 20, || {
            r.relays_active() == 0 && r.connection_count() == 0
        })
        .await;
    }
    (report, landed)
}

fn audit(lab: &mut Lab, report: &PublisherReport) -> audit::AuditReport {
    let origin = lab.origin.take().expect("origin");
    let dir = origin.record_dir();
    drop(origin); // nginx closes its recordings
    let result = audit::audit_dir(&report.stream, &report.sent, &dir).expect("audit");
    println!("{result}");
    println!("handover gap at the publisher: {:?}", report.max_switch_gap());
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_away_through_a_sigterm_drain_loses_nothing() {
    let mut lab = lab(&[]).await;
    let url = format!("rtmp://{}/live/goaway", lab.balancer.addr);
    let (report, landed) = publish_through_drain(&mut lab, config(url, true, false), LocalPod::sigterm).await;
    assert_eq!(report.signals.len(), 1);
    assert_eq!(report.signals[0].0, SignalKind::GoAway);
    assert_eq!(report.connections, 2);
    assert_eq!(report.unplanned_reconnects, 0);
    lab.pods[landed].wait().await.expect("the drained pod exited cleanly");
    let result = audit(&mut lab, &report);
    assert!(result.lossless(), "{result}");
    assert_eq!(result.recordings, 2, "one upstream publish per pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_request_without_redirect_loses_nothing() {
    let mut lab = lab(&[]).await;
    let url = format!("rtmp://{}/live/rr", lab.balancer.addr);
    let spec = |id: &str| DrainSpec {
        id: id.into(),
        deadline: Duration::from_secs(20),
        rate: 10.0,
        max_in_flight: 0,
        incapable: IncapablePolicy::Disconnect,
        redirects: vec![],
        propagation_delay: Duration::from_millis(300),
    };
    let (report, landed) = publish_through_drain(&mut lab, config(url, true, true), |pod| {
        pod.drainer.start(spec("rr-1")).expect("drain");
    })
    .await;
    assert_eq!(
        report.signals,
        vec![(SignalKind::ReconnectRequest, None)],
        "Reconnect Request preferred over Go Away"
    );
    handover_measured(&lab.pods[landed], &lab.pods[1 - landed]).await;
    let result = audit(&mut lab, &report);
    assert!(result.lossless(), "{result}");
}

/// The pods' own measures of a Reconnect Request move from `old` to `new`.
async fn handover_measured(old: &LocalPod, new: &LocalPod) {
    let (old, new) = (old.http.to_string(), new.http.to_string());
    let signal = "ingest_signal_to_disconnect_seconds_count{kind=\"reconnect_request\"}";
    assert!(metric(&old, signal).await >= 1.0, "the move is timed on the old pod");
    let first = "ingest_relay_first_delivery_seconds_count";
    assert!(
        metric(&new, first).await >= 1.0,
        "the new pod's wait at the origin is timed"
    );
    assert!(metric(&old, first).await >= 1.0);
    for pod in [&old, &new] {
        let bytes = |capability: &str| format!("ingest_received_bytes_total{{capability=\"{capability}\"}}");
        assert!(metric(pod, &bytes("reconnect_request")).await > 0.0);
        assert_eq!(
            metric(pod, &bytes("incapable")).await,
            0.0,
            "its connect counts as capable"
        );
    }
    for (which, pod) in [("old", &old), ("new", &new)] {
        let page = common::http_get(pod, "/metrics").await;
        let measures = [
            "signal_to_disconnect",
            "first_delivery",
            "received_bytes",
            "drain_deadline",
            "drain_cut",
        ];
        for line in page.lines() {
            if measures.iter().any(|n| line.contains(n)) && !line.contains("_bucket") {
                println!("{which} pod: {line}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_request_with_redirect_goes_to_the_named_pod() {
    let mut lab = lab(&[]).await;
    let url = format!("rtmp://{}/live/redirect", lab.balancer.addr);
    let targets: Vec<String> = lab.pods.iter().map(|p| format!("rtmp://{}/live", p.rtmp)).collect();
    let (report, landed) = publish_through_drain(&mut lab, config(url, false, true), |pod| {
        let other = targets
            .iter()
            .find(|t| !t.contains(&pod.rtmp.to_string()))
            .expect("other pod")
            .clone();
        let spec = DrainSpec {
            id: "redirect-1".into(),
            deadline: Duration::from_secs(20),
            rate: 0.0,
            max_in_flight: 1,
            incapable: IncapablePolicy::Wait,
            redirects: vec![other],
            propagation_delay: Duration::from_millis(300),
        };
        pod.drainer.start(spec).expect("drain");
    })
    .await;
    let other = 1 - landed;
    assert_eq!(report.signals.len(), 1);
    assert_eq!(report.signals[0].1.as_deref(), Some(targets[other].as_str()));
    assert_eq!(
        lab.pods[other].registry.totals().ended,
        1,
        "the publisher ended on the redirect target"
    );
    let result = audit(&mut lab, &report);
    assert!(result.lossless(), "{result}");
}

/// ffmpeg announces neither signal: the SIGTERM drain leaves it alone until
/// the deadline, then the policy applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_applies_the_incapable_policy_to_ffmpeg() {
    for (policy, expect_cut_by_deadline) in [("disconnect", true), ("wait", false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx-rtmp");
        let args = [
            "--propagation-delay",
            "100ms",
            "--drain-deadline",
            "1500ms",
            "--grace-period",
            "4s",
            "--incapable-policy",
            policy,
        ];
        let mut pod = LocalPod::start_relaying_to("ff", &origin, &args).await.expect("pod");
        let stream = TestStream {
            width: 160,
            height: 120,
            fps: 15,
            gop: 15,
            audio: false,
            loglevel: "quiet",
            ..TestStream::new(60)
        };
        let mut ffmpeg = stream
            .command(&format!("rtmp://{}/live/ff-{policy}", pod.rtmp))
            .kill_on_drop(true)
            .spawn()
            .expect("ffmpeg");
        until("ffmpeg publishing", 20, || pod.publishers() > 0).await;
        pod.sigterm();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(
            pod.registry.connection_count(),
            1,
            "{policy}: not signalled, not cut before the deadline"
        );
        assert_eq!(pod.registry.totals().signalled, 0);
        // Between the deadline (1.5 s) and the end of the grace period (4 s).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let left = if expect_cut_by_deadline { 0 } else { 1 };
        assert_eq!(
            pod.registry.connection_count(),
            left,
            "{policy}: state after the deadline"
        );
        pod.wait().await.expect("pod exit");
        let status = tokio::time::timeout(Duration::from_secs(10), ffmpeg.wait())
            .await
            .expect("ffmpeg ends")
            .expect("wait");
        assert!(!status.success(), "{policy}: ffmpeg was cut in the end");
        drop(origin);
    }
}

/// An encoder that leaves its old connection open after moving (OBS's
/// recording helper inherits the socket) but sends nothing on it: the pod
/// closes it after `--signalled-quiet-close` and drains long before the
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signalled_publisher_that_goes_quiet_is_closed_well_before_the_deadline() {
    use ingest_pod::rtmp::client;
    use ingest_rtmp::amf0::Value;
    use ingest_rtmp::message::Message;
    use ingest_rtmp::url::RtmpUrl;

    let lab = lab(&["--signalled-quiet-close", "1s"]).await;
    let pod = &lab.pods[0];
    let url = RtmpUrl::parse(&format!("rtmp://{}/live/quiet", pod.rtmp)).expect("url");
    let extra = vec![("supportsGoAway".to_owned(), Value::Boolean(true))];
    let mut publishing = client::publish(&url, "FMLE/3.0", extra, Duration::from_secs(5))
        .await
        .expect("publish");
    for i in 0..10u32 {
        // An AVC NAL unit packet (keyframe first), enough for the pod to relay.
        let mut payload = vec![if i == 0 { 0x17 } else { 0x27 }, 1, 0, 0, 0];
        payload.extend_from_slice(&i.to_be_bytes());
        publishing.writer.queue(&Message::Video {
            stream_id: publishing.stream_id,
            timestamp: i * 33,
            payload: payload.into(),
        });
    }
    publishing.writer.flush().await.expect("send");
    until("the pod counts the publisher", 10, || {
        pod.registry.connection_count() == 1
    })
    .await;

    let started = std::time::Instant::now();
    pod.drainer
        .start(DrainSpec {
            id: "quiet".into(),
            deadline: Duration::from_secs(20),
            rate: 0.0,
            max_in_flight: 0,
            incapable: IncapablePolicy::Disconnect,
            redirects: vec![],
            propagation_delay: Duration::from_millis(100),
        })
        .expect("drain");
    // The connection stays open on our side, silent, as OBS's helper keeps it.
    let registry = pod.registry.clone();
    until("the quiet connection closed by the pod", 10, || {
        registry.connection_count() == 0
    })
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "closed after {took:?}: at the deadline, not when it went quiet"
    );
    let status = pod.drainer.status().expect("drain status");
    assert_eq!(
        status.migrated, 1,
        "a quiet signalled publisher counts as moved: {status:?}"
    );
    drop(publishing);
}

/// A publisher moved twice in quick succession, A→B→C: B is drained the
/// moment the publisher lands on it, while A's relay still holds the
/// stream at the origin. B's backlog must reach the origin before C's
/// media: B signals the publisher only once B's relay holds the stream
/// upstream and has delivered its backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chained_move_keeps_order() {
    let mut lab = lab(&[]).await;
    let c = LocalPod::start_relaying_to("pod-c", lab.origin.as_ref().expect("origin"), &[])
        .await
        .expect("pod c");
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    let url = format!("rtmp://{}/live/chain", a.rtmp);
    let to = |pod: &LocalPod| format!("rtmp://{}/live", pod.rtmp);
    let spec = |id: &str, redirect: String| DrainSpec {
        id: id.into(),
        deadline: Duration::from_secs(20),
        rate: 0.0,
        max_in_flight: 0,
        incapable: IncapablePolicy::Disconnect,
        redirects: vec![redirect],
        propagation_delay: Duration::ZERO,
    };
    let publisher = Publisher::new(config(url, false, true)).expect("publisher");
    let progress = publisher.progress();
    let stop = CancellationToken::new();
    let task = tokio::spawn(publisher.run(stop.clone()));
    let p = progress.clone();
    until("2 s of media on pod a", 20, || p.borrow().video_frames >= 60).await;
    a.drainer.start(spec("a", to(b))).expect("drain a");
    until("the publisher on pod b", 20, || b.publishers() > 0).await;
    b.drainer.start(spec("b", to(&c))).expect("drain b");
    let p = progress.clone();
    until("the publisher on pod c", 20, || p.borrow().connections >= 3).await;
    for pod in [a, b] {
        let r = pod.registry.clone();
        until("pods a and b emptied and flushed", 30, || {
            r.connection_count() == 0 && r.relays_active() == 0
        })
        .await;
    }
    let p = progress.clone();
    let moved_at = p.borrow().video_frames;
    until("1 s more on pod c", 20, || p.borrow().video_frames >= moved_at + 30).await;
    stop.cancel();
    let report = task.await.expect("join").expect("publisher");
    let r = c.registry.clone();
    until("pod c's relay finished", 20, || r.relays_active() == 0).await;
    assert_eq!((report.connections, report.unplanned_reconnects), (3, 0), "{report:?}");
    let result = audit(&mut lab, &report);
    assert!(result.lossless(), "{result}");
}
