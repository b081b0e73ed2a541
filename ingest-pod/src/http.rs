//! `/healthz`, `/readyz`, `/metrics` and `/status` (JSON, for people and tests).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;

use crate::drain::Drainer;
use crate::registry::{ConnInfo, Registry};

#[derive(Clone)]
pub struct HttpState {
    pub registry: Arc<Registry>,
    pub drainer: Arc<Drainer>,
    pub metrics: Arc<prometheus_client::registry::Registry>,
    pub pod_name: String,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(state)
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.registry.serving() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    }
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.metrics) {
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

/// The pod's state as JSON.
#[derive(Debug, Serialize)]
pub struct StatusView {
    pub pod: String,
    pub serving: bool,
    pub connections: Vec<ConnInfo>,
    pub relays_active: u64,
    pub drain: Option<DrainView>,
}

#[derive(Debug, Serialize)]
pub struct DrainView {
    pub id: String,
    pub phase: &'static str,
    pub signalled: u64,
    pub migrated: u64,
    pub remaining: u64,
    pub left_at_deadline: u64,
}

async fn status(State(s): State<HttpState>) -> impl IntoResponse {
    let drain = s.drainer.status().map(|d| DrainView {
        id: d.spec.id,
        phase: d.phase.label(),
        signalled: d.signalled,
        migrated: d.migrated,
        remaining: d.remaining,
        left_at_deadline: d.left_at_deadline,
    });
    axum::Json(StatusView {
        pod: s.pod_name.clone(),
        serving: s.registry.serving(),
        connections: s
            .registry
            .connections()
            .into_iter()
            .map(|c| ConnInfo {
                stream: c.stream.as_deref().map(|k| s.registry.stream_keys().show(k)),
                ..c
            })
            .collect(),
        relays_active: s.registry.relays_active(),
        drain,
    })
}
