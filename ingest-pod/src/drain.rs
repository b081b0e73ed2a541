//! The drain engine: leave the Service, signal capable publishers in
//! rate-limited waves, apply the incapable policy at the deadline, and say
//! "drained" when the last publisher and relay are gone.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use crate::metrics::PhaseLabel;
use crate::registry::{Registry, SessionCommand, SignalsEnabled};

/// What to do at the deadline with publishers that could not be signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IncapablePolicy {
    /// Keep them until they leave on their own (or the process is stopped).
    Wait,
    /// Close their connections at the deadline.
    Disconnect,
}

/// Parameters of one drain.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainSpec {
    /// Idempotency key: starting the same id again changes nothing.
    pub id: String,
    /// Time from the start until the incapable policy applies.
    pub deadline: Duration,
    /// Signals per second (0: no limit).
    pub rate: f64,
    /// Signalled publishers still connected at once (0: no limit).
    pub max_in_flight: u32,
    pub incapable: IncapablePolicy,
    /// `tcUrl`s for Reconnect Request, used round-robin; empty: no `tcUrl`.
    pub redirects: Vec<String>,
    /// Wait after leaving the Service before the first signal, so load
    /// balancers stop sending new publishers here.
    pub propagation_delay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not ready any more, waiting for endpoint propagation.
    Propagating,
    /// Signalling publishers and waiting for them to leave.
    Signalling,
    /// No publisher and no relay left.
    Drained,
    /// The deadline passed; the incapable policy was applied.
    TimedOut,
    /// Cancelled: the pod serves again.
    Cancelled,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::Propagating => "propagating",
            Phase::Signalling => "signalling",
            Phase::Drained => "drained",
            Phase::TimedOut => "timed_out",
            Phase::Cancelled => "cancelled",
        }
    }

    pub(crate) const ALL: [Phase; 5] = [
        Phase::Propagating,
        Phase::Signalling,
        Phase::Drained,
        Phase::TimedOut,
        Phase::Cancelled,
    ];
}

/// The state of the current (or last) drain.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainStatus {
    pub spec: DrainSpec,
    pub phase: Phase,
    pub started_at: SystemTime,
    pub deadline_at: SystemTime,
    /// Publishers signalled by this drain.
    pub signalled: u64,
    /// Signalled publishers that left.
    pub migrated: u64,
    /// Connections still on the pod.
    pub remaining: u64,
    /// Relays still flushing to the origin.
    pub relays_active: u64,
    /// Connections the deadline found on the pod (cut under the Disconnect
    /// policy, left alone under Wait); 0 before the deadline.
    pub left_at_deadline: u64,
}

/// Why a CancelDrain did not cancel.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CancelRefused {
    #[error("no drain runs")]
    NoDrain,
    #[error("the pod got SIGTERM: its drain always finishes, a cancel cannot bring it back")]
    Terminating,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Error {
    #[error("deadline must be positive")]
    ZeroDeadline,
    #[error("rate must be a finite number >= 0, got {0}")]
    BadRate(String),
    #[error("drain id must not be empty")]
    EmptyId,
}

struct Current {
    status: DrainStatus,
    cancel: CancellationToken,
    /// Monotonic start, for the deadline.
    started: Instant,
    /// Set by SIGTERM: the latest the deadline may be (within the grace
    /// period), whatever a replacing StartDrain asks.
    deadline_cap: Option<Instant>,
    /// Totals when the drain started; the drain reports the difference.
    base_signalled: u64,
    base_migrated: u64,
}

impl Current {
    /// The monotonic deadline: from the start, within the SIGTERM cap.
    fn deadline(&self) -> Instant {
        let own = self.started + self.status.spec.deadline;
        self.deadline_cap.map_or(own, |cap| own.min(cap))
    }

    /// Brings `spec.deadline` (and the reported deadline) within the cap.
    fn apply_cap(&mut self) {
        let deadline = self.deadline();
        self.status.spec.deadline = deadline
            .saturating_duration_since(self.started)
            .max(Duration::from_millis(1));
        self.status.deadline_at = self.status.started_at + self.status.spec.deadline;
    }
}

/// Starts, replaces and cancels drains of one pod.
pub struct Drainer {
    registry: Arc<Registry>,
    signals: SignalsEnabled,
    tracker: TaskTracker,
    current: Mutex<Option<Current>>,
    /// SIGTERM arrived: the pod is going whatever the control API says.
    terminating: std::sync::atomic::AtomicBool,
}

impl Drainer {
    pub fn new(registry: Arc<Registry>, signals: SignalsEnabled, tracker: TaskTracker) -> Arc<Self> {
        Arc::new(Self {
            registry,
            signals,
            tracker,
            current: Mutex::new(None),
            terminating: Default::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn signals(&self) -> SignalsEnabled {
        self.signals
    }

    /// Starts a drain, or returns the running one if `spec.id` is the same.
    ///
    /// A different id while a drain runs replaces its parameters (deadline
    /// counted from the original start, rate, policy, redirects); publishers
    /// already signalled are never signalled again, because that state
    /// lives with each connection.
    pub fn start(self: &Arc<Self>, spec: DrainSpec) -> Result<DrainStatus, Error> {
        if spec.id.is_empty() {
            return Err(Error::EmptyId);
        }
        if spec.deadline.is_zero() {
            return Err(Error::ZeroDeadline);
        }
        if !spec.rate.is_finite() || spec.rate < 0.0 {
            return Err(Error::BadRate(spec.rate.to_string()));
        }
        let mut current = self.lock();
        if let Some(c) = current.as_mut()
            && c.status.phase != Phase::Cancelled
        {
            if c.status.spec.id != spec.id {
                info!(old = %c.status.spec.id, new = %spec.id, "drain replaced");
                c.status.spec = spec;
                c.apply_cap();
                let deadline_at = c.status.deadline_at;
                drop(current);
                self.export_deadline(Some(deadline_at));
                self.registry.notify();
                return Ok(self.status().expect("a drain is running"));
            }
            if c.status.spec.redirects != spec.redirects {
                // The same drain with fresh targets: the operator excludes
                // pods that started draining since, for the next wave.
                info!(id = %spec.id, redirects = spec.redirects.len(), "redirect targets refreshed");
                c.status.spec.redirects = spec.redirects;
            }
            drop(current);
            return Ok(self.status().expect("a drain is running"));
        }
        let now = SystemTime::now();
        let totals = self.registry.totals();
        let status = DrainStatus {
            phase: Phase::Propagating,
            started_at: now,
            deadline_at: now + spec.deadline,
            signalled: 0,
            migrated: 0,
            remaining: self.registry.connection_count() as u64,
            relays_active: self.registry.relays_active(),
            left_at_deadline: 0,
            spec,
        };
        let cancel = CancellationToken::new();
        info!(id = %status.spec.id, deadline = ?status.spec.deadline, rate = status.spec.rate,
            policy = ?status.spec.incapable, redirects = status.spec.redirects.len(), "drain started");
        let span = info_span!("drain", id = %status.spec.id);
        let deadline_at = status.deadline_at;
        *current = Some(Current {
            status,
            cancel: cancel.clone(),
            started: Instant::now(),
            deadline_cap: None,
            base_signalled: totals.signalled,
            base_migrated: totals.migrated,
        });
        drop(current);
        self.registry.set_serving(false);
        self.registry.metrics().draining.set(1);
        self.export_phase(Phase::Propagating);
        self.export_deadline(Some(deadline_at));
        let this = self.clone();
        self.tracker
            .spawn(async move { this.run(cancel).await }.instrument(span));
        Ok(self.status().expect("a drain was just started"))
    }

    /// What SIGTERM does: the running drain (an operator's) goes on with
    /// its deadline brought within `sigterm.deadline` from now, or the
    /// SIGTERM drain starts. From now on no cancel is accepted.
    pub fn terminate(self: &Arc<Self>, sigterm: DrainSpec) -> Result<DrainStatus, Error> {
        self.terminating.store(true, std::sync::atomic::Ordering::SeqCst);
        {
            let mut current = self.lock();
            if let Some(c) = current.as_mut().filter(|c| c.status.phase != Phase::Cancelled) {
                c.deadline_cap = Some(Instant::now() + sigterm.deadline);
                c.apply_cap();
                info!(id = %c.status.spec.id, deadline = ?c.status.spec.deadline, "SIGTERM: the running drain goes on");
                let deadline_at = c.status.deadline_at;
                drop(current);
                self.export_deadline(Some(deadline_at));
                self.registry.notify();
                return Ok(self.status().expect("a drain is running"));
            }
        }
        self.start(sigterm)
    }

    /// Cancels the drain: the pod serves again. Publishers already
    /// signalled may still leave. Refused once the pod got SIGTERM.
    pub fn cancel(&self) -> Result<DrainStatus, CancelRefused> {
        if self.terminating.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(CancelRefused::Terminating);
        }
        let cancelled = {
            let mut current = self.lock();
            let c = current.as_mut().ok_or(CancelRefused::NoDrain)?;
            if c.status.phase != Phase::Cancelled {
                c.cancel.cancel();
                c.status.phase = Phase::Cancelled;
                info!(id = %c.status.spec.id, "drain cancelled, serving again");
            }
            c.status.clone()
        };
        self.registry.set_serving(true);
        self.registry.metrics().draining.set(0);
        self.export_phase(Phase::Cancelled);
        self.export_deadline(None);
        self.registry.notify();
        Ok(cancelled)
    }

    /// Stops the drain task at process exit, leaving the state as it is.
    pub fn stop(&self) {
        if let Some(c) = self.lock().as_ref() {
            c.cancel.cancel();
        }
    }

    /// The current or last drain, with live counts.
    pub fn status(&self) -> Option<DrainStatus> {
        let totals = self.registry.totals();
        let remaining = self.registry.connection_count() as u64;
        let relays = self.registry.relays_active();
        let current = self.lock();
        let c = current.as_ref()?;
        let mut s = c.status.clone();
        if s.phase != Phase::Cancelled {
            s.signalled = totals.signalled - c.base_signalled;
            s.migrated = totals.migrated - c.base_migrated;
            s.remaining = remaining;
            s.relays_active = relays;
        }
        Some(s)
    }

    /// True while a drain runs (not cancelled).
    pub fn active(&self) -> bool {
        self.lock().as_ref().is_some_and(|c| c.status.phase != Phase::Cancelled)
    }

    fn set_phase(&self, phase: Phase) {
        let changed = {
            let mut current = self.lock();
            match current.as_mut() {
                Some(c) if c.status.phase != phase && c.status.phase != Phase::Cancelled => {
                    info!(id = %c.status.spec.id, from = c.status.phase.label(), to = phase.label(), "drain phase");
                    c.status.phase = phase;
                    true
                }
                _ => false,
            }
        };
        if changed {
            self.export_phase(phase);
            self.registry.notify();
        }
    }

    fn export_phase(&self, phase: Phase) {
        for p in Phase::ALL {
            self.registry
                .metrics()
                .drain_phase
                .get_or_create(&PhaseLabel { phase: p.label() })
                .set(i64::from(p == phase));
        }
    }

    /// Exports when the incapable policy applies, in unix seconds; 0: no drain.
    fn export_deadline(&self, at: Option<SystemTime>) {
        let seconds = at
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        self.registry.metrics().drain_deadline.set(seconds);
    }

    /// The spec, the deadline, and until when a publisher whose relay has
    /// not caught up is held back (half-way to the deadline).
    fn spec(&self) -> Option<(DrainSpec, Instant, Instant)> {
        self.lock().as_ref().map(|c| {
            let deadline = c.deadline();
            let patience = c.started + deadline.saturating_duration_since(c.started) / 2;
            (c.status.spec.clone(), deadline, patience)
        })
    }

    async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let Some((spec, ..)) = self.spec() else { return };
        tokio::select! {
            () = tokio::time::sleep(spec.propagation_delay) => {}
            () = cancel.cancelled() => return,
        }
        self.set_phase(Phase::Signalling);
        let mut changes = self.registry.subscribe();
        let mut waves = Waves::new(spec.rate);
        // The policy the deadline was applied with: once, unless a drain
        // that replaced this one asks to disconnect whom Wait kept.
        let mut applied: Option<IncapablePolicy> = None;
        // The deadline found publishers left: the drain timed out for good.
        let mut timed_out = false;
        loop {
            let Some((spec, deadline_at, patience)) = self.spec() else {
                return;
            };
            let now = Instant::now();
            waves.refill(spec.rate, now);
            self.signal_wave(&spec, &mut waves, now >= patience);
            let past_deadline = Instant::now() >= deadline_at;
            let apply = match applied {
                None => true,
                Some(before) => before == IncapablePolicy::Wait && spec.incapable == IncapablePolicy::Disconnect,
            };
            if past_deadline && apply {
                applied = Some(spec.incapable);
                timed_out |= self.apply_deadline(&spec);
            }
            let empty = self.registry.connection_count() == 0 && self.registry.relays_active() == 0;
            // A drain that emptied before its deadline stays Drained.
            self.set_phase(match (timed_out, empty) {
                (true, _) => Phase::TimedOut,
                (false, true) => Phase::Drained,
                (false, false) => Phase::Signalling,
            });
            // Sleep until something changes, the next token, or the deadline.
            let mut wait = Duration::from_millis(500);
            if !past_deadline {
                wait = wait.min(
                    deadline_at
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1)),
                );
            }
            if let Some(token) = waves.next_token(spec.rate) {
                wait = wait.min(token);
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = changes.changed() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Signals the publishers ready to move, as far as the rate and the
    /// in-flight limit allow. A publisher is signalled once its relay holds
    /// the stream at the origin with its backlog delivered: its next pod's
    /// relay then waits for this one ("already publishing"), so a publisher
    /// moved twice in quick succession reaches the origin in order. Not
    /// past `impatient` (half the deadline): an origin outage must not turn
    /// a move into a cut.
    fn signal_wave(&self, spec: &DrainSpec, waves: &mut Waves, impatient: bool) {
        let conns = self.registry.connections();
        let in_flight = conns.iter().filter(|c| c.signalled.is_some()).count() as u32;
        let mut sent = 0u32;
        for c in conns
            .iter()
            .filter(|c| c.signalled.is_none() && c.publishing_since.is_some())
            .filter(|c| c.relay_caught_up || impatient)
        {
            let Some(kind) = self.signals.choose(c.caps) else {
                continue;
            };
            if spec.max_in_flight > 0 && in_flight + sent >= spec.max_in_flight {
                break;
            }
            if !waves.has_token(spec.rate) {
                break;
            }
            let tc_url = waves.redirect(spec, kind);
            if self.registry.signal(c.id, kind, tc_url.clone()) {
                info!(
                    conn = c.id,
                    stream = c
                        .stream
                        .as_deref()
                        .map(|k| self.registry.stream_keys().show(k))
                        .unwrap_or_default(),
                    kind = kind.label(),
                    tc_url = tc_url.as_deref().map(crate::keys::redact_query).unwrap_or_default(),
                    "publisher signalled"
                );
                sent += 1;
                waves.take(spec.rate);
            }
        }
    }

    /// At the deadline: applies the incapable policy to whoever is left.
    /// True if someone was (the drain timed out).
    fn apply_deadline(&self, spec: &DrainSpec) -> bool {
        let left = self.registry.connections();
        let empty = left.is_empty() && self.registry.relays_active() == 0;
        if !empty {
            warn!(remaining = left.len(), policy = ?spec.incapable, "drain deadline reached");
        }
        if let Some(c) = self.lock().as_mut() {
            c.status.left_at_deadline = left.len() as u64;
        }
        if spec.incapable == IncapablePolicy::Disconnect {
            for c in &left {
                let cut = self.registry.command(
                    c.id,
                    SessionCommand::Disconnect {
                        reason: "drain deadline",
                    },
                );
                if cut {
                    self.registry.metrics().drain_cut.inc();
                }
            }
        }
        !empty
    }
}

/// The pacing of a drain's signals: a token bucket holding up to one
/// second of signals at the drain's rate (0: no limit), and the round robin
/// over its redirect targets.
struct Waves {
    tokens: f64,
    last_refill: Instant,
    next_redirect: usize,
}

impl Waves {
    fn new(rate: f64) -> Self {
        Self {
            tokens: rate.max(1.0),
            last_refill: Instant::now(),
            next_redirect: 0,
        }
    }

    fn refill(&mut self, rate: f64, now: Instant) {
        if rate > 0.0 {
            self.tokens = (self.tokens + now.duration_since(self.last_refill).as_secs_f64() * rate).min(rate.max(1.0));
        }
        self.last_refill = now;
    }

    fn has_token(&self, rate: f64) -> bool {
        rate <= 0.0 || self.tokens >= 1.0
    }

    fn take(&mut self, rate: f64) {
        if rate > 0.0 {
            self.tokens -= 1.0;
        }
    }

    /// How long until the next token, if the bucket is empty.
    fn next_token(&self, rate: f64) -> Option<Duration> {
        (rate > 0.0 && self.tokens < 1.0)
            .then(|| Duration::from_secs_f64((1.0 - self.tokens) / rate).max(Duration::from_millis(1)))
    }

    /// The tcUrl of a Reconnect Request: the next redirect target, if any.
    fn redirect(&mut self, spec: &DrainSpec, kind: crate::registry::SignalKind) -> Option<String> {
        match kind {
            crate::registry::SignalKind::ReconnectRequest if !spec.redirects.is_empty() => {
                self.next_redirect += 1;
                Some(spec.redirects[(self.next_redirect - 1) % spec.redirects.len()].clone())
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use std::sync::atomic::Ordering;

    use super::*;
    use crate::metrics::Metrics;
    use crate::registry::{Caps, SignalKind};

    fn spec(id: &str) -> DrainSpec {
        DrainSpec {
            id: id.into(),
            deadline: Duration::from_secs(30),
            rate: 0.0,
            max_in_flight: 0,
            incapable: IncapablePolicy::Disconnect,
            redirects: vec![],
            propagation_delay: Duration::from_secs(1),
        }
    }

    fn setup() -> (Arc<Registry>, Arc<Drainer>) {
        let reg = Registry::new(Metrics::default());
        let all = SignalsEnabled {
            go_away: true,
            reconnect_request: true,
        };
        let drainer = Drainer::new(reg.clone(), all, TaskTracker::new());
        (reg, drainer)
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    /// A publisher on `reg` that announced no signal, its relay caught up,
    /// and the commands its session would get.
    fn incapable(
        reg: &Arc<Registry>,
        stream: &str,
    ) -> (
        crate::registry::ConnGuard,
        tokio::sync::mpsc::UnboundedReceiver<SessionCommand>,
    ) {
        let (mut g, rx) = reg.register(addr());
        g.connected("live", Caps::default());
        assert!(g.publish("live", stream));
        g.stats().relay_caught_up.store(true, Ordering::Relaxed);
        (g, rx)
    }

    #[tokio::test(start_paused = true)]
    async fn signals_after_propagation_and_reports_drained() {
        let (reg, drainer) = setup();
        let (mut a, mut rx) = reg.register(addr());
        a.connected(
            "live",
            Caps {
                go_away: true,
                reconnect: false,
            },
        );
        assert!(a.publish("live", "a"));
        a.stats().relay_caught_up.store(true, Ordering::Relaxed);
        let st = drainer.start(spec("d1")).unwrap();
        assert_eq!(st.phase, Phase::Propagating);
        assert!(!reg.serving());
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(rx.try_recv().is_err(), "nothing is signalled during propagation");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            rx.try_recv().unwrap(),
            SessionCommand::Signal {
                kind: SignalKind::GoAway,
                tc_url: None
            }
        );
        assert_eq!(drainer.status().unwrap().signalled, 1);
        drop(a);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let st = drainer.status().unwrap();
        assert_eq!((st.phase, st.migrated, st.remaining), (Phase::Drained, 1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn sigterm_keeps_the_running_drain_within_its_deadline_and_refuses_cancels() {
        let (reg, drainer) = setup();
        let (mut a, mut rx) = reg.register(addr());
        a.connected("live", Caps::default());
        assert!(a.publish("live", "a"));
        a.stats().relay_caught_up.store(true, Ordering::Relaxed);
        let mut operator = spec("op");
        operator.deadline = Duration::from_secs(300);
        drainer.start(operator.clone()).unwrap();
        let mut sigterm = spec("sigterm");
        sigterm.deadline = Duration::from_secs(10);
        let st = drainer.terminate(sigterm).unwrap();
        assert_eq!((st.spec.id.as_str(), st.spec.deadline), ("op", Duration::from_secs(10)));
        // A replacing StartDrain cannot push the deadline past SIGTERM's.
        operator.id = "op-2".into();
        operator.deadline = Duration::from_secs(600);
        let st = drainer.start(operator).unwrap();
        assert_eq!(
            (st.spec.id.as_str(), st.spec.deadline),
            ("op-2", Duration::from_secs(10))
        );
        assert_eq!(drainer.cancel(), Err(CancelRefused::Terminating));
        assert!(!reg.serving() && drainer.active());
        // The incapable policy applies at the capped deadline.
        tokio::time::sleep(Duration::from_millis(10_100)).await;
        assert_eq!(
            rx.try_recv().unwrap(),
            SessionCommand::Disconnect {
                reason: "drain deadline"
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_publisher_is_signalled_once_its_relay_caught_up_or_half_way_to_the_deadline() {
        let (reg, drainer) = setup();
        let (mut a, mut rx) = reg.register(addr());
        a.connected(
            "live",
            Caps {
                go_away: true,
                reconnect: false,
            },
        );
        assert!(a.publish("live", "a"));
        let (mut b, mut rx_b) = reg.register(addr());
        b.connected(
            "live",
            Caps {
                go_away: true,
                reconnect: false,
            },
        );
        assert!(b.publish("live", "b"));
        drainer.start(spec("d")).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(rx.try_recv().is_err(), "a's relay does not hold the stream yet");
        assert!(rx_b.try_recv().is_err(), "b's relay does not hold the stream yet");
        a.stats().relay_caught_up.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(matches!(rx.try_recv(), Ok(SessionCommand::Signal { .. })));
        assert!(rx_b.try_recv().is_err());
        // Past half the 30 s deadline: b goes anyway (its origin may be down).
        tokio::time::sleep(Duration::from_secs(13)).await;
        assert!(matches!(rx_b.try_recv(), Ok(SessionCommand::Signal { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn sigterm_without_a_drain_starts_its_own() {
        let (reg, drainer) = setup();
        let st = drainer.terminate(spec("sigterm")).unwrap();
        assert_eq!((st.spec.id.as_str(), st.phase), ("sigterm", Phase::Propagating));
        assert!(!reg.serving());
    }

    #[tokio::test(start_paused = true)]
    async fn same_id_is_a_no_op_and_another_id_replaces() {
        let (_reg, drainer) = setup();
        let first = drainer.start(spec("d1")).unwrap();
        let again = drainer.start(spec("d1")).unwrap();
        assert_eq!(first.started_at, again.started_at);
        // The same id with other redirect targets refreshes them, nothing else.
        let mut fresh = spec("d1");
        fresh.redirects = vec!["rtmp://pod-c/live".into()];
        fresh.deadline = Duration::from_secs(999);
        let refreshed = drainer.start(fresh).unwrap();
        assert_eq!(refreshed.spec.redirects, ["rtmp://pod-c/live"]);
        assert_eq!(
            (refreshed.started_at, refreshed.deadline_at),
            (first.started_at, first.deadline_at)
        );
        let mut other = spec("d2");
        other.deadline = Duration::from_secs(5);
        let replaced = drainer.start(other).unwrap();
        assert_eq!(replaced.spec.id, "d2");
        assert_eq!(replaced.started_at, first.started_at);
        assert_eq!(replaced.deadline_at, first.started_at + Duration::from_secs(5));
        assert_eq!(
            drainer.start(DrainSpec {
                deadline: Duration::ZERO,
                ..spec("x")
            }),
            Err(Error::ZeroDeadline)
        );
        assert!(matches!(
            drainer.start(DrainSpec {
                rate: f64::NAN,
                ..spec("x")
            }),
            Err(Error::BadRate(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limits_waves_and_prefers_reconnect_request_with_redirects() {
        let (reg, drainer) = setup();
        let mut rxs = Vec::new();
        let mut guards = Vec::new();
        for i in 0..4 {
            let (mut g, rx) = reg.register(addr());
            g.connected(
                "live",
                Caps {
                    go_away: true,
                    reconnect: true,
                },
            );
            assert!(g.publish("live", &format!("k{i}")));
            g.stats().relay_caught_up.store(true, Ordering::Relaxed);
            guards.push(g);
            rxs.push(rx);
        }
        let s = DrainSpec {
            rate: 2.0,
            redirects: vec!["rtmp://b/live".into()],
            propagation_delay: Duration::ZERO,
            ..spec("r")
        };
        drainer.start(s).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            drainer.status().unwrap().signalled,
            2,
            "a burst of one second of signals"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(drainer.status().unwrap().signalled, 3);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(drainer.status().unwrap().signalled, 4);
        assert_eq!(
            rxs[0].try_recv().unwrap(),
            SessionCommand::Signal {
                kind: SignalKind::ReconnectRequest,
                tc_url: Some("rtmp://b/live".into())
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_disconnects_incapable_and_cancel_restores_serving() {
        let (reg, drainer) = setup();
        let (_g, mut rx) = incapable(&reg, "ffmpeg");
        drainer
            .start(DrainSpec {
                deadline: Duration::from_secs(3),
                propagation_delay: Duration::ZERO,
                ..spec("d")
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2900)).await;
        assert!(rx.try_recv().is_err(), "an incapable publisher gets no signal");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            rx.try_recv().unwrap(),
            SessionCommand::Disconnect {
                reason: "drain deadline"
            }
        );
        assert_eq!(drainer.status().unwrap().phase, Phase::TimedOut);
        assert_eq!(reg.metrics().drain_cut.get(), 1, "the publisher cut at the deadline");
        drainer.cancel().expect("a drain runs");
        assert!(reg.serving());
        assert_eq!(drainer.status().unwrap().phase, Phase::Cancelled);
        assert!(!drainer.active());
    }

    #[tokio::test(start_paused = true)]
    async fn a_drained_pod_stays_drained_past_the_deadline() {
        let (_reg, drainer) = setup();
        drainer
            .start(DrainSpec {
                deadline: Duration::from_secs(1),
                propagation_delay: Duration::from_millis(100),
                ..spec("e")
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(drainer.status().unwrap().phase, Phase::Drained);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(drainer.status().unwrap().phase, Phase::Drained);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_policy_keeps_incapable_publishers() {
        let (reg, drainer) = setup();
        let (_g, mut rx) = incapable(&reg, "ffmpeg");
        let s = DrainSpec {
            deadline: Duration::from_secs(1),
            incapable: IncapablePolicy::Wait,
            propagation_delay: Duration::ZERO,
            ..spec("w")
        };
        drainer.start(s).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(rx.try_recv().is_err());
        assert_eq!(drainer.status().unwrap().phase, Phase::TimedOut);
        assert_eq!(drainer.status().unwrap().remaining, 1);
        assert_eq!(drainer.status().unwrap().left_at_deadline, 1);
        assert_eq!(reg.metrics().drain_cut.get(), 0, "kept, not cut");
    }

    #[tokio::test(start_paused = true)]
    async fn a_disconnect_drain_over_one_that_waited_past_its_deadline_cuts_who_stayed() {
        let (reg, drainer) = setup();
        let (_g, mut rx) = incapable(&reg, "ffmpeg");
        drainer
            .start(DrainSpec {
                deadline: Duration::from_secs(1),
                incapable: IncapablePolicy::Wait,
                propagation_delay: Duration::ZERO,
                ..spec("node-drain")
            })
            .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(drainer.status().unwrap().phase, Phase::TimedOut);
        assert!(rx.try_recv().is_err(), "Wait keeps the publisher");
        // `kubectl ingest drain pod ... --incapable-policy disconnect`: its
        // deadline, counted from the first drain's start, has passed too.
        drainer
            .start(DrainSpec {
                deadline: Duration::from_secs(1),
                incapable: IncapablePolicy::Disconnect,
                propagation_delay: Duration::ZERO,
                ..spec("force")
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            rx.try_recv().ok(),
            Some(SessionCommand::Disconnect {
                reason: "drain deadline"
            }),
            "the publisher the first drain kept is cut"
        );
        assert_eq!(reg.metrics().drain_cut.get(), 1);
        let status = drainer.status().unwrap();
        assert_eq!((status.phase, status.left_at_deadline), (Phase::TimedOut, 1));
    }

    /// `ingest_drain_deadline_timestamp_seconds`, as the status reports the deadline.
    fn exported_deadline(reg: &Registry) -> f64 {
        reg.metrics().drain_deadline.get()
    }

    fn unix(t: SystemTime) -> f64 {
        t.duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64()
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_gauge_follows_start_replace_sigterm_and_cancel() {
        let (reg, drainer) = setup();
        assert_eq!(exported_deadline(&reg), 0.0, "no drain");
        let mut s = spec("d1");
        s.deadline = Duration::from_secs(300);
        let st = drainer.start(s).unwrap();
        assert_eq!(exported_deadline(&reg), unix(st.deadline_at));
        let from_now = exported_deadline(&reg) - unix(SystemTime::now());
        assert!((299.0..=300.0).contains(&from_now), "{from_now}");
        let mut s = spec("d2");
        s.deadline = Duration::from_secs(60);
        let replaced = drainer.start(s).unwrap();
        assert_eq!(exported_deadline(&reg), unix(st.started_at + Duration::from_secs(60)));
        assert_eq!(exported_deadline(&reg), unix(replaced.deadline_at));
        drainer.cancel().unwrap();
        assert_eq!(exported_deadline(&reg), 0.0, "cancelled");
        let mut s = spec("d3");
        s.deadline = Duration::from_secs(300);
        drainer.start(s).unwrap();
        let capped = drainer.terminate(spec("sigterm")).unwrap();
        assert_eq!(exported_deadline(&reg), unix(capped.deadline_at));
        let from_now = exported_deadline(&reg) - unix(SystemTime::now());
        assert!((29.0..=30.0).contains(&from_now), "within SIGTERM's 30 s: {from_now}");
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_disconnect_policy_cuts_and_each_cut_publisher_counts() {
        let (reg, drainer) = setup();
        let mut held = Vec::new();
        for i in 0..3 {
            held.push(incapable(&reg, &format!("ffmpeg{i}")));
        }
        let s = DrainSpec {
            deadline: Duration::from_secs(2),
            propagation_delay: Duration::ZERO,
            ..spec("cut")
        };
        drainer.start(s).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(reg.metrics().drain_cut.get(), 0, "before the deadline");
        assert_eq!(drainer.status().unwrap().left_at_deadline, 0, "before the deadline");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(reg.metrics().drain_cut.get(), 3);
        // The sessions end as told: none remains, and the status still
        // says how many the deadline found.
        held.clear();
        let status = drainer.status().unwrap();
        assert_eq!((status.remaining, status.left_at_deadline), (0, 3));
        // The deadline applies once: later wake-ups cut nobody again.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(reg.metrics().drain_cut.get(), 3);
        assert_eq!(drainer.status().unwrap().left_at_deadline, 3);
        assert_eq!(
            reg.metrics()
                .scrape()
                .lines()
                .filter(|l| *l == "ingest_drain_cut_publishers_total 3")
                .count(),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn max_in_flight_holds_the_next_wave() {
        let (reg, drainer) = setup();
        let mut guards = Vec::new();
        for i in 0..3 {
            let (mut g, rx) = reg.register(addr());
            g.connected(
                "live",
                Caps {
                    go_away: true,
                    reconnect: false,
                },
            );
            assert!(g.publish("live", &format!("k{i}")));
            g.stats().relay_caught_up.store(true, Ordering::Relaxed);
            guards.push((g, rx));
        }
        drainer
            .start(DrainSpec {
                max_in_flight: 1,
                propagation_delay: Duration::ZERO,
                ..spec("m")
            })
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(drainer.status().unwrap().signalled, 1);
        // The signalled one leaves; the next is signalled.
        let idx = guards.iter_mut().position(|(_, rx)| rx.try_recv().is_ok()).unwrap();
        guards.remove(idx);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(drainer.status().unwrap().signalled, 2);
        assert_eq!(drainer.status().unwrap().migrated, 1);
    }
}
