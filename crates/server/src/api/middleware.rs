//! Authentication, rate limiting, request observation, and one shape for every error.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
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

/// Reads an authenticated request's whole body before its handler runs: within the body
/// timeout (a client trickling its body holds its connection and buffer no longer) and
/// within the body limit. Only after authentication, so an anonymous client never makes
/// the server buffer anything.
pub async fn read_body(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let limit = state.config.max_body_bytes;
    let timeout = state.config.connections.body_timeout;
    // What the body will hold, from the server's budget for bodies, until the request is
    // answered.
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
    let in_process = parts
        .extensions
        .get::<super::mcp::InProcessCall>()
        .is_some();
    let expected = match declared {
        _ if in_process => 0,
        Some(length) => length.min(limit as u64),
        None if chunked => limit as u64,
        None => 0,
    };
    let _hold = if expected > 0 {
        match state.bodies.reserve_bytes(expected).await {
            Ok(hold) => Some(hold),
            Err(e) => return e.into_response(),
        }
    } else {
        None
    };
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) if is_length_limit(&e) => {
            return ApiError::too_large(format!("the request body is over {limit} bytes"))
                .into_response();
        }
        Ok(Err(e)) => {
            return ApiError::with_status(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("reading the request body: {e}"),
            )
            .into_response();
        }
        Err(_) => {
            return ApiError::with_status(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs_f64()
                ),
            )
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Whether reading a body failed on its size limit.
fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
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

/// Most bytes of a framework error's text kept when it is turned into the JSON shape.
const MAX_ERROR_TEXT: usize = 4096;

/// Gives the errors axum makes itself (an unknown route, a method a route lacks, a body
/// over the size limit, a path that does not decode) the same JSON shape as the
/// handlers' own, so a client parses one kind of error body everywhere.
pub async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let text = axum::body::to_bytes(response.into_body(), MAX_ERROR_TEXT)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let kind = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal",
        _ => "invalid_request",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let mut response = ApiError::with_status(status, kind, message).into_response();
    if let Some(allow) = allow {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    response
}
