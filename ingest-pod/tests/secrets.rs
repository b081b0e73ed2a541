//! Stream keys are secrets everywhere: the real pod binary with a control
//! token, a real nginx-rtmp origin behind an upstream URL that carries a
//! token, real publishers whose tcUrl carries one too. Afterwards every key
//! and token is searched for in `/status`, `/metrics`, the control API's
//! status and every log line the pod wrote: none may be found.

mod common;

use std::process::Stdio;
use std::time::Duration;

use ingest_proto::v1::GetStatusRequest;
use ingest_proto::v1::ingest_control_client::IngestControlClient;
use ingest_testkit::origin::{Origin, free_port};
use ingest_testkit::publisher::{Publisher, PublisherConfig};
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "release-control-token-0123456789";
const TC_URL_SECRET: &str = "tcurl-secret-7f3a";
const UPSTREAM_SECRET: &str = "upstream-secret-91bd";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_keys_and_tokens_appear_nowhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = Origin::start(dir.path(), "127.0.0.1").expect("nginx-rtmp");
    let [rtmp, http, control] = [(); 3].map(|()| free_port("127.0.0.1").expect("port").to_string());
    let upstream = format!("rtmp://{}/live/{{stream}}?token={UPSTREAM_SECRET}", origin.addr());
    let mut pod = Command::new(env!("CARGO_BIN_EXE_ingest-pod"))
        .args([
            "--rtmp-listen",
            &rtmp,
            "--http-listen",
            &http,
            "--control-listen",
            &control,
        ])
        .args([
            "--upstream",
            &upstream,
            "--control-token",
            TOKEN,
            "--propagation-delay",
            "200ms",
        ])
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning ingest-pod");
    common::listening(&rtmp).await;
    common::listening(&control).await;

    // Keys of the kind encoders are given: long random strings.
    let keys: Vec<String> = (0..3).map(|i| format!("live_{i}_a8f3kq29zmx7w1")).collect();
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for key in &keys {
        let cfg = PublisherConfig {
            fps: 25,
            gop: 25,
            video_bitrate_bps: 200_000,
            width: 160,
            height: 120,
            ..PublisherConfig::new(format!("rtmp://{rtmp}/live?auth={TC_URL_SECRET}/{key}"))
        };
        tasks.push(tokio::spawn(Publisher::new(cfg).expect("publisher").run(stop.clone())));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let status = common::http_get(&http, "/status").await;
    let metrics = common::http_get(&http, "/metrics").await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{control}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut client = IngestControlClient::new(channel);
    let mut req = tonic::Request::new(GetStatusRequest::default());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().expect("header"));
    let grpc = client.get_status(req).await.expect("GetStatus").into_inner();
    assert_eq!(grpc.publishers.len(), keys.len(), "every publisher is on the pod");
    for p in &grpc.publishers {
        assert!(p.stream.starts_with("hmac:"), "gRPC shows {}", p.stream);
        assert!(
            status.contains(&p.stream),
            "/status shows the same hash as gRPC ({}): {status}",
            p.stream
        );
    }

    // A SIGTERM drain, so its log lines are searched too.
    let pid = pod.id().expect("pid").to_string();
    Command::new("kill").args(["-TERM", &pid]).status().await.expect("kill");
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    tokio::time::timeout(Duration::from_secs(30), pod.wait())
        .await
        .expect("the pod exits after its drain")
        .expect("exit status");
    let mut logs = String::new();
    pod.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut logs)
        .await
        .expect("logs");
    assert!(logs.contains("publishing"), "the logs cover the publishes: {logs}");

    let grpc_text = format!("{grpc:?}");
    let places = [
        ("/status", &status),
        ("/metrics", &metrics),
        ("gRPC status", &grpc_text),
        ("the logs", &logs),
    ];
    let secrets = keys
        .iter()
        .map(String::as_str)
        .chain([TC_URL_SECRET, UPSTREAM_SECRET, TOKEN]);
    for secret in secrets {
        for (place, text) in &places {
            let line = text.lines().find(|l| l.contains(secret));
            assert!(
                line.is_none(),
                "{secret:?} found in {place}: {}",
                line.unwrap_or_default()
            );
        }
    }
}
