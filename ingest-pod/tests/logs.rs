//! The pod's log lines as a log platform reads them: the real binary with
//! stdout on a pipe, as in a container.

mod common;

use std::process::Stdio;

use ingest_testkit::origin::free_port;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// Runs the pod with `format` until it listens, then stops it; its stdout.
async fn startup_logs(format: &str) -> String {
    let rtmp = free_port("127.0.0.1").expect("port").to_string();
    let http = free_port("127.0.0.1").expect("port").to_string();
    let mut pod = Command::new(env!("CARGO_BIN_EXE_ingest-pod"))
        .args(["--rtmp-listen", &rtmp, "--http-listen", &http, "--log-format", format])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning ingest-pod");
    common::listening(&http).await;
    let health = common::http_get(&http, "/healthz").await;
    assert!(health.contains(" 200 OK"), "{health}");
    pod.kill().await.expect("stop the pod");
    let mut out = String::new();
    pod.stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .await
        .expect("read stdout");
    out
}

#[tokio::test]
async fn text_logs_on_a_pipe_carry_no_escape_codes() {
    let out = startup_logs("text").await;
    assert!(out.contains("ingest pod serving"), "{out}");
    assert!(!out.contains('\u{1b}'), "escape codes in logs on a pipe: {out:?}");
}

#[tokio::test]
async fn json_logs_are_one_object_a_line() {
    let out = startup_logs("json").await;
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let serving = lines
        .iter()
        .find(|l| l["message"] == "ingest pod serving")
        .unwrap_or_else(|| panic!("no startup line: {out}"));
    assert_eq!(serving["level"], "INFO");
    assert!(
        serving["timestamp"].is_string() && serving["rtmp"].is_string(),
        "{serving}"
    );
}
