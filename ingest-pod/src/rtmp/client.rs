//! The client side of an RTMP publish (connect → releaseStream, FCPublish,
//! createStream → publish → NetStream.Publish.Start), shared by the relay
//! and the test publisher.

use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpStream;

use super::conn::{self, OUTGOING_CHUNK_SIZE, Reader, Writer};
use ingest_rtmp::amf0::Value;
use ingest_rtmp::message::{Command, Message, UserControl};
use ingest_rtmp::url::RtmpUrl;

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Conn(#[from] conn::Error),
    #[error("server refused: {0}")]
    Refused(String),
    /// The stream is published already (nginx-rtmp: BadName "Already publishing").
    #[error("server is busy with this stream: {0}")]
    Busy(String),
    #[error("server closed the connection")]
    Closed,
    #[error("timed out {0}")]
    Timeout(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A connection that publishes `stream_id`.
pub struct Publishing {
    pub reader: Reader,
    pub writer: Writer,
    pub stream_id: u32,
}

async fn timed<T>(limit: Duration, what: &'static str, fut: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| Error::Timeout(what))?
}

/// The `code` and `description` of an onStatus or _error command.
pub fn status_text(command: &Command) -> (String, String) {
    let info = command.args.iter().find(|v| v.get("code").is_some());
    let field = |k| {
        info.and_then(|i| i.get(k))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    (field("code"), field("description"))
}

/// Waits for the reply to a command, answering pings on the way.
pub async fn reply(reader: &mut Reader, writer: &mut Writer, txn: f64) -> Result<Command> {
    loop {
        // Peers with Nagle on hold their reply until we ACK what came before.
        reader.quick_ack();
        match reader.next().await? {
            None => return Err(Error::Closed),
            Some(Message::Command { command, .. }) if command.transaction == txn && command.name == "_result" => {
                return Ok(command);
            }
            Some(Message::Command { command, .. }) if command.transaction == txn && command.name == "_error" => {
                let (code, desc) = status_text(&command);
                return Err(Error::Refused(format!("{code} {desc}").trim().to_owned()));
            }
            Some(Message::UserControl(UserControl::PingRequest(t))) => {
                writer.send(&Message::UserControl(UserControl::PingResponse(t))).await?
            }
            Some(_) => {}
        }
    }
}

/// Connects to `url` and publishes its stream. `connect_extra` goes into
/// the connect command object after app, type, flashVer and tcUrl
/// (`supportsGoAway`, `capsEx`). Each step may take `step`.
/// A server that completed the handshake and then closes the connection
/// instead of answering `connect` or `publish` refuses us: nginx-rtmp does
/// so for an application it does not have or an `on_publish` hook that
/// denies the stream.
fn closed_means_refused(e: Error, step: &str) -> Error {
    match e {
        Error::Closed => Error::Refused(format!("the server closed the connection instead of answering {step}")),
        e => e,
    }
}

/// Waits for the answer to `publish`: `NetStream.Publish.Start`, or why
/// not (busy: the stream is still live at the origin).
async fn publish_status(reader: &mut Reader, writer: &mut Writer) -> Result<()> {
    loop {
        reader.quick_ack();
        match reader.next().await? {
            None => return Err(Error::Closed),
            Some(Message::Command { command, .. }) if command.name == "onStatus" => {
                let (code, desc) = status_text(&command);
                if code == "NetStream.Publish.Start" {
                    return Ok(());
                }
                if code.contains("BadName") || desc.to_lowercase().contains("already") {
                    return Err(Error::Busy(format!("{code} {desc}")));
                }
                return Err(Error::Refused(format!("{code} {desc}")));
            }
            Some(Message::UserControl(UserControl::PingRequest(t))) => {
                writer.send(&Message::UserControl(UserControl::PingResponse(t))).await?
            }
            Some(_) => {}
        }
    }
}

pub async fn publish(
    url: &RtmpUrl,
    flash_ver: &str,
    connect_extra: Vec<(String, Value)>,
    step: Duration,
) -> Result<Publishing> {
    let tcp = timed(step, "connecting", async {
        Ok(TcpStream::connect(url.addr()).await.map_err(conn::Error::Io)?)
    })
    .await?;
    tcp.set_nodelay(true).map_err(conn::Error::Io)?;
    let (mut reader, mut writer) = conn::connect(tcp, step).await?;
    writer.queue(&Message::SetChunkSize(OUTGOING_CHUNK_SIZE));
    let mut object = vec![
        ("app".to_owned(), Value::string(url.app.clone())),
        ("type".to_owned(), Value::string("nonprivate")),
        ("flashVer".to_owned(), Value::string(flash_ver)),
        ("tcUrl".to_owned(), Value::string(url.tc_url())),
    ];
    object.extend(connect_extra);
    writer.queue(&Message::command(0, "connect", 1.0, vec![Value::Object(object)]));
    writer.flush().await?;
    timed(
        step,
        "waiting for connect _result",
        reply(&mut reader, &mut writer, 1.0),
    )
    .await
    .map_err(|e| closed_means_refused(e, "connect"))?;
    let name = Value::string(url.stream.clone());
    writer.queue(&Message::command(
        0,
        "releaseStream",
        2.0,
        vec![Value::Null, name.clone()],
    ));
    writer.queue(&Message::command(0, "FCPublish", 3.0, vec![Value::Null, name.clone()]));
    writer.queue(&Message::command(0, "createStream", 4.0, vec![Value::Null]));
    writer.flush().await?;
    let created = timed(
        step,
        "waiting for createStream _result",
        reply(&mut reader, &mut writer, 4.0),
    )
    .await?;
    let stream_id = created
        .args
        .iter()
        .find_map(Value::as_number)
        .filter(|n| *n >= 0.0)
        .unwrap_or(1.0) as u32;
    writer
        .send(&Message::command(
            stream_id,
            "publish",
            5.0,
            vec![Value::Null, name, Value::string("live")],
        ))
        .await?;
    timed(
        step,
        "waiting for the publish status",
        publish_status(&mut reader, &mut writer),
    )
    .await
    .map_err(|e| closed_means_refused(e, "publish"))?;
    Ok(Publishing {
        reader,
        writer,
        stream_id,
    })
}
