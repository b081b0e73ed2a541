//! The control API over TLS, against a real ingest pod, with real TLS
//! clients: grpcurl with certificates (and without), `openssl s_client`
//! for what the pod presents, and the operator's tonic connector.
//! Certificates are made by the `openssl` command line tool.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ingest_proto::tls::{ClientFiles, Connector, ServerFiles};
use ingest_proto::v1::GetStatusRequest;
use ingest_proto::v1::ingest_control_client::IngestControlClient;
use ingest_testkit::lab::LocalPod;
use tokio::process::Command;
use tonic::transport::Endpoint;

mod common;
use common::grpcurl;

const TOKEN: &str = "s3cret-token";
/// The one name every pod's certificate carries; pods are dialled by IP.
const SERVER_NAME: &str = "ingest-control.test";

async fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .await
        .context("running openssl (apt-get install openssl)")?;
    ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

/// A CA: `<dir>/<name>.crt|key`.
async fn make_ca(dir: &Path, name: &str) -> Result<()> {
    let (key, crt, subj) = (format!("{name}.key"), format!("{name}.crt"), format!("/CN={name}"));
    let mut args = vec!["req", "-x509", "-nodes", "-days", "2", "-subj", &subj];
    args.extend(EC);
    args.extend(["-keyout", &key, "-out", &crt]);
    openssl(dir, &args).await
}

/// A certificate signed by `ca` with `extensions` (subjectAltName,
/// extendedKeyUsage): `<dir>/<name>.crt|key`.
async fn make_signed(dir: &Path, name: &str, ca: &str, extensions: &str) -> Result<()> {
    let (key, csr, crt, subj) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("/CN={name}"),
    );
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), extensions)?;
    let mut req = vec!["req", "-new", "-nodes", "-subj", &subj];
    req.extend(EC);
    req.extend(["-keyout", &key, "-out", &csr]);
    openssl(dir, &req).await?;
    let (ca_crt, ca_key) = (format!("{ca}.crt"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    )
    .await
}

fn server_ext() -> String {
    format!("subjectAltName=DNS:{SERVER_NAME}\nextendedKeyUsage=serverAuth\n")
}

const CLIENT_EXT: &str = "extendedKeyUsage=clientAuth\n";

/// `ca`, a server certificate `server` for [`SERVER_NAME`], a client
/// certificate `operator`, and a client certificate `rogue` of another CA.
async fn pki(dir: &Path) -> Result<()> {
    make_ca(dir, "ca").await?;
    make_signed(dir, "server", "ca", &server_ext()).await?;
    make_signed(dir, "operator", "ca", CLIENT_EXT).await?;
    make_ca(dir, "other-ca").await?;
    make_signed(dir, "rogue", "other-ca", CLIENT_EXT).await
}

fn path(dir: &Path, file: &str) -> String {
    dir.join(file).display().to_string()
}

async fn tls_pod(dir: &Path, mutual: bool) -> Result<LocalPod> {
    let (cert, key, ca) = (path(dir, "server.crt"), path(dir, "server.key"), path(dir, "ca.crt"));
    let mut args = vec![
        "--control-token",
        TOKEN,
        "--control-tls-cert",
        &cert,
        "--control-tls-key",
        &key,
        "--control-tls-reload",
        "100ms",
    ];
    if mutual {
        args.extend(["--control-tls-client-ca", &ca]);
    }
    Ok(LocalPod::start("tls-pod", &args).await?)
}

/// grpcurl's GetStatus with `tls` options: its output, or its error.
async fn get_status(addr: &str, tls: &[String]) -> Result<String> {
    let auth = format!("authorization: Bearer {TOKEN}");
    let out = Command::new(grpcurl())
        .args(["-connect-timeout", "3"])
        .args(tls)
        .args(["-H", &auth, addr, "ingest.control.v1.IngestControl/GetStatus"])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(stdout)
}

fn tls_args(dir: &Path, client: Option<&str>, server_name: &str) -> Vec<String> {
    let mut args = vec![
        "-cacert".to_owned(),
        path(dir, "ca.crt"),
        "-servername".to_owned(),
        server_name.to_owned(),
    ];
    if let Some(c) = client {
        args.extend([
            "-cert".to_owned(),
            path(dir, &format!("{c}.crt")),
            "-key".to_owned(),
            path(dir, &format!("{c}.key")),
        ]);
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_reaches_the_control_api_only_with_the_right_certificates() -> Result<()> {
    let dir = tempfile::tempdir()?;
    pki(dir.path()).await?;
    let pod = tls_pod(dir.path(), true).await?;
    let addr = pod.control.context("control API served")?.to_string();
    let d = dir.path();

    let ok = get_status(&addr, &tls_args(d, Some("operator"), SERVER_NAME)).await?;
    ensure!(ok.contains("\"pod\": \"tls-pod\""), "{ok}");

    let refused = [
        ("plaintext", vec!["-plaintext".to_owned()]),
        ("TLS without a client certificate", tls_args(d, None, SERVER_NAME)),
        (
            "a client certificate of another CA",
            tls_args(d, Some("rogue"), SERVER_NAME),
        ),
        (
            "a pod that is not who it should be",
            tls_args(d, Some("operator"), "other.name"),
        ),
    ];
    for (what, args) in refused {
        match get_status(&addr, &args).await {
            Ok(out) => bail!("{what}: the call went through: {out}"),
            Err(err) => eprintln!("{what}: refused as it should be: {err}"),
        }
    }
    // Why, as the TLS handshake tells it.
    let no_cert = handshake(&addr, d, None).await?;
    ensure!(no_cert.contains("certificate required"), "{no_cert}");
    let rogue = handshake(&addr, d, Some("rogue")).await?;
    ensure!(
        rogue.contains("unknown ca") || rogue.contains("bad certificate"),
        "{rogue}"
    );
    ensure!(!handshake(&addr, d, Some("operator")).await?.contains("alert"));

    // The pod still serves the right caller after the refusals.
    get_status(&addr, &tls_args(d, Some("operator"), SERVER_NAME)).await?;
    Ok(())
}

/// What `openssl s_client` says of a handshake with the pod (and a
/// request, so that a TLS 1.3 server's verdict on the client arrives).
async fn handshake(addr: &str, dir: &Path, client: Option<&str>) -> Result<String> {
    let ca = path(dir, "ca.crt");
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-connect",
        addr,
        "-servername",
        SERVER_NAME,
        "-CAfile",
        &ca,
        "-alpn",
        "h2",
    ]);
    if let Some(c) = client {
        cmd.args([
            "-cert",
            &path(dir, &format!("{c}.crt")),
            "-key",
            &path(dir, &format!("{c}.key")),
        ]);
    }
    cmd.stdin(std::process::Stdio::piped());
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        stdin.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await??;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// The operator's connector (what its pooled channels dial with) calls a
/// pod over mutual TLS; without its client certificate it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_connector_calls_over_mutual_tls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    pki(dir.path()).await?;
    let pod = tls_pod(dir.path(), true).await?;
    let addr = pod.control.context("control API served")?;
    let d = dir.path();
    let call = |identity: Option<(PathBuf, PathBuf)>| async move {
        let files = ClientFiles {
            ca: d.join("ca.crt"),
            identity,
        };
        let connector = Connector::new(files.watch(Duration::ZERO)?, SERVER_NAME)?;
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(3))
            .connect_with_connector_lazy(connector);
        let mut req = tonic::Request::new(GetStatusRequest {
            counts_only: true,
            ..GetStatusRequest::default()
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse()?);
        req.set_timeout(Duration::from_secs(3));
        anyhow::Ok(IngestControlClient::new(channel).get_status(req).await?.into_inner())
    };
    let status = call(Some((d.join("operator.crt"), d.join("operator.key")))).await?;
    ensure!(status.pod == "tls-pod", "{status:?}");
    ensure!(
        call(None).await.is_err(),
        "a call without a client certificate went through"
    );
    Ok(())
}

/// The serial of the certificate the pod presents.
async fn presented_serial(addr: &str) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {addr} -servername {SERVER_NAME} </dev/null 2>/dev/null | openssl x509 -noout -serial"
        ))
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.trim().strip_prefix("serial=") {
        Some(serial) => Ok(serial.to_owned()),
        None => bail!("no certificate presented: {text:?}"),
    }
}

async fn file_serial(cert: &Path) -> Result<String> {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.trim().strip_prefix("serial=").context("serial")?.to_owned())
}

/// Puts `src` at `dst` in one rename, as the kubelet's atomic writer does.
fn install(src: &Path, dst: &Path) -> Result<()> {
    let tmp = dst.with_extension("new");
    std::fs::copy(src, &tmp)?;
    std::fs::rename(&tmp, dst)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    pki(d).await?;
    let pod = tls_pod(d, false).await?;
    let addr = pod.control.context("control API served")?.to_string();
    let first = file_serial(&d.join("server.crt")).await?;
    ensure!(
        presented_serial(&addr).await? == first,
        "the first certificate is not served"
    );

    // Renewal: a new key and certificate land in the files.
    make_signed(d, "renewed", "ca", &server_ext()).await?;
    let renewed = file_serial(&d.join("renewed.crt")).await?;
    ensure!(renewed != first, "openssl reused a serial");
    install(&d.join("renewed.key"), &d.join("server.key"))?;
    install(&d.join("renewed.crt"), &d.join("server.crt"))?;
    let mut seen = String::new();
    for _ in 0..100 {
        seen = presented_serial(&addr).await?;
        if seen == renewed {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(seen == renewed, "still serving {seen}, not the renewed {renewed}");

    // Files that do not load leave the renewed pair in service.
    std::fs::write(d.join("server.crt"), "not a certificate")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        presented_serial(&addr).await? == renewed,
        "a broken file replaced the served pair"
    );
    let status = get_status(&addr, &tls_args(d, None, SERVER_NAME)).await?;
    ensure!(status.contains("tls-pod"), "{status}");
    Ok(())
}

/// Accepted control connections have Nagle's algorithm off: a short
/// answer never waits in the pod's kernel for the operator's delayed ACK
/// of an earlier small frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_control_connections_send_without_delay() -> Result<()> {
    use tokio_stream::StreamExt;
    use tonic::codegen::Service;

    let dir = tempfile::tempdir()?;
    pki(dir.path()).await?;
    let d = dir.path();
    let server = ServerFiles {
        cert: d.join("server.crt"),
        key: d.join("server.key"),
        client_ca: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut incoming = ingest_proto::tls::incoming(listener, server.watch(Duration::ZERO)?);
    let client = ClientFiles {
        ca: d.join("ca.crt"),
        identity: None,
    };
    let mut connector = Connector::new(client.watch(Duration::ZERO)?, SERVER_NAME)?;
    let (dialled, accepted) = tokio::join!(connector.call(format!("http://{addr}").parse()?), incoming.next());
    dialled.context("dialling the control port")?;
    let accepted = accepted.context("no connection accepted")??;
    ensure!(accepted.tcp().nodelay()?, "the accepted connection delays small writes");
    Ok(())
}
