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
use crate::wire::{HealthResponse, TemplateHealth};

/// Template readiness.
#[utoipa::path(get, path = "/v1/health", tag = "system",
    responses((status = 200, description = "Readiness of every template", body = HealthResponse)))]
pub async fn health(State(state): State<Arc<AppState>>) -> Json<HealthResponse> {
    let mut templates = BTreeMap::new();
    let pools: BTreeMap<String, usize> = state
        .engine
        .pool_stats()
        .into_iter()
        .map(|(name, stats)| (name, stats.depth))
        .collect();
    let engine = state.engine.clone();
    let name = state.config.template.clone();
    let loaded = tokio::task::spawn_blocking(move || engine.template(&name).ok())
        .await
        .ok()
        .flatten();
    templates.insert(
        state.config.template.clone(),
        TemplateHealth {
            ready: loaded.is_some(),
            memory_mb: loaded.as_ref().map_or(0, |t| t.meta.ram_bytes >> 20),
            pool_depth: pools.get(&state.config.template).copied().unwrap_or(0),
        },
    );
    let ready = templates.values().all(|t| t.ready);
    Json(HealthResponse {
        status: if ready { "ok" } else { "degraded" }.to_string(),
        templates,
    })
}

/// Prometheus text.
#[utoipa::path(get, path = "/v1/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    state.metrics.sessions_live.set(state.sessions.len() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&state.engine),
    )
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "system",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API")))]
pub async fn openapi() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}
