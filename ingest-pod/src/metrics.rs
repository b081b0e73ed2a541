//! Prometheus metrics of one ingest pod.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapabilityLabel {
    /// `go_away`, `reconnect_request` or `incapable`.
    pub capability: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignalLabel {
    /// `go_away` or `reconnect_request`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Label of a publish callback verdict.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Every metric the pod exports. Cheap to clone (the metrics are `Arc`s inside).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub connections: Family<CapabilityLabel, Gauge>,
    pub publishes: Counter,
    pub bytes_in: Counter,
    pub bytes_relayed: Counter,
    pub signals: Family<SignalLabel, Counter>,
    pub migrations: Counter,
    pub publisher_ends: Counter,
    pub connection_errors: Family<ReasonLabel, Counter>,
    pub relay_buffer_bytes: Gauge,
    pub relay_retries: Counter,
    pub relay_reconnects: Counter,
    pub relay_dropped_bytes: Counter,
    pub relay_budget_bytes: Gauge,
    pub relay_refused: Counter,
    pub publish_auth: Family<ResultLabel, Counter>,
    pub relays_active: Gauge,
    pub draining: Gauge,
    pub drain_phase: Family<PhaseLabel, Gauge>,
}

impl Metrics {
    /// Registers every metric under the `ingest` prefix.
    pub fn register(&self, registry: &mut Registry) {
        self.start_at_zero();
        let r = registry.sub_registry_with_prefix("ingest");
        self.register_publishers(r);
        self.register_relay_buffers(r);
        self.register_publish_verdicts(r);
        self.register_state(r);
        ingest_runtime::register_build_info(r, env!("CARGO_PKG_VERSION"));
    }

    /// Every label set known in advance, at zero: a family is exported (and
    /// an alert or a rate over it sees a series) before its first event.
    fn start_at_zero(&self) {
        for capability in ["go_away", "reconnect_request", "incapable"] {
            self.connections.get_or_create(&CapabilityLabel { capability }).set(0);
        }
        for kind in ["go_away", "reconnect_request"] {
            self.signals.get_or_create(&SignalLabel { kind }).inc_by(0);
        }
        for result in ["allow", "deny", "error", "timeout"] {
            self.publish_auth.get_or_create(&ResultLabel { result }).inc_by(0);
        }
    }

    /// Connections, publish sessions and what their publishers did.
    fn register_publishers(&self, r: &mut Registry) {
        r.register(
            "connections",
            "Open RTMP connections by announced capability",
            self.connections.clone(),
        );
        r.register("publishes", "Publish sessions started", self.publishes.clone());
        r.register(
            "received_bytes",
            "Bytes received from publishers",
            self.bytes_in.clone(),
        );
        r.register(
            "relayed_bytes",
            "Media bytes written to the upstream origin",
            self.bytes_relayed.clone(),
        );
        r.register("signals", "Reconnect signals sent to publishers", self.signals.clone());
        r.register(
            "migrations",
            "Signalled publishers that left this pod",
            self.migrations.clone(),
        );
        r.register(
            "publisher_ends",
            "Publishers that left without being signalled",
            self.publisher_ends.clone(),
        );
        r.register(
            "connection_errors",
            "Connections closed for a protocol or I/O error",
            self.connection_errors.clone(),
        );
    }

    /// What waits for the upstream origin, and its retries.
    fn register_relay_buffers(&self, r: &mut Registry) {
        r.register(
            "relay_buffer_bytes",
            "Bytes waiting for the upstream origin, per-message overhead included",
            self.relay_buffer_bytes.clone(),
        );
        r.register(
            "relay_retries",
            "Upstream publish attempts refused or failed",
            self.relay_retries.clone(),
        );
        r.register(
            "relay_reconnects",
            "Upstream connections lost mid-stream",
            self.relay_reconnects.clone(),
        );
        r.register(
            "relay_dropped_bytes",
            "Media bytes dropped (whole GOPs) because a relay buffer or the pod's budget was full",
            self.relay_dropped_bytes.clone(),
        );
        r.register(
            "relay_budget_bytes",
            "The pod-wide budget of every relay buffer (--relay-memory-budget)",
            self.relay_budget_bytes.clone(),
        );
    }

    /// Verdicts on publishes: the callback's, and the origin refusing a stream.
    fn register_publish_verdicts(&self, r: &mut Registry) {
        r.register(
            "publish_auth",
            "Publish callback verdicts (allow, deny, error, timeout)",
            self.publish_auth.clone(),
        );
        r.register(
            "relay_refused",
            "Publishes ended because the origin refused the stream (not busy) too often",
            self.relay_refused.clone(),
        );
    }

    /// Relays running and the drain.
    fn register_state(&self, r: &mut Registry) {
        r.register(
            "relays_active",
            "Upstream relays still running (publishing or flushing)",
            self.relays_active.clone(),
        );
        r.register(
            "draining",
            "1 while a drain is under way or done, 0 while serving",
            self.draining.clone(),
        );
        r.register("drain_phase", "1 for the current drain phase", self.drain_phase.clone());
    }
}
