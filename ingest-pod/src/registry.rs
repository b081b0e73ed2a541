//! The connections of one pod: who is connected, what they can do, who was
//! signalled. Sessions register here; the drain engine and the status API read it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::keys::StreamKeys;
use crate::metrics::{CapabilityLabel, Metrics, SignalLabel};

/// What a publisher announced in its `connect` command object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Caps {
    /// `supportsGoAway` was true or 1 (Facebook RTMP Go Away).
    pub go_away: bool,
    /// `capsEx` had bit 0x01 (Enhanced RTMP v2 Reconnect Request).
    pub reconnect: bool,
}

impl Caps {
    /// The capability class, as metrics label it: Reconnect Request wins
    /// when both are announced.
    pub fn label(self) -> &'static str {
        match (self.reconnect, self.go_away) {
            (true, _) => "reconnect_request",
            (false, true) => "go_away",
            _ => "incapable",
        }
    }
}

/// Which signals this pod may send (an operator can switch each off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalsEnabled {
    pub go_away: bool,
    pub reconnect_request: bool,
}

impl SignalsEnabled {
    /// The signal to send to a publisher with `caps`: Reconnect Request
    /// when both are possible, `None` for an incapable publisher.
    pub fn choose(&self, caps: Caps) -> Option<SignalKind> {
        if caps.reconnect && self.reconnect_request {
            Some(SignalKind::ReconnectRequest)
        } else if caps.go_away && self.go_away {
            Some(SignalKind::GoAway)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SignalKind {
    GoAway,
    ReconnectRequest,
}

impl SignalKind {
    pub fn label(self) -> &'static str {
        match self {
            SignalKind::GoAway => "go_away",
            SignalKind::ReconnectRequest => "reconnect_request",
        }
    }
}

/// Orders for a session from outside its task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    Signal { kind: SignalKind, tc_url: Option<String> },
    Disconnect { reason: &'static str },
}

/// Byte counters a session updates without taking the registry lock.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub bytes_in: AtomicU64,
    /// The publish's relay holds the stream at the origin and has delivered
    /// its backlog (or the pod relays nowhere). Until then the drain does
    /// not signal the publisher: its next pod's relay would race this one
    /// for the stream, and the origin could get the media out of order.
    pub relay_caught_up: AtomicBool,
}

/// A connection as the status API shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConnInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub app: Option<String>,
    pub stream: Option<String>,
    pub caps: Caps,
    pub connected_at: SystemTime,
    pub publishing_since: Option<SystemTime>,
    pub bytes_in: u64,
    pub signalled: Option<(SystemTime, SignalKind)>,
    /// See [`ConnStats::relay_caught_up`].
    pub relay_caught_up: bool,
}

#[derive(Debug)]
struct Entry {
    info: ConnInfo,
    stats: Arc<ConnStats>,
    tx: mpsc::UnboundedSender<SessionCommand>,
    /// When the signal went to the session, on the monotonic clock.
    signalled_at: Option<Instant>,
}

/// Counters of what happened to publishers since the pod started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub signalled: u64,
    pub migrated: u64,
    pub ended: u64,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    conns: BTreeMap<u64, Entry>,
    /// `app/stream` → connection publishing it on this pod.
    keys: HashMap<String, u64>,
    relays_active: u64,
    serving: bool,
    totals: Totals,
}

/// Shared registry of one pod's connections.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    changes: watch::Sender<u64>,
    metrics: Metrics,
    /// How stream keys are shown (set once at start; a random key before).
    stream_keys: std::sync::OnceLock<StreamKeys>,
}

impl Registry {
    pub fn new(metrics: Metrics) -> Arc<Self> {
        let inner = Inner {
            next_id: 1,
            serving: true,
            ..Inner::default()
        };
        let registry = Arc::new(Self {
            inner: Mutex::new(inner),
            changes: watch::channel(0).0,
            metrics,
            stream_keys: std::sync::OnceLock::new(),
        });
        // Export every label from the start, zeros included.
        registry.update_gauges();
        registry
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes everyone watching for changes (status watchers, the drain engine).
    pub fn notify(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Sets how stream keys are shown; the first call wins.
    pub fn set_stream_keys(&self, keys: StreamKeys) {
        let _ = self.stream_keys.set(keys);
    }

    /// How stream keys are shown in status and logs.
    pub fn stream_keys(&self) -> &StreamKeys {
        self.stream_keys.get_or_init(StreamKeys::random)
    }

    /// Registers a new connection. Dropping the guard removes it.
    pub fn register(self: &Arc<Self>, peer: SocketAddr) -> (ConnGuard, mpsc::UnboundedReceiver<SessionCommand>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(ConnStats::default());
        let id = {
            let mut inner = self.lock();
            let id = inner.next_id;
            inner.next_id += 1;
            let info = ConnInfo {
                id,
                peer,
                app: None,
                stream: None,
                caps: Caps::default(),
                connected_at: SystemTime::now(),
                publishing_since: None,
                bytes_in: 0,
                signalled: None,
                relay_caught_up: false,
            };
            inner.conns.insert(
                id,
                Entry {
                    info,
                    stats: stats.clone(),
                    tx,
                    signalled_at: None,
                },
            );
            id
        };
        self.update_gauges();
        self.notify();
        let received = self.received_counter(Caps::default());
        (
            ConnGuard {
                registry: self.clone(),
                id,
                stats,
                received,
            },
            rx,
        )
    }

    fn update_gauges(&self) {
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for e in self.lock().conns.values() {
            *counts.entry(e.info.caps.label()).or_default() += 1;
        }
        for capability in crate::metrics::CAPABILITIES {
            let n = counts.get(capability).copied().unwrap_or(0);
            self.metrics
                .connections
                .get_or_create(&CapabilityLabel { capability })
                .set(n);
        }
    }

    /// The received-bytes counter of a connection that announced `caps`.
    fn received_counter(&self, caps: Caps) -> Counter {
        let capability = caps.label();
        self.metrics
            .bytes_in
            .get_or_create(&CapabilityLabel { capability })
            .clone()
    }

    /// Sends a command to a connection's session. False if it is gone.
    pub fn command(&self, id: u64, cmd: SessionCommand) -> bool {
        self.lock().conns.get(&id).is_some_and(|e| e.tx.send(cmd).is_ok())
    }

    /// Signals a connection and records it. False if it is gone.
    pub fn signal(&self, id: u64, kind: SignalKind, tc_url: Option<String>) -> bool {
        let sent = {
            let mut inner = self.lock();
            let Some(e) = inner.conns.get_mut(&id) else {
                return false;
            };
            if e.tx.send(SessionCommand::Signal { kind, tc_url }).is_err() {
                return false;
            }
            e.info.signalled = Some((SystemTime::now(), kind));
            e.signalled_at = Some(Instant::now());
            inner.totals.signalled += 1;
            true
        };
        if sent {
            self.metrics
                .signals
                .get_or_create(&SignalLabel { kind: kind.label() })
                .inc();
            self.notify();
        }
        sent
    }

    /// Snapshot of every connection, with live byte counts.
    pub fn connections(&self) -> Vec<ConnInfo> {
        self.lock()
            .conns
            .values()
            .map(|e| ConnInfo {
                bytes_in: e.stats.bytes_in.load(Ordering::Relaxed),
                relay_caught_up: e.stats.relay_caught_up.load(Ordering::Relaxed),
                ..e.info.clone()
            })
            .collect()
    }

    pub fn connection_count(&self) -> usize {
        self.lock().conns.len()
    }

    pub fn totals(&self) -> Totals {
        self.lock().totals
    }

    /// Whether the pod takes new publishers (readiness).
    pub fn serving(&self) -> bool {
        self.lock().serving
    }

    pub fn set_serving(&self, serving: bool) {
        let changed = {
            let mut inner = self.lock();
            std::mem::replace(&mut inner.serving, serving) != serving
        };
        if changed {
            self.notify();
        }
    }

    pub fn relays_active(&self) -> u64 {
        self.lock().relays_active
    }

    /// Counts a relay that is publishing or flushing; drop the guard when it ends.
    pub fn relay_started(self: &Arc<Self>) -> RelayGuard {
        self.lock().relays_active += 1;
        self.metrics.relays_active.inc();
        RelayGuard { registry: self.clone() }
    }
}

/// Keeps a relay counted in [`Registry::relays_active`] while alive.
#[derive(Debug)]
pub struct RelayGuard {
    registry: Arc<Registry>,
}

impl Drop for RelayGuard {
    fn drop(&mut self) {
        self.registry.lock().relays_active -= 1;
        self.registry.metrics.relays_active.dec();
        self.registry.notify();
    }
}

/// A session's handle on its registry entry.
#[derive(Debug)]
pub struct ConnGuard {
    registry: Arc<Registry>,
    id: u64,
    stats: Arc<ConnStats>,
    /// `ingest_received_bytes_total` of this connection's capability class.
    received: Counter,
}

impl ConnGuard {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn stats(&self) -> &Arc<ConnStats> {
        &self.stats
    }

    /// Records what `connect` announced.
    pub fn connected(&mut self, app: &str, caps: Caps) {
        if let Some(e) = self.registry.lock().conns.get_mut(&self.id) {
            e.info.app = Some(app.to_owned());
            e.info.caps = caps;
        }
        self.received = self.registry.received_counter(caps);
        self.registry.update_gauges();
        self.registry.notify();
    }

    /// Records that `total` bytes have been read from the connection so far.
    pub fn received(&self, total: u64) {
        let before = self.stats.bytes_in.swap(total, Ordering::Relaxed);
        self.received.inc_by(total.saturating_sub(before));
    }

    /// Claims `stream` for this connection. False if another connection on
    /// this pod publishes it already.
    pub fn publish(&self, app: &str, stream: &str) -> bool {
        {
            let mut inner = self.registry.lock();
            let key = format!("{app}/{stream}");
            if inner.keys.get(&key).is_some_and(|&other| other != self.id) {
                return false;
            }
            inner.keys.insert(key, self.id);
            if let Some(e) = inner.conns.get_mut(&self.id) {
                e.info.stream = Some(stream.to_owned());
                e.info.publishing_since = Some(SystemTime::now());
            }
        }
        self.registry.metrics.publishes.inc();
        self.registry.notify();
        true
    }

    /// Releases the stream after FCUnpublish/deleteStream.
    pub fn unpublish(&self) {
        {
            let mut inner = self.registry.lock();
            release_key(&mut inner, self.id);
            if let Some(e) = inner.conns.get_mut(&self.id) {
                e.info.publishing_since = None;
            }
        }
        self.registry.notify();
    }

    pub fn was_signalled(&self) -> bool {
        self.registry
            .lock()
            .conns
            .get(&self.id)
            .is_some_and(|e| e.info.signalled.is_some())
    }
}

fn release_key(inner: &mut Inner, id: u64) {
    let stream = inner
        .conns
        .get(&id)
        .and_then(|e| Some(format!("{}/{}", e.info.app.as_deref()?, e.info.stream.as_deref()?)));
    if let Some(key) = stream
        && inner.keys.get(&key) == Some(&id)
    {
        inner.keys.remove(&key);
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let signalled = {
            let mut inner = self.registry.lock();
            release_key(&mut inner, self.id);
            let signalled = inner
                .conns
                .remove(&self.id)
                .and_then(|e| Some((e.info.signalled?.1, e.signalled_at?)));
            // A signalled publisher that leaves by any path has migrated.
            if signalled.is_some() {
                inner.totals.migrated += 1;
            } else {
                inner.totals.ended += 1;
            }
            signalled
        };
        let metrics = &self.registry.metrics;
        if let Some((kind, at)) = signalled {
            metrics.migrations.inc();
            metrics
                .signal_to_disconnect
                .get_or_create(&SignalLabel { kind: kind.label() })
                .observe(at.elapsed().as_secs_f64());
        } else {
            metrics.publisher_ends.inc();
        }
        self.registry.update_gauges();
        self.registry.notify();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:5000".parse().unwrap()
    }

    #[test]
    fn prefers_reconnect_request_and_honours_switches() {
        let both = Caps {
            go_away: true,
            reconnect: true,
        };
        let all = SignalsEnabled {
            go_away: true,
            reconnect_request: true,
        };
        assert_eq!(all.choose(both), Some(SignalKind::ReconnectRequest));
        let no_rr = SignalsEnabled {
            go_away: true,
            reconnect_request: false,
        };
        assert_eq!(no_rr.choose(both), Some(SignalKind::GoAway));
        let none = SignalsEnabled {
            go_away: false,
            reconnect_request: false,
        };
        assert_eq!(none.choose(both), None);
        assert_eq!(all.choose(Caps::default()), None);
    }

    #[test]
    fn one_publisher_per_key_and_migration_accounting() {
        let reg = Registry::new(Metrics::default());
        let (mut a, mut rx_a) = reg.register(addr());
        let (b, _rx_b) = reg.register(addr());
        a.connected(
            "live",
            Caps {
                go_away: true,
                reconnect: false,
            },
        );
        assert!(a.publish("live", "k"));
        assert!(!b.publish("live", "k"));
        assert!(reg.signal(a.id(), SignalKind::GoAway, None));
        assert_eq!(
            rx_a.try_recv().unwrap(),
            SessionCommand::Signal {
                kind: SignalKind::GoAway,
                tc_url: None
            }
        );
        drop(a);
        // The key is free once the signalled publisher left; it counts as migrated.
        assert!(b.publish("live", "k"));
        drop(b);
        assert_eq!(
            reg.totals(),
            Totals {
                signalled: 1,
                migrated: 1,
                ended: 1
            }
        );
        assert_eq!(reg.connection_count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_signalled_publisher_leaving_is_timed_under_its_signal_kind() {
        let reg = Registry::new(Metrics::default());
        let both = Caps {
            go_away: true,
            reconnect: true,
        };
        let (mut a, _rx_a) = reg.register(addr());
        a.connected("live", both);
        let (mut b, _rx_b) = reg.register(addr());
        b.connected("live", both);
        assert!(reg.signal(a.id(), SignalKind::ReconnectRequest, None));
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        drop(a);
        // Never signalled: no sample.
        drop(b);
        let text = reg.metrics().scrape();
        for line in [
            "ingest_signal_to_disconnect_seconds_count{kind=\"reconnect_request\"} 1",
            "ingest_signal_to_disconnect_seconds_sum{kind=\"reconnect_request\"} 1.5",
            "ingest_signal_to_disconnect_seconds_bucket{le=\"1.28\",kind=\"reconnect_request\"} 0",
            "ingest_signal_to_disconnect_seconds_bucket{le=\"2.56\",kind=\"reconnect_request\"} 1",
            "ingest_signal_to_disconnect_seconds_count{kind=\"go_away\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn received_bytes_count_under_the_capability_announced() {
        let reg = Registry::new(Metrics::default());
        let bytes = |capability| {
            reg.metrics()
                .bytes_in
                .get_or_create(&CapabilityLabel { capability })
                .get()
        };
        let (mut obs, _rx) = reg.register(addr());
        obs.connected(
            "live",
            Caps {
                go_away: true,
                reconnect: false,
            },
        );
        obs.received(1000);
        obs.received(1500);
        let (mut both, _rx) = reg.register(addr());
        both.connected(
            "live",
            Caps {
                go_away: true,
                reconnect: true,
            },
        );
        both.received(700);
        let (mut ffmpeg, _rx) = reg.register(addr());
        ffmpeg.connected("live", Caps::default());
        ffmpeg.received(300);
        assert_eq!(
            (bytes("go_away"), bytes("reconnect_request"), bytes("incapable")),
            (1500, 700, 300)
        );
        let shown: Vec<u64> = reg.connections().iter().map(|c| c.bytes_in).collect();
        assert_eq!(shown, [1500, 700, 300], "the status shows each connection's own count");
    }
}
