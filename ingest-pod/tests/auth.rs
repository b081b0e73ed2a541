//! Publish authorization against a real HTTP endpoint the test runs: allow,
//! deny, allow under another upstream name, no answer in time; and a
//! publisher moved between pods is asked about again on the new pod.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use ingest_pod::drain::{DrainSpec, IncapablePolicy};
use ingest_pod::rtmp::client;
use ingest_rtmp::url::RtmpUrl;
use ingest_testkit::lab::LocalPod;
use ingest_testkit::origin::Origin;
use ingest_testkit::publisher::{Publisher, PublisherConfig};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

type Seen = Arc<Mutex<Vec<Value>>>;

/// The callback: `good-*` allowed, `alias` allowed as `real-name`, `slow`
/// answered after 2 s, anything else refused with 403. Records each request.
async fn callback(State(seen): State<Seen>, Json(req): Json<Value>) -> (StatusCode, Json<Value>) {
    seen.lock().expect("lock").push(req.clone());
    match req["key"].as_str().unwrap_or("") {
        k if k.starts_with("good") => (StatusCode::OK, Json(json!({}))),
        "alias" => (StatusCode::OK, Json(json!({ "upstream_name": "real-name" }))),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            (StatusCode::OK, Json(json!({})))
        }
        _ => (StatusCode::FORBIDDEN, Json(json!({ "error": "unknown key" }))),
    }
}

async fn serve_callback() -> (String, Seen) {
    let seen = Seen::default();
    let app = axum::Router::new()
        .route("/auth", post(callback))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/auth"), seen)
}

async fn pod(name: &str, origin: &Origin, auth: &str) -> LocalPod {
    LocalPod::start_relaying_to(
        name,
        origin,
        &[
            "--publish-auth-url",
            auth,
            "--publish-auth-timeout",
            "500ms",
            "--propagation-delay",
            "100ms",
        ],
    )
    .await
    .expect("pod")
}

/// A publish of `key` on `pod`: `Ok` if accepted, else the refusal.
async fn publish(pod: &LocalPod, key: &str) -> Result<(), String> {
    let url = RtmpUrl::parse(&format!("rtmp://{}/live/{key}", pod.rtmp)).expect("url");
    client::publish(&url, "test", Vec::new(), Duration::from_secs(5))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_allows_denies_renames_and_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx-rtmp");
    let (auth, seen) = serve_callback().await;
    let a = pod("auth-a", &origin, &auth).await;

    assert_eq!(publish(&a, "good-1").await, Ok(()));
    let denied = publish(&a, "stolen").await.expect_err("refused");
    assert!(
        denied.contains("NetStream.Publish.BadAuth") && denied.contains("403"),
        "{denied}"
    );
    let slow = publish(&a, "slow").await.expect_err("refused");
    assert!(slow.contains("did not answer within 500ms"), "{slow}");
    assert_eq!(publish(&a, "alias").await, Ok(()));

    let m = a.registry.metrics();
    let count = |result| {
        m.publish_auth
            .get_or_create(&ingest_pod::metrics::ResultLabel { result })
            .get()
    };
    assert_eq!((count("allow"), count("deny"), count("timeout")), (2, 1, 1));
    let requests = seen.lock().expect("lock").clone();
    let first = &requests[0];
    assert_eq!(
        (first["app"].as_str(), first["key"].as_str(), first["pod"].as_str()),
        (Some("live"), Some("good-1"), Some("auth-a"))
    );
    assert!(
        first["client_addr"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{first}"
    );
    assert_eq!(
        first["capabilities"],
        json!({ "go_away": false, "reconnect_request": false })
    );

    // The renamed stream reaches the origin as `real-name`.
    let recorded = || {
        std::fs::read_dir(origin.record_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    for _ in 0..100 {
        if recorded().iter().any(|f| f.starts_with("real-name")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let files = recorded();
    assert!(files.iter().any(|f| f.starts_with("real-name")), "{files:?}");
    assert!(!files.iter().any(|f| f.starts_with("alias")), "{files:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_publisher_is_authorized_again_on_the_new_pod() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx-rtmp");
    let (auth, seen) = serve_callback().await;
    let a = pod("auth-a", &origin, &auth).await;
    let b = pod("auth-b", &origin, &auth).await;
    let cfg = PublisherConfig {
        go_away: false,
        reconnect: true,
        fps: 25,
        gop: 10,
        video_bitrate_bps: 200_000,
        width: 160,
        height: 120,
        ..PublisherConfig::new(format!("rtmp://{}/live/good-mover", a.rtmp))
    };
    let publisher = Publisher::new(cfg).expect("publisher");
    let progress = publisher.progress();
    let stop = CancellationToken::new();
    let task = tokio::spawn(publisher.run(stop.clone()));
    for _ in 0..100 {
        if progress.borrow().video_frames >= 25 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.drainer
        .start(DrainSpec {
            id: "move".into(),
            deadline: Duration::from_secs(20),
            rate: 0.0,
            max_in_flight: 0,
            incapable: IncapablePolicy::Disconnect,
            redirects: vec![format!("rtmp://{}/live", b.rtmp)],
            propagation_delay: Duration::from_millis(100),
        })
        .expect("drain");
    for _ in 0..200 {
        if progress.borrow().connections >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let report = task.await.expect("join").expect("report");
    assert_eq!((report.connections, report.unplanned_reconnects), (2, 0), "{report:?}");
    let pods: Vec<(String, String)> = seen
        .lock()
        .expect("lock")
        .iter()
        .map(|r| {
            (
                r["pod"].as_str().unwrap_or("").to_owned(),
                r["key"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        pods,
        [
            ("auth-a".to_owned(), "good-mover".to_owned()),
            ("auth-b".to_owned(), "good-mover".to_owned())
        ],
        "asked once on each pod, with the same key"
    );
}
