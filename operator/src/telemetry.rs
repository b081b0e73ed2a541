//! Metrics, health and readiness of the operator.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabel {
    pub(crate) kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PhaseLabel {
    pub(crate) phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DecisionLabel {
    /// `allow`, `hold`, `start` or `error`.
    pub(crate) decision: &'static str,
}

/// Every metric of the operator.
#[derive(Clone)]
pub(crate) struct Metrics {
    pub(crate) reconciles: Counter,
    pub(crate) reconcile_errors: Family<ErrorLabel, Counter>,
    pub(crate) reconcile_duration: Histogram,
    pub(crate) drains: Family<PhaseLabel, Gauge>,
    pub(crate) drain_duration: Histogram,
    pub(crate) migrated: Counter,
    pub(crate) webhook_decisions: Family<DecisionLabel, Counter>,
    pub(crate) webhook_duration: Histogram,
    pub(crate) webhook_connections: Counter,
    pub(crate) leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            // 1 ms to ~11 s in steps of 1.5x: fine enough for p50/p99.
            reconcile_duration: Histogram::new(exponential_buckets(0.001, 1.5, 24)),
            drains: Family::default(),
            drain_duration: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            migrated: Counter::default(),
            webhook_decisions: Family::default(),
            // 0.1 ms to ~1.1 s in steps of 1.5x.
            webhook_duration: Histogram::new(exponential_buckets(0.0001, 1.5, 24)),
            webhook_connections: Counter::default(),
            leader: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Every label set known in advance, at zero: exported, and seen by a
    /// rate or an alert, before its first event.
    fn start_at_zero(&self) {
        for kind in ["kube", "token", "invalid"] {
            self.reconcile_errors.get_or_create(&ErrorLabel { kind }).inc_by(0);
        }
        for decision in ["allow", "hold", "start", "error"] {
            self.webhook_decisions
                .get_or_create(&DecisionLabel { decision })
                .inc_by(0);
        }
    }

    pub(crate) fn register(&self, r: &mut Registry) {
        self.start_at_zero();
        let r = r.sub_registry_with_prefix("ingest_operator");
        r.register("reconciles", "IngestDrain reconciles", self.reconciles.clone());
        r.register(
            "reconcile_errors",
            "Failed reconciles by kind",
            self.reconcile_errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time of one reconcile",
            self.reconcile_duration.clone(),
        );
        r.register(
            "drains",
            "IngestDrains by phase (as last reconciled)",
            self.drains.clone(),
        );
        r.register(
            "drain_duration_seconds",
            "Start to completion of drains",
            self.drain_duration.clone(),
        );
        r.register(
            "publishers_migrated",
            "Publishers moved off drained pods",
            self.migrated.clone(),
        );
        r.register(
            "webhook_decisions",
            "Eviction gate answers",
            self.webhook_decisions.clone(),
        );
        r.register(
            "webhook_duration_seconds",
            "Time to answer an eviction review",
            self.webhook_duration.clone(),
        );
        r.register(
            "webhook_connections",
            "TCP connections accepted by the eviction webhook (an API server keeps reusing one)",
            self.webhook_connections.clone(),
        );
        r.register("leader", "1 while this replica holds the Lease", self.leader.clone());
        ingest_runtime::register_build_info(r, env!("CARGO_PKG_VERSION"));
    }
}

/// Shared state of the HTTP endpoints.
#[derive(Clone)]
pub(crate) struct Health {
    pub(crate) registry: Arc<Registry>,
    /// True once the caches the webhook answers from are filled.
    pub(crate) ready: Arc<AtomicBool>,
}

pub(crate) fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced\n")
    }
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &h.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            String::new(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_label_sets_and_build_info_are_exported_before_any_event() {
        let mut registry = Registry::default();
        Metrics::default().register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoded");
        for series in [
            "ingest_operator_reconcile_errors_total{kind=\"token\"} 0",
            "ingest_operator_webhook_decisions_total{decision=\"hold\"} 0",
            "ingest_operator_webhook_decisions_total{decision=\"error\"} 0",
            "ingest_operator_webhook_connections_total 0",
        ] {
            assert!(text.lines().any(|l| l == series), "{series} missing from:\n{text}");
        }
        assert!(text.contains("ingest_operator_build_info{version=\""), "{text}");
    }
}
