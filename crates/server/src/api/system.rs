//! Health, metrics and the OpenAPI document.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa::OpenApi;

use crate::AppState;
use crate::openapi::ApiDoc;
use crate::wire::{HealthResponse, TemplateHealth, TemplateInfo, TemplateList};

/// Template readiness.
#[utoipa::path(get, path = "/v1/health", tag = "system",
    responses((status = 200, description = "Readiness of every template", body = HealthResponse)))]
pub async fn health(State(state): State<Arc<AppState>>) -> Json<HealthResponse> {
    let mut templates = BTreeMap::new();
    for served in state.templates.all() {
        let workers = served.workers.clone();
        let (ram_bytes, pool) =
            tokio::task::spawn_blocking(move || (workers.ram_bytes(), workers.pool()))
                .await
                .unwrap_or_default();
        templates.insert(
            served.name.clone(),
            TemplateHealth {
                ready: ram_bytes.is_some(),
                memory_mb: ram_bytes.map_or(0, |b| b >> 20),
                pool_depth: pool.depth,
                languages: served.languages.clone(),
            },
        );
    }
    let ready = templates.values().all(|t| t.ready);
    Json(HealthResponse {
        status: if ready { "ok" } else { "degraded" }.to_string(),
        templates,
    })
}

/// The templates this server serves.
#[utoipa::path(get, path = "/v1/templates", tag = "system",
    responses(
        (status = 200, description = "Every served template, the default first", body = TemplateList),
        (status = 401, description = "Missing or invalid API key", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn templates(State(state): State<Arc<AppState>>) -> Json<TemplateList> {
    let default = state.templates.default().name.clone();
    Json(TemplateList {
        templates: state
            .templates
            .all()
            .iter()
            .map(|t| TemplateInfo {
                default: t.name == default,
                ..t.info.clone()
            })
            .collect(),
    })
}

/// Prometheus text.
#[utoipa::path(get, path = "/v1/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    state.metrics.sessions_live.set(state.sessions.len() as i64);
    let (running, waiting) = state.slots.occupancy();
    state.metrics.executions_running.set(running as i64);
    state.metrics.executions_waiting.set(waiting as i64);
    state
        .metrics
        .results_reserved_bytes
        .set(state.results.reserved_bytes() as i64);
    let rendered = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || state.metrics.render(&state.templates))
            .await
            .unwrap_or_default()
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        rendered,
    )
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "system",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API")))]
pub async fn openapi() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}
