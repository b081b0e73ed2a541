//! `/healthz`, `/readyz`, `/metrics` and `/status` of a running pod.

use std::net::SocketAddr;
use std::time::Duration;

use ingest_pod::drain::{DrainSpec, IncapablePolicy};
use ingest_testkit::lab::LocalPod;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal HTTP/1.1 GET: (status code, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_drain_and_metrics_are_exported() {
    let pod = LocalPod::start("http", &[]).await.expect("pod");
    assert_eq!(get(pod.http, "/healthz").await.0, 200);
    assert_eq!(get(pod.http, "/readyz").await.0, 200);
    let spec = DrainSpec {
        id: "h".into(),
        deadline: Duration::from_secs(5),
        rate: 0.0,
        max_in_flight: 0,
        incapable: IncapablePolicy::Wait,
        redirects: vec![],
        propagation_delay: Duration::from_secs(1),
    };
    pod.drainer.start(spec).expect("drain");
    let (code, body) = get(pod.http, "/readyz").await;
    assert_eq!((code, body.as_str()), (503, "draining\n"), "unready at once");
    assert_eq!(get(pod.http, "/healthz").await.0, 200, "still alive");
    let (_, metrics) = get(pod.http, "/metrics").await;
    for name in [
        "ingest_draining 1",
        "ingest_drain_phase{phase=\"propagating\"} 1",
        "ingest_connections{capability=\"incapable\"}",
        "ingest_received_bytes_total{capability=\"reconnect_request\"} 0",
        "# TYPE ingest_signal_to_disconnect_seconds histogram",
        "ingest_signal_to_disconnect_seconds_count{kind=\"go_away\"} 0",
        "# TYPE ingest_relay_first_delivery_seconds histogram",
        "# TYPE ingest_drain_deadline_timestamp_seconds gauge",
        "ingest_drain_cut_publishers_total 0",
        "# EOF",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }
    let deadline_at = pod.drainer.status().expect("a drain").deadline_at;
    let unix = deadline_at.duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    let exported: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ingest_drain_deadline_timestamp_seconds ")?.parse().ok())
        .expect("the deadline gauge");
    // The encoder prints floats its own way (Grisu2): compare values, not text.
    assert!(
        (exported - unix.as_secs_f64()).abs() < 1e-3,
        "the drain's deadline {unix:?}, exported {exported}"
    );
    let (_, status) = get(pod.http, "/status").await;
    let v: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert_eq!(v["serving"], false);
    assert_eq!(v["drain"]["id"], "h");
    pod.drainer.cancel().expect("a drain runs");
    assert_eq!(get(pod.http, "/readyz").await.0, 200, "ready again after cancel");
    let (_, metrics) = get(pod.http, "/metrics").await;
    assert!(
        metrics.contains("ingest_drain_deadline_timestamp_seconds 0.0\n"),
        "{metrics}"
    );
}
