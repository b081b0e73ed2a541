//! Prometheus metrics of one ingest pod.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Capability classes of a connection, as `ingest_connections` and
/// `ingest_received_bytes_total` label them.
pub const CAPABILITIES: [&str; 3] = ["go_away", "reconnect_request", "incapable"];

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
#[derive(Clone, Debug)]
pub struct Metrics {
    pub connections: Family<CapabilityLabel, Gauge>,
    pub publishes: Counter,
    /// Bytes received, by the connection's capability class.
    pub bytes_in: Family<CapabilityLabel, Counter>,
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
    /// From a reconnect signal to its publisher's connection closing.
    pub signal_to_disconnect: Family<SignalLabel, Histogram, fn() -> Histogram>,
    /// From a publish starting to its relay's first audio or video written upstream.
    pub relay_first_delivery: Histogram,
    /// Unix seconds when the running drain's incapable policy applies; 0: none.
    pub drain_deadline: Gauge<f64, AtomicU64>,
    /// Connections closed by the `disconnect` policy at a drain's deadline.
    pub drain_cut: Counter,
}

/// 10 ms to ~41 s: a publisher leaves at its next keyframe, or at the
/// signalled-quiet close, or at the deadline.
fn signal_to_disconnect_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 2.0, 13))
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            connections: Family::default(),
            publishes: Counter::default(),
            bytes_in: Family::default(),
            bytes_relayed: Counter::default(),
            signals: Family::default(),
            migrations: Counter::default(),
            publisher_ends: Counter::default(),
            connection_errors: Family::default(),
            relay_buffer_bytes: Gauge::default(),
            relay_retries: Counter::default(),
            relay_reconnects: Counter::default(),
            relay_dropped_bytes: Counter::default(),
            relay_budget_bytes: Gauge::default(),
            relay_refused: Counter::default(),
            publish_auth: Family::default(),
            relays_active: Gauge::default(),
            draining: Gauge::default(),
            drain_phase: Family::default(),
            signal_to_disconnect: Family::new_with_constructor(signal_to_disconnect_histogram),
            // 1 ms (the origin free at once) to ~33 s (a long handover) in steps of 2x.
            relay_first_delivery: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            drain_deadline: Gauge::default(),
            drain_cut: Counter::default(),
        }
    }
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
        self.register_handover(r);
        ingest_runtime::register_build_info(r, env!("CARGO_PKG_VERSION"));
    }

    /// Every label set known in advance, at zero: a family is exported (and
    /// an alert or a rate over it sees a series) before its first event.
    fn start_at_zero(&self) {
        for capability in CAPABILITIES {
            self.connections.get_or_create(&CapabilityLabel { capability }).set(0);
            self.bytes_in.get_or_create(&CapabilityLabel { capability }).inc_by(0);
        }
        for kind in ["go_away", "reconnect_request"] {
            self.signals.get_or_create(&SignalLabel { kind }).inc_by(0);
            // Created empty; the guard holds the family's lock, drop it at once.
            drop(self.signal_to_disconnect.get_or_create(&SignalLabel { kind }));
        }
        for result in ["allow", "deny", "error", "timeout"] {
            self.publish_auth.get_or_create(&ResultLabel { result }).inc_by(0);
        }
        for phase in crate::drain::Phase::ALL {
            let phase = phase.label();
            self.drain_phase.get_or_create(&PhaseLabel { phase }).set(0);
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
            "Bytes received from publishers, by their announced capability",
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
        r.register(
            "drain_deadline_timestamp_seconds",
            "Unix time when the running drain's incapable policy applies, 0 when no drain runs",
            self.drain_deadline.clone(),
        );
    }

    /// How long moves take, seen from this pod: its side of a handover.
    fn register_handover(&self, r: &mut Registry) {
        r.register(
            "signal_to_disconnect_seconds",
            "From a reconnect signal to its publisher's connection closing, by signal kind",
            self.signal_to_disconnect.clone(),
        );
        r.register(
            "relay_first_delivery_seconds",
            "From a publish starting on this pod to its relay's first audio or video written to the origin",
            self.relay_first_delivery.clone(),
        );
        r.register(
            "drain_cut_publishers",
            "Publishers disconnected by the incapable policy `disconnect` at a drain's deadline",
            self.drain_cut.clone(),
        );
    }

    /// The `/metrics` text of these metrics alone.
    #[cfg(test)]
    pub(crate) fn scrape(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handover_measures_are_exported_from_the_start() {
        let text = Metrics::default().scrape();
        for line in [
            "# TYPE ingest_signal_to_disconnect_seconds histogram",
            "ingest_signal_to_disconnect_seconds_count{kind=\"go_away\"} 0",
            "ingest_signal_to_disconnect_seconds_count{kind=\"reconnect_request\"} 0",
            "ingest_signal_to_disconnect_seconds_bucket{le=\"0.01\",kind=\"go_away\"} 0",
            "# TYPE ingest_relay_first_delivery_seconds histogram",
            "ingest_relay_first_delivery_seconds_count 0",
            "ingest_relay_first_delivery_seconds_bucket{le=\"0.001\"} 0",
            "# TYPE ingest_received_bytes counter",
            "ingest_received_bytes_total{capability=\"go_away\"} 0",
            "ingest_received_bytes_total{capability=\"reconnect_request\"} 0",
            "ingest_received_bytes_total{capability=\"incapable\"} 0",
            "# TYPE ingest_drain_deadline_timestamp_seconds gauge",
            "ingest_drain_deadline_timestamp_seconds 0.0",
            "# TYPE ingest_drain_cut_publishers counter",
            "ingest_drain_cut_publishers_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn every_drain_phase_is_exported_at_zero_before_any_drain() {
        let text = Metrics::default().scrape();
        for phase in ["propagating", "signalling", "drained", "timed_out", "cancelled"] {
            let line = format!("ingest_drain_phase{{phase=\"{phase}\"}} 0");
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }

    #[test]
    fn the_handover_histograms_resolve_10_ms_and_30_s() {
        let m = Metrics::default();
        for seconds in [0.015, 35.0] {
            m.signal_to_disconnect
                .get_or_create(&SignalLabel { kind: "go_away" })
                .observe(seconds);
        }
        m.relay_first_delivery.observe(0.0015);
        m.relay_first_delivery.observe(25.0);
        let text = m.scrape();
        for line in [
            "ingest_signal_to_disconnect_seconds_bucket{le=\"0.01\",kind=\"go_away\"} 0",
            "ingest_signal_to_disconnect_seconds_bucket{le=\"0.02\",kind=\"go_away\"} 1",
            "ingest_signal_to_disconnect_seconds_bucket{le=\"20.48\",kind=\"go_away\"} 1",
            "ingest_signal_to_disconnect_seconds_bucket{le=\"40.96\",kind=\"go_away\"} 2",
            "ingest_relay_first_delivery_seconds_bucket{le=\"0.001\"} 0",
            "ingest_relay_first_delivery_seconds_bucket{le=\"0.002\"} 1",
            "ingest_relay_first_delivery_seconds_bucket{le=\"16.384\"} 1",
            "ingest_relay_first_delivery_seconds_bucket{le=\"32.768\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
    }
}
