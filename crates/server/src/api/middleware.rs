//! Authentication, rate limiting and request observation.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::Caller;
use crate::AppState;
use crate::error::ApiError;

/// Identifies the caller by `Authorization: Bearer <key>` (or as `anonymous` when auth is
/// off), applies the key's rate limit, and hands the handlers a `Caller`.
pub async fn authenticate(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let caller = match &state.config.keys {
        None => "anonymous".to_string(),
        Some(keys) => {
            let token = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            match token.and_then(|t| keys.identify(t)) {
                Some(id) => id,
                None if token.is_none() => {
                    return ApiError::unauthorized("missing `Authorization: Bearer <key>` header")
                        .into_response();
                }
                None => return ApiError::unauthorized("invalid API key").into_response(),
            }
        }
    };
    tracing::Span::current().record("key", caller.as_str());
    if let Err(refused) = state.fairness.admit(&caller) {
        return refused.into_response();
    }
    request.extensions_mut().insert(Caller(caller));
    next.run(request).await
}

/// Gives every request a span with an id (and, once known, the key's name — never the key),
/// logs its outcome, and counts responses by status.
pub async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let id = uuid::Uuid::now_v7();
    let span = tracing::info_span!(
        "request",
        %id,
        method = %request.method(),
        path = %request.uri().path(),
        key = tracing::field::Empty,
    );
    async move {
        let started = Instant::now();
        let response = next.run(request).await;
        let status = response.status().as_u16();
        state.metrics.record_status(status);
        tracing::info!(
            status,
            micros = started.elapsed().as_micros() as u64,
            "response"
        );
        response
    }
    .instrument(span)
    .await
}
