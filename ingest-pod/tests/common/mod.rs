//! Helpers of the tests that run the real `ingest-pod` binary.

// Each test file includes this module and calls only some of it.
#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A plain HTTP/1.0 GET: the whole answer, headers included.
pub async fn http_get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the pod's HTTP port");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: pod\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// One sample of the pod's `/metrics`: `name` with its labels, as exported.
pub async fn metric(http: &str, name: &str) -> f64 {
    let page = http_get(http, "/metrics").await;
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{page}"))
}

/// Waits until something accepts connections on `addr` (10 s at most).
pub async fn listening(addr: &str) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {addr}");
}

/// grpcurl, as `.ci/setup` builds it into the project's cache.
pub fn grpcurl() -> std::path::PathBuf {
    use std::path::PathBuf;
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("HOME or XDG_CACHE_HOME");
    let grpcurl = cache.join("lossless-ingest/bin/grpcurl");
    assert!(grpcurl.exists(), "{} is missing: run .ci/setup", grpcurl.display());
    grpcurl
}
