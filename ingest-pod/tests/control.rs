//! The control API with a real tonic client against a real ingest pod and
//! real publishers (ffmpeg as an incapable one, the capable test publisher).

use std::process::Stdio;
use std::time::Duration;

use ingest_proto::v1::ingest_control_client::IngestControlClient;
use ingest_proto::v1::{
    CancelDrainRequest, DrainPhase, GetStatusRequest, IncapablePolicy, PodStatus, StartDrainRequest, WatchStatusRequest,
};
use ingest_testkit::ffmpeg::TestStream;
use ingest_testkit::lab::LocalPod;
use ingest_testkit::origin::Origin;
use tokio::process::{Child, Command};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

mod common;

const TOKEN: &str = "s3cret-token";

type Interceptor = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Client = IngestControlClient<InterceptedService<Channel, Interceptor>>;

async fn client(pod: &LocalPod, token: Option<&str>) -> Client {
    let addr = pod.control.expect("control API served");
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let header = token.map(|t| {
        format!("Bearer {t}")
            .parse::<tonic::metadata::MetadataValue<_>>()
            .expect("header")
    });
    let interceptor: Interceptor = Box::new(move |mut req: tonic::Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    });
    IngestControlClient::with_interceptor(channel, interceptor)
}

async fn pod(name: &str, origin: &Origin, extra: &[&str]) -> LocalPod {
    let mut args = vec!["--control-token", TOKEN, "--propagation-delay", "200ms"];
    args.extend_from_slice(extra);
    LocalPod::start_relaying_to(name, origin, &args)
        .await
        .expect("start pod")
}

/// ffmpeg publishing `seconds` of a small stream (160x120, 15 fps) to `url`.
fn ffmpeg(url: &str, seconds: u32) -> Child {
    TestStream {
        width: 160,
        height: 120,
        fps: 15,
        gop: 15,
        ..TestStream::new(seconds)
    }
    .command(url)
    .stdin(Stdio::null())
    .kill_on_drop(true)
    .spawn()
    .expect("spawn ffmpeg")
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn drain_req(id: &str, deadline: Duration, policy: IncapablePolicy) -> StartDrainRequest {
    StartDrainRequest {
        drain_id: id.into(),
        deadline: Some(deadline.try_into().expect("duration")),
        rate: 10.0,
        incapable_policy: policy.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_rejects_missing_or_wrong_tokens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx");
    let pod = pod("auth", &origin, &[]).await;
    let err = client(&pod, None)
        .await
        .get_status(GetStatusRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = client(&pod, Some("wrong"))
        .await
        .start_drain(drain_req("x", Duration::from_secs(5), IncapablePolicy::Wait))
        .await;
    assert_eq!(err.expect_err("wrong token").code(), tonic::Code::Unauthenticated);
    assert!(pod.registry.serving(), "a refused call changed nothing");
    let status = client(&pod, Some(TOKEN))
        .await
        .get_status(GetStatusRequest::default())
        .await
        .expect("token")
        .into_inner();
    assert_eq!((status.pod.as_str(), status.serving), ("auth", true));
    // Bad input gets a clear error.
    let mut c = client(&pod, Some(TOKEN)).await;
    let bad = c
        .start_drain(StartDrainRequest {
            drain_id: "d".into(),
            ..Default::default()
        })
        .await
        .expect_err("no deadline");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("deadline"), "{}", bad.message());
    let mut r = drain_req("d", Duration::from_secs(5), IncapablePolicy::Wait);
    r.redirect_tc_urls = vec!["http://nope".into()];
    assert_eq!(
        c.start_drain(r).await.expect_err("bad url").code(),
        tonic::Code::InvalidArgument
    );
    let hidden = c
        .get_status(GetStatusRequest {
            reveal_stream_keys: true,
            counts_only: false,
        })
        .await
        .expect_err("keys hidden");
    assert_eq!(hidden.code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incapable_policy_at_the_deadline_and_cancel_restores_readiness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx");
    let pod = pod("policy", &origin, &[]).await;
    let mut c = client(&pod, Some(TOKEN)).await;
    let control = pod.control.expect("control");
    let mut health = HealthClient::new(
        Channel::from_shared(format!("http://{control}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect"),
    );
    let serving = |s: ServingStatus| s as i32;
    let check = HealthCheckRequest {
        service: "ingest.control.v1.IngestControl".into(),
    };
    assert_eq!(
        health.check(check.clone()).await.expect("health").into_inner().status,
        serving(ServingStatus::Serving)
    );

    // Two ffmpeg publishers: one is waited for, then both handled at the deadline.
    let url = format!("rtmp://{}/live", pod.rtmp);
    let mut f1 = ffmpeg(&format!("{url}/ff1"), 60);
    let mut f2 = ffmpeg(&format!("{url}/ff2"), 60);
    wait_for("two publishers", || pod.publishers() == 2).await;

    // Policy wait: at the deadline nobody is cut, the phase says TimedOut.
    let started = c
        .start_drain(drain_req("wait-1", Duration::from_millis(800), IncapablePolicy::Wait))
        .await
        .expect("start")
        .into_inner();
    assert!(started.started);
    assert_eq!(
        health.check(check.clone()).await.expect("health").into_inner().status,
        serving(ServingStatus::NotServing)
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = c
        .get_status(GetStatusRequest::default())
        .await
        .expect("status")
        .into_inner();
    let drain = st.drain.expect("drain");
    assert_eq!(
        (drain.phase(), drain.remaining, drain.signalled),
        (DrainPhase::TimedOut, 2, 0)
    );
    assert_eq!(st.counts.expect("counts").incapable, 2);
    assert!(
        st.publishers.iter().all(|p| p.stream.starts_with("hmac:")),
        "stream keys are hashed"
    );

    // Cancel: serving again, publishers kept.
    let cancelled = c
        .cancel_drain(CancelDrainRequest {
            drain_id: "wait-1".into(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert!(cancelled.cancelled);
    assert!(pod.registry.serving());
    assert_eq!(
        health.check(check.clone()).await.expect("health").into_inner().status,
        serving(ServingStatus::Serving)
    );
    assert_eq!(pod.registry.connection_count(), 2);

    // Policy disconnect: both are closed at the deadline, the drain completes.
    c.start_drain(drain_req(
        "disc-1",
        Duration::from_millis(500),
        IncapablePolicy::Disconnect,
    ))
    .await
    .expect("start");
    wait_for("incapable publishers disconnected", || {
        pod.registry.connection_count() == 0
    })
    .await;
    let reg2 = pod.registry.clone();
    wait_for("relays flushed", || reg2.relays_active() == 0).await;
    let st = c
        .get_status(GetStatusRequest::default())
        .await
        .expect("status")
        .into_inner();
    assert_eq!(st.drain.expect("drain").phase(), DrainPhase::TimedOut);
    assert_eq!(st.total_ended, 2);
    let _ = f1.kill().await;
    let _ = f2.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_drain_is_idempotent_and_watch_streams_phases_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx");
    let pod = pod("watch", &origin, &[]).await;
    let mut c = client(&pod, Some(TOKEN)).await;
    let mut watch = c
        .watch_status(WatchStatusRequest {
            min_interval: Some(Duration::from_millis(50).try_into().expect("d")),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let first: PodStatus = watch.message().await.expect("stream").expect("first status");
    assert!(first.serving && first.drain.is_none());

    let mut ff = ffmpeg(&format!("rtmp://{}/live/ff", pod.rtmp), 60);
    wait_for("ffmpeg publishing", || pod.publishers() > 0).await;
    let req = drain_req("idem", Duration::from_secs(2), IncapablePolicy::Disconnect);
    let a = c.start_drain(req.clone()).await.expect("start").into_inner();
    let b = c.start_drain(req).await.expect("again").into_inner();
    assert!(a.started && !b.started && !b.replaced);
    assert_eq!(
        a.drain.as_ref().map(|d| d.started_at),
        b.drain.as_ref().map(|d| d.started_at)
    );
    let other = c
        .start_drain(drain_req("idem-2", Duration::from_secs(2), IncapablePolicy::Disconnect))
        .await
        .expect("replace")
        .into_inner();
    assert!(other.replaced && !other.started);

    let mut phases = Vec::new();
    while let Ok(Some(st)) = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("watch in time")
    {
        let Some(d) = st.drain else { continue };
        if phases.last() != Some(&d.phase()) {
            phases.push(d.phase());
        }
        if d.phase() == DrainPhase::TimedOut && d.remaining == 0 && d.relays_active == 0 {
            break;
        }
    }
    assert_eq!(phases.first(), Some(&DrainPhase::Propagating));
    assert_eq!(phases.last(), Some(&DrainPhase::TimedOut));
    let order = |p: &DrainPhase| *p as i32;
    assert!(
        phases.windows(2).all(|w| order(&w[0]) < order(&w[1])),
        "phases in order: {phases:?}"
    );
    let _ = ff.kill().await;
}

/// grpcurl (built by .ci/setup) lists the service through reflection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_the_service_by_reflection() {
    let grpcurl = common::grpcurl();
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx");
    let pod = pod("grpcurl", &origin, &[]).await;
    let addr = pod.control.expect("control").to_string();
    let list = Command::new(&grpcurl)
        .args(["-plaintext", &addr, "list"])
        .output()
        .await
        .expect("grpcurl list");
    let out = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success(),
        "grpcurl list failed: {}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(out.lines().any(|l| l == "ingest.control.v1.IngestControl"), "{out}");
    assert!(out.lines().any(|l| l == "grpc.health.v1.Health"), "{out}");
    let auth = format!("authorization: Bearer {TOKEN}");
    let call = Command::new(&grpcurl)
        .args([
            "-plaintext",
            "-H",
            &auth,
            &addr,
            "ingest.control.v1.IngestControl/GetStatus",
        ])
        .output()
        .await
        .expect("grpcurl call");
    let out = String::from_utf8_lossy(&call.stdout);
    assert!(call.status.success() && out.contains("\"pod\": \"grpcurl\""), "{out}");
    let denied = Command::new(&grpcurl)
        .args(["-plaintext", &addr, "ingest.control.v1.IngestControl/GetStatus"])
        .output()
        .await
        .expect("grpcurl call");
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("Unauthenticated"));
}

/// StartDrain over gRPC moves capable publishers of both kinds, with a
/// redirect for Reconnect Request, and the pod's counts reach zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_drain_moves_capable_publishers_and_counts_reach_zero() {
    use ingest_testkit::lab::Balancer;
    use ingest_testkit::publisher::{Publisher, PublisherConfig};

    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx");
    let a = pod("move-a", &origin, &[]).await;
    let b = pod("move-b", &origin, &[]).await;
    // Pod b is not ready yet: every publisher lands on pod a.
    b.registry.set_serving(false);
    let balancer = Balancer::start(vec![a.backend(), b.backend()]).await.expect("balancer");
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for (i, (go_away, reconnect)) in [(true, false), (true, false), (false, true), (true, true)]
        .into_iter()
        .enumerate()
    {
        let cfg = PublisherConfig {
            go_away,
            reconnect,
            fps: 25,
            gop: 10,
            video_bitrate_bps: 200_000,
            width: 160,
            height: 120,
            ..PublisherConfig::new(format!("rtmp://{}/live/cap{i}", balancer.addr))
        };
        tasks.push(tokio::spawn(Publisher::new(cfg).expect("publisher").run(stop.clone())));
    }
    wait_for("4 publishers on pod a", || a.publishers() == 4).await;
    b.registry.set_serving(true);
    let mut c = client(&a, Some(TOKEN)).await;
    let st = c
        .get_status(GetStatusRequest::default())
        .await
        .expect("status")
        .into_inner();
    let counts = st.counts.expect("counts");
    assert_eq!(
        (
            counts.go_away,
            counts.reconnect_request,
            counts.incapable,
            counts.publishing
        ),
        (2, 2, 0, 4)
    );
    assert_eq!(st.publishers.len(), 4);
    // What the operator asks: the same counts, no per-publisher list.
    let counts_only = c
        .get_status(GetStatusRequest {
            counts_only: true,
            ..GetStatusRequest::default()
        })
        .await
        .expect("status")
        .into_inner();
    assert_eq!(counts_only.counts, st.counts);
    assert!(counts_only.publishers.is_empty());

    let redirect = format!("rtmp://{}/live", b.rtmp);
    let mut req = drain_req("move-1", Duration::from_secs(20), IncapablePolicy::Disconnect);
    req.redirect_tc_urls = vec![redirect];
    req.propagation_delay = Some(Duration::from_millis(100).try_into().expect("d"));
    c.start_drain(req).await.expect("start");
    let mut watch = c
        .watch_status(WatchStatusRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let mut last = None;
    while let Ok(Some(st)) = tokio::time::timeout(Duration::from_secs(15), watch.message())
        .await
        .expect("in time")
    {
        let d = st.drain.clone().expect("drain");
        if d.phase() == DrainPhase::Drained {
            last = Some(d);
            break;
        }
    }
    let drained = last.expect("reached Drained");
    assert_eq!(
        (
            drained.signalled,
            drained.migrated,
            drained.remaining,
            drained.relays_active
        ),
        (4, 4, 0, 0)
    );
    // Reconnect Request went with the redirect to pod b; Go Away publishers
    // reconnected through the balancer, which no longer picks pod a.
    wait_for("every publisher on pod b", || b.publishers() == 4).await;
    let totals = a.registry.totals();
    assert_eq!((totals.signalled, totals.migrated, totals.ended), (4, 4, 0));
    stop.cancel();
    for t in tasks {
        let report = t.await.expect("join").expect("report");
        assert_eq!(report.signals.len(), 1, "{}: signalled exactly once", report.stream);
        assert_eq!(report.unplanned_reconnects, 0);
    }
}

/// A pod that got SIGTERM drains to the end whatever the operator says
/// afterwards: an uncordon's CancelDrain is refused with a reason, and every
/// publisher is signalled and moves before the grace period ends (none is
/// cut at grace end because the cancel stopped the waves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_outlives_a_cancel() {
    use ingest_testkit::lab::Balancer;
    use ingest_testkit::publisher::{Publisher, PublisherConfig};

    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx");
    let grace = ["--grace-period", "12s", "--drain-deadline", "10s"];
    let mut a = pod("term-a", &origin, &grace).await;
    let b = pod("term-b", &origin, &[]).await;
    b.registry.set_serving(false);
    let balancer = Balancer::start(vec![a.backend(), b.backend()]).await.expect("balancer");
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let cfg = PublisherConfig {
            go_away: true,
            reconnect: false,
            fps: 25,
            gop: 10,
            video_bitrate_bps: 200_000,
            width: 160,
            height: 120,
            ..PublisherConfig::new(format!("rtmp://{}/live/term{i}", balancer.addr))
        };
        tasks.push(tokio::spawn(Publisher::new(cfg).expect("publisher").run(stop.clone())));
    }
    wait_for("4 publishers on pod a", || a.publishers() == 4).await;
    b.registry.set_serving(true);

    // The operator's drain, one signal a second; then the rollout's SIGTERM.
    let mut c = client(&a, Some(TOKEN)).await;
    let mut req = drain_req("node-drain", Duration::from_secs(60), IncapablePolicy::Disconnect);
    req.rate = 1.0;
    req.propagation_delay = Some(Duration::from_millis(100).try_into().expect("d"));
    c.start_drain(req).await.expect("start");
    a.sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The uncordon arrives: the drain stays.
    let resp = c
        .cancel_drain(CancelDrainRequest {
            drain_id: "node-drain".into(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert!(!resp.cancelled, "a SIGTERM drain was cancelled: {resp:?}");
    assert!(resp.reason.contains("SIGTERM"), "the refusal says why: {resp:?}");
    assert!(!a.registry.serving(), "the terminating pod serves again");

    tokio::time::timeout(Duration::from_secs(20), a.wait())
        .await
        .expect("the pod exits within its grace period")
        .expect("clean exit");
    let totals = a.registry.totals();
    assert_eq!((totals.signalled, totals.migrated), (4, 4), "{totals:?}");
    stop.cancel();
    for t in tasks {
        let report = t.await.expect("join").expect("report");
        assert_eq!(report.unplanned_reconnects, 0, "{}: cut at grace end", report.stream);
        assert_eq!(report.signals.len(), 1, "{}: signalled exactly once", report.stream);
    }
}
