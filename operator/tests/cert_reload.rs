//! The webhook's certificate is renewed on disk (as the kubelet swaps an
//! updated Secret into the volume): the server presents the new one without
//! a restart, and keeps the old one while the files hold a pair that does
//! not load. Certificates are made, and the handshakes done, by the
//! `openssl` command line tool.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use axum::Router;
use axum::routing::get;
use ingest_operator::tls::{CertFiles, ServingCert};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// A self-signed certificate for `cn` with a new key: `<dir>/<cn>.crt|key`.
async fn make_cert(dir: &Path, cn: &str) -> Result<()> {
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .args(["-days", "1", "-subj", &format!("/CN={cn}")])
        .arg("-keyout")
        .arg(dir.join(format!("{cn}.key")))
        .arg("-out")
        .arg(dir.join(format!("{cn}.crt")))
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .context("running openssl (apt-get install openssl)")?;
    ensure!(status.success(), "openssl req failed for {cn}");
    Ok(())
}

/// Puts `src` at `dst` in one rename, as the kubelet's atomic writer does.
fn install(src: &Path, dst: &Path) -> Result<()> {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp)?;
    std::fs::rename(&tmp, dst)?;
    Ok(())
}

/// The subject of the certificate `addr` presents, as `CN=...`.
async fn presented_subject(port: u16) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null \
             | openssl x509 -noout -subject -nameopt RFC2253"
        ))
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.trim().strip_prefix("subject=") {
        Some(subject) => Ok(subject.trim().to_owned()),
        None => bail!("no certificate presented: {text:?}"),
    }
}

async fn wait_for_subject(port: u16, want: &str) -> Result<()> {
    let mut last = String::new();
    for _ in 0..100 {
        last = presented_subject(port).await?;
        if last == want {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the server still presents {last:?}, not {want:?}")
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    for cn in ["first", "second"] {
        make_cert(d, cn).await?;
    }
    let files = CertFiles {
        cert: d.join("tls.crt"),
        key: d.join("tls.key"),
    };
    install(&d.join("first.crt"), &files.cert)?;
    install(&d.join("first.key"), &files.key)?;

    let serving = ServingCert::load(files.clone()).await?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let server = axum_server::from_tcp_rustls(listener, serving.config())?;
    let app = Router::new().route("/", get(|| async { "ok" }));
    let served = tokio::spawn(server.serve(app.into_make_service()));
    let stop = CancellationToken::new();
    let watcher = tokio::spawn(serving.keep_current(Duration::from_millis(100), stop.clone()));

    assert_eq!(presented_subject(port).await?, "CN=first");

    // A renewal half done: the new certificate with the old key. It does
    // not load; the old pair stays served.
    install(&d.join("second.crt"), &files.cert)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        presented_subject(port).await?,
        "CN=first",
        "a mismatched pair is not served"
    );

    // The key arrives: the renewed pair is served.
    install(&d.join("second.key"), &files.key)?;
    wait_for_subject(port, "CN=second").await?;

    stop.cancel();
    watcher.await?;
    served.abort();
    Ok(())
}

#[tokio::test]
async fn refresh_reports_changes_and_refuses_garbage() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    make_cert(d, "only").await?;
    let files = CertFiles {
        cert: d.join("tls.crt"),
        key: d.join("tls.key"),
    };
    install(&d.join("only.crt"), &files.cert)?;
    install(&d.join("only.key"), &files.key)?;
    let mut serving = ServingCert::load(files.clone()).await?;
    assert!(!serving.refresh().await?, "unchanged files: nothing to do");

    std::fs::write(&files.cert, b"not a certificate")?;
    assert!(serving.refresh().await.is_err(), "garbage is refused");
    assert!(!serving.refresh().await?, "the same garbage is not tried again");

    std::fs::remove_file(&files.key)?;
    assert!(serving.refresh().await.is_err(), "a missing file is an error");
    Ok(())
}
