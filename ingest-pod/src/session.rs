//! One publisher's connection: the server side of the RTMP publish flow,
//! capability detection, signals, and hand-off of media to the relay.

use std::fs::File;
use std::io::BufWriter;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::keys;
use crate::metrics::ReasonLabel;
use crate::registry::{Caps, ConnGuard, Registry, SessionCommand, SignalKind, SignalsEnabled};
use crate::relay::{self, Item, Queue, RelayConfig};
use crate::rtmp::conn::{self, OUTGOING_CHUNK_SIZE, Writer};
use ingest_rtmp::amf0::Value;
use ingest_rtmp::chunk::Limits;
use ingest_rtmp::flv::FlvWriter;
use ingest_rtmp::message::{self, Command, Message, UserControl};
use ingest_rtmp::url::{self, RtmpUrl};

/// Window we ask publishers to acknowledge by (they never wait for us).
pub const WINDOW_ACK_SIZE: u32 = 2_500_000;
/// How long a publish is read per packet before it moves to the pod's
/// media clock: a handover (the origin still holding the stream for the
/// previous pod) is over by then.
pub const CLOCK_AFTER: Duration = Duration::from_secs(2);
/// Body of the Go Away message: OBS 27.2–29.x ignores an empty one.
pub const GO_AWAY_BODY: [u8; 4] = [0; 4];

/// Settings shared by every session of a pod.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub limits: Limits,
    pub signals: SignalsEnabled,
    /// Upstream URL template with `{app}` and `{stream}`; `None`: no relay.
    pub upstream: Option<String>,
    pub relay: RelayConfig,
    /// Directory for one FLV file per publish session.
    pub record_dir: Option<PathBuf>,
    /// A signalled publisher that sends no media for this long has moved:
    /// its connection is closed. An encoder may leave it open after moving
    /// (OBS's recording helper inherits the socket), which would hold the
    /// drain, and the new pod's upstream publish, until the deadline.
    pub signalled_quiet: Duration,
    /// The publish callback; `None`: every publish is allowed.
    pub auth: Option<crate::auth::PublishAuth>,
    /// This pod's name, told to the publish callback.
    pub pod_name: String,
}

/// What a session needs from its pod.
#[derive(Clone)]
pub struct Context {
    pub registry: Arc<Registry>,
    pub config: Arc<SessionConfig>,
    /// Relays outlive their sessions (they flush after the publisher left).
    pub relays: TaskTracker,
    /// Cancelled when the pod must stop at once (grace period over).
    pub stop: CancellationToken,
    /// Publishing connections are read on this clock; `None`: on every packet.
    pub media_clock: Option<conn::Clock>,
    /// The pod-wide budget of relay buffers.
    pub budget: Arc<relay::Budget>,
}

/// Serves one connection until it closes. Errors are logged here.
pub async fn serve(stream: TcpStream, peer: SocketAddr, ctx: Context) {
    let _ = stream.set_nodelay(true);
    let (guard, commands) = ctx.registry.register(peer);
    let span = info_span!("conn", id = guard.id(), %peer);
    async move {
        let mut session = Session::new(guard, peer, ctx.clone());
        let result = session.run(stream, commands).await;
        session.end_publish(false);
        match result {
            Ok(reason) => info!(reason, migrated = session.guard.was_signalled(), "connection closed"),
            Err(err) => {
                let reason = match &err {
                    conn::Error::Io(_) | conn::Error::TruncatedStream => "io",
                    conn::Error::Timeout(..) => "timeout",
                    conn::Error::Handshake(_) => "handshake",
                    conn::Error::Chunk(_) | conn::Error::Message(_) => "protocol",
                };
                ctx.registry
                    .metrics()
                    .connection_errors
                    .get_or_create(&ReasonLabel { reason })
                    .inc();
                if session.guard.was_signalled() {
                    info!(%err, "signalled publisher left");
                } else {
                    warn!(%err, "connection closed");
                }
            }
        }
    }
    .instrument(span)
    .await;
}

struct Publishing {
    stream: String,
    stream_id: u32,
    since: tokio::time::Instant,
    queue: Option<Arc<Queue>>,
    /// Media of the current read, handed to the relay at once.
    pending: Vec<Item>,
    recorder: Option<FlvWriter<BufWriter<File>>>,
}

struct Session {
    guard: ConnGuard,
    peer: SocketAddr,
    ctx: Context,
    app: Option<String>,
    tc_url: Option<String>,
    caps: Caps,
    next_stream_id: u32,
    publishing: Option<Publishing>,
    /// Once signalled: when the last audio/video arrived, or the signal
    /// went out if no media came since. `None` before any signal.
    quiet_since: Option<tokio::time::Instant>,
    /// The name the publish callback gave for the upstream, for the next publish.
    upstream_name: Option<String>,
}

impl Session {
    fn new(guard: ConnGuard, peer: SocketAddr, ctx: Context) -> Self {
        Self {
            guard,
            peer,
            ctx,
            app: None,
            tc_url: None,
            caps: Caps::default(),
            next_stream_id: 1,
            publishing: None,
            quiet_since: None,
            upstream_name: None,
        }
    }

    async fn run(
        &mut self,
        stream: TcpStream,
        mut commands: tokio::sync::mpsc::UnboundedReceiver<SessionCommand>,
    ) -> conn::Result<&'static str> {
        let cfg = self.ctx.config.clone();
        let (mut reader, mut writer) = conn::accept(stream, cfg.handshake_timeout, cfg.limits).await?;
        loop {
            // Steady media is read on the pod's clock. A handover is not:
            // the first seconds of a publish (another pod may still hold the
            // stream at the origin) and a signalled publisher's last media
            // and goodbye are read as they come, so the stream moves as fast
            // as with per-packet reads.
            let steady = self
                .publishing
                .as_ref()
                .is_some_and(|p| p.since.elapsed() >= CLOCK_AFTER && self.quiet_since.is_none());
            match &self.ctx.media_clock {
                Some(clock) if steady && !reader.is_clocked() => {
                    (reader, writer) = conn::clocked(reader, writer, clock.clone())?;
                }
                _ if !steady && reader.is_clocked() => (reader, writer) = conn::unclocked(reader, writer)?,
                _ => {}
            }
            // Until media flows, answer the publisher's command exchange
            // without delayed ACKs (OBS writes with Nagle on).
            if self.publishing.is_none() {
                reader.quick_ack();
            }
            let quiet = self.quiet_since.filter(|_| self.publishing.is_some());
            tokio::select! {
                () = tokio::time::sleep_until(quiet.unwrap_or_else(tokio::time::Instant::now) + cfg.signalled_quiet), if quiet.is_some() => {
                    return Ok("signalled publisher sent no media since: it moved");
                }
                cmd = commands.recv() => match cmd {
                    Some(SessionCommand::Signal { kind, tc_url }) => {
                        self.signal(&mut writer, kind, tc_url).await?;
                        self.quiet_since = Some(tokio::time::Instant::now());
                    }
                    Some(SessionCommand::Disconnect { reason }) => return Ok(reason),
                    None => return Ok("registry gone"),
                },
                msg = reader.next_within(cfg.idle_timeout) => {
                    let Some(msg) = msg? else { return Ok("peer closed") };
                    let handled = self.handle_read(&mut reader, &mut writer, msg).await;
                    // Counted once the read is handled: a `connect` counts under what it announced.
                    self.guard.received(reader.bytes_in());
                    if let Some(done) = handled? {
                        return Ok(done);
                    }
                    if let Err(why) = self.hand_off() {
                        // Tell the encoder, which shows the failure, instead of
                        // letting it stream into a buffer for ever.
                        warn!(%why, "the origin refuses this stream: closing the publisher");
                        let sid = self.publishing.as_ref().map_or(1, |p| p.stream_id);
                        writer.queue(&on_status(sid, "error", "NetStream.Publish.Failed", &why));
                        writer.flush().await?;
                        return Ok("the origin refuses the stream");
                    }
                    if let Some(ack) = reader.ack_due() {
                        writer.queue(&ack);
                    }
                    writer.flush().await?;
                }
            }
        }
    }

    /// Handles everything the last read brought; `Some(reason)` closes the connection.
    async fn handle_read(
        &mut self,
        reader: &mut conn::Reader,
        writer: &mut Writer,
        msg: Message,
    ) -> conn::Result<Option<&'static str>> {
        let mut next = Some(msg);
        while let Some(msg) = next {
            if let Some(done) = self.handle(writer, msg).await? {
                return Ok(Some(done));
            }
            next = reader.try_next()?;
        }
        Ok(None)
    }

    async fn signal(&mut self, writer: &mut Writer, kind: SignalKind, tc_url: Option<String>) -> conn::Result<()> {
        match kind {
            SignalKind::GoAway => writer.queue(&Message::GoAway(Bytes::from_static(&GO_AWAY_BODY))),
            SignalKind::ReconnectRequest => {
                let mut info = vec![
                    ("level".to_owned(), Value::string("status")),
                    (
                        "code".to_owned(),
                        Value::string("NetConnection.Connect.ReconnectRequest"),
                    ),
                    (
                        "description".to_owned(),
                        Value::string("This ingest is draining; reconnect to continue."),
                    ),
                ];
                if let Some(url) = &tc_url {
                    info.push(("tcUrl".to_owned(), Value::string(url.clone())));
                }
                writer.queue(&Message::command(
                    0,
                    "onStatus",
                    0.0,
                    vec![Value::Null, Value::Object(info)],
                ));
            }
        }
        info!(
            kind = kind.label(),
            tc_url = tc_url.as_deref().map(keys::redact_query).unwrap_or_default(),
            "signal sent"
        );
        writer.flush().await
    }

    /// Handles one message; `Some(reason)` closes the connection.
    async fn handle(&mut self, writer: &mut Writer, msg: Message) -> conn::Result<Option<&'static str>> {
        match msg {
            Message::UserControl(UserControl::PingRequest(t)) => {
                writer.queue(&Message::UserControl(UserControl::PingResponse(t)))
            }
            Message::Command { stream_id, command } => {
                if command.name == "publish"
                    && let Some(denied) = self.authorize(writer, stream_id, &command).await
                {
                    return Ok(Some(denied));
                }
                return self.command(writer, stream_id, command);
            }
            Message::Data { timestamp, payload, .. } => self.media(message::DATA_AMF0, timestamp, payload),
            Message::Audio { timestamp, payload, .. } => self.media(message::AUDIO, timestamp, payload),
            Message::Video { timestamp, payload, .. } => self.media(message::VIDEO, timestamp, payload),
            // Chunk-level control is applied by the reader; the rest needs no answer.
            _ => {}
        }
        Ok(None)
    }

    /// Asks the publish callback, if one is configured. `Some`: denied (the
    /// publisher was told; close the connection).
    async fn authorize(&mut self, writer: &mut Writer, stream_id: u32, cmd: &Command) -> Option<&'static str> {
        let auth = self.ctx.config.auth.as_ref()?;
        let key = cmd.arg(0).and_then(Value::as_str).unwrap_or("");
        let app = self.app.as_deref().unwrap_or("");
        let request = crate::auth::Request {
            app,
            key,
            client_addr: self.peer.to_string(),
            capabilities: crate::auth::Capabilities {
                go_away: self.caps.go_away,
                reconnect_request: self.caps.reconnect,
            },
            pod: &self.ctx.config.pod_name,
        };
        let stream = self.ctx.registry.stream_keys().show(key);
        let decision = auth.check(&request).await;
        let label = match &decision {
            crate::auth::Decision::Allow { .. } => "allow",
            crate::auth::Decision::Deny { label, .. } => label,
        };
        self.ctx
            .registry
            .metrics()
            .publish_auth
            .get_or_create(&crate::metrics::ResultLabel { result: label })
            .inc();
        match decision {
            crate::auth::Decision::Allow { upstream_name } => {
                info!(%stream, rewritten = upstream_name.is_some(), "publish allowed by the callback");
                self.upstream_name = upstream_name;
                None
            }
            crate::auth::Decision::Deny { reason, .. } => {
                warn!(%stream, %reason, "publish denied");
                writer.queue(&on_status(
                    stream_id,
                    "error",
                    "NetStream.Publish.BadAuth",
                    &format!("publish denied: {reason}"),
                ));
                let _ = writer.flush().await;
                Some("publish denied")
            }
        }
    }

    fn command(&mut self, writer: &mut Writer, stream_id: u32, cmd: Command) -> conn::Result<Option<&'static str>> {
        let txn = cmd.transaction;
        debug!(name = %cmd.name, txn, "command");
        match cmd.name.as_str() {
            "connect" => self.connect(writer, txn, cmd.object().cloned().unwrap_or(Value::Null)),
            "releaseStream" | "FCPublish" | "_checkbw" => {
                if txn != 0.0 {
                    writer.queue(&Message::command(
                        0,
                        "_result",
                        txn,
                        vec![Value::Null, Value::Undefined],
                    ));
                }
            }
            "createStream" => {
                let id = self.next_stream_id;
                self.next_stream_id += 1;
                writer.queue(&Message::command(
                    0,
                    "_result",
                    txn,
                    vec![Value::Null, Value::Number(f64::from(id))],
                ));
            }
            "publish" => return Ok(self.publish(writer, stream_id, &cmd)),
            "FCUnpublish" | "deleteStream" | "closeStream" => {
                if self.publishing.is_some() {
                    info!("publisher tore the stream down");
                }
                self.end_publish(true);
            }
            other => debug!(command = other, "ignored command"),
        }
        Ok(None)
    }

    /// `connect`: the app and what the publisher can do (Go Away,
    /// Reconnect Request), answered with the server's own capabilities.
    fn connect(&mut self, writer: &mut Writer, txn: f64, obj: Value) {
        // `live?auth=...`: the query is the publisher's credential for
        // this tier, never part of the app it publishes to (nor of
        // the upstream URL, the status or a log line).
        let app = obj
            .get("app")
            .and_then(Value::as_str)
            .unwrap_or("")
            .split('?')
            .next()
            .unwrap_or("")
            .trim_matches('/')
            .to_owned();
        let go_away = match obj.get("supportsGoAway") {
            Some(Value::Boolean(b)) => *b,
            Some(Value::Number(n)) => *n == 1.0,
            _ => false,
        };
        let caps_ex = obj.get("capsEx").and_then(Value::as_number).unwrap_or(0.0);
        let caps = Caps {
            go_away,
            reconnect: caps_ex >= 0.0 && (caps_ex as u64) & 0x01 != 0,
        };
        self.tc_url = obj.get("tcUrl").and_then(Value::as_str).map(str::to_owned);
        // A tcUrl may carry a token in its query: never logged.
        let tc_url = self.tc_url.as_deref().map(keys::redact_query).unwrap_or_default();
        info!(%app, %tc_url, go_away = caps.go_away, reconnect = caps.reconnect, "connect");
        self.guard.connected(&app, caps);
        self.caps = caps;
        self.app = Some(app);
        writer.queue(&Message::WindowAckSize(WINDOW_ACK_SIZE));
        writer.queue(&Message::SetPeerBandwidth(WINDOW_ACK_SIZE, 2));
        writer.queue(&Message::SetChunkSize(OUTGOING_CHUNK_SIZE));
        let mut props = vec![
            ("fmsVer".to_owned(), Value::string("FMS/3,0,1,123")),
            ("capabilities".to_owned(), Value::Number(31.0)),
        ];
        if self.ctx.config.signals.reconnect_request {
            // Enhanced RTMP v2: the server's capsEx, Reconnect bit.
            props.push(("capsEx".to_owned(), Value::Number(1.0)));
        }
        let encoding = obj.get("objectEncoding").and_then(Value::as_number).unwrap_or(0.0);
        let info = Value::object([
            ("level", Value::string("status")),
            ("code", Value::string("NetConnection.Connect.Success")),
            ("description", Value::string("Connection succeeded.")),
            ("objectEncoding", Value::Number(encoding)),
        ]);
        writer.queue(&Message::command(0, "_result", txn, vec![Value::Object(props), info]));
    }

    /// `publish`: starts the stream, or refuses it (why, for the caller to
    /// close the connection with).
    fn publish(&mut self, writer: &mut Writer, stream_id: u32, cmd: &Command) -> Option<&'static str> {
        let Some(app) = self.app.clone() else {
            return Some("publish before connect");
        };
        let name = cmd.arg(0).and_then(Value::as_str).unwrap_or("").to_owned();
        if name.is_empty() || self.publishing.is_some() || !self.guard.publish(&app, &name) {
            let stream = self.ctx.registry.stream_keys().show(&name);
            warn!(%stream, "publish refused: empty name, already publishing on this connection, or the stream is live on this pod");
            writer.queue(&on_status(
                stream_id,
                "error",
                "NetStream.Publish.BadName",
                &format!("{name} is already publishing"),
            ));
            return Some("publish refused");
        }
        writer.queue(&Message::UserControl(UserControl::StreamBegin(stream_id)));
        writer.queue(&on_status(
            stream_id,
            "status",
            "NetStream.Publish.Start",
            &format!("{name} is now published."),
        ));
        self.start_publish(&app, name, stream_id);
        None
    }

    fn start_publish(&mut self, app: &str, stream: String, stream_id: u32) {
        // The key is a credential: logs and spans carry what the pod shows of it.
        let shown = self.ctx.registry.stream_keys().show(&stream);
        info!(stream = %shown, "publishing");
        // The callback may publish the stream upstream under another name.
        let upstream_name = self.upstream_name.take().unwrap_or_else(|| stream.clone());
        let since = tokio::time::Instant::now();
        let queue = self.ctx.config.upstream.as_ref().and_then(|template| {
            let target = url::render(template, app, &upstream_name);
            match RtmpUrl::parse(&target) {
                Ok(u) => {
                    let q = Queue::with_budget(
                        self.ctx.config.relay.buffer_bytes,
                        self.ctx.registry.metrics().clone(),
                        &self.ctx.budget,
                    );
                    q.report_to(&shown, self.guard.stats().clone());
                    let relay = relay::Relay {
                        url: u,
                        since,
                        queue: q.clone(),
                        cfg: self.ctx.config.relay.clone(),
                        metrics: self.ctx.registry.metrics().clone(),
                        stop: self.ctx.stop.clone(),
                        guard: self.ctx.registry.relay_started(),
                        span: info_span!("relay", stream = %shown, conn = self.guard.id()),
                    };
                    self.ctx.relays.spawn(relay.run());
                    Some(q)
                }
                Err(_) => {
                    // The rendered URL holds the key: say which template failed.
                    warn!(stream = %shown, template = %keys::redact_query(template), "the upstream URL rendered for this stream is invalid; not relaying");
                    None
                }
            }
        });
        if queue.is_none() {
            // Nothing relays this stream: nothing to wait for before a signal.
            self.guard.stats().relay_caught_up.store(true, Ordering::Relaxed);
        }
        let recorder = self.recorder(&stream);
        self.publishing = Some(Publishing {
            stream,
            stream_id,
            since,
            queue,
            pending: Vec::new(),
            recorder,
        });
    }

    /// A new FLV file for this publish of `stream`, if the pod records.
    fn recorder(&self, stream: &str) -> Option<FlvWriter<BufWriter<File>>> {
        let dir = self.ctx.config.record_dir.as_ref()?;
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let safe: String = stream
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("{safe}-{ms}-{}.flv", self.guard.id()));
        match File::create(&path).and_then(|f| FlvWriter::new(BufWriter::new(f), true, true)) {
            Ok(w) => Some(w),
            Err(err) => {
                warn!(path = %path.display(), %err, "cannot record");
                None
            }
        }
    }

    fn media(&mut self, type_id: u8, timestamp: u32, payload: Bytes) {
        let Some(p) = self.publishing.as_mut() else { return };
        if type_id != message::DATA_AMF0
            && let Some(since) = self.quiet_since.as_mut()
        {
            *since = tokio::time::Instant::now();
        }
        if let Some(rec) = p.recorder.as_mut()
            && let Err(err) = rec.write_tag(type_id, timestamp, &payload)
        {
            warn!(%err, "recording failed; stopping it");
            p.recorder = None;
        }
        if p.queue.is_some() {
            p.pending.push(Item {
                type_id,
                timestamp,
                payload,
            });
        }
    }

    /// Hands the media gathered since the last call to the relay. `Err`:
    /// the relay gave up because the origin refuses the stream.
    fn hand_off(&mut self) -> Result<(), String> {
        if let Some(Publishing {
            queue: Some(q),
            pending,
            ..
        }) = &mut self.publishing
            && !pending.is_empty()
        {
            return q.push(pending.drain(..));
        }
        Ok(())
    }

    /// Ends the publish session (teardown or disconnect); the relay flushes on its own.
    fn end_publish(&mut self, teardown: bool) {
        // A refused stream ends here anyway.
        let _ = self.hand_off();
        let Some(mut p) = self.publishing.take() else { return };
        if let Some(q) = p.queue.take() {
            q.close();
        }
        if let Some(mut rec) = p.recorder.take() {
            let _ = rec.flush();
        }
        if teardown {
            self.guard.unpublish();
        }
        let stream = self.ctx.registry.stream_keys().show(&p.stream);
        debug!(%stream, stream_id = p.stream_id, teardown, "publish ended");
    }
}

/// An `onStatus` on the publisher's stream: level, code and description.
fn on_status(stream_id: u32, level: &str, code: &str, description: &str) -> Message {
    Message::command(
        stream_id,
        "onStatus",
        0.0,
        vec![
            Value::Null,
            Value::object([
                ("level", Value::string(level)),
                ("code", Value::string(code)),
                ("description", Value::string(description)),
            ]),
        ],
    )
}
