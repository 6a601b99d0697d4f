//! `POST /v1/exec` and `POST /v1/exec/batch`: code in fresh forks of a served template.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, header};
use axum::response::Response;
use axum::{Extension, Json};
use forkvm_protocol::exec::{ExecRequest, ExecResult};
use forkvm_worker::{Cancellation, Tap, Workers};

use super::{Caller, CancelOnDrop, acquire_slot, json_response, stream, worker_error};
use crate::AppState;
use crate::error::ApiError;
use crate::result_json::JsonPieces;
use crate::wire::{BatchBody, BatchResponse, ExecBody, ExecResponse};

/// Whether the client asked for Server-Sent Events.
pub fn wants_stream(body: &ExecBody, headers: &HeaderMap) -> bool {
    body.stream
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"))
}

/// Runs `request` for `caller` in a fresh fork (or one the caller's earlier request used,
/// reset exactly) on a blocking thread, within an execution slot.
async fn run(
    state: &Arc<AppState>,
    workers: Arc<Workers>,
    caller: &str,
    request: ExecRequest,
    tap: Option<Tap>,
) -> Result<ExecResult, ApiError> {
    let slot = acquire_slot(state, caller).await?;
    let tenant = caller.to_string();
    let cancellation = Cancellation::default();
    let cancel_on_drop = CancelOnDrop::new(cancellation.clone());
    let result = tokio::task::spawn_blocking(move || {
        workers.exec(request, tap, Some(&tenant), &cancellation)
    })
    .await;
    cancel_on_drop.disarm();
    let mut result = result
        .map_err(|e| ApiError::internal(format!("execution thread failed: {e}")))?
        .map_err(|e| worker_error(e, "files"))?;
    result.timings.queue_us = slot.waited.as_micros() as u64;
    state.metrics.record(&result);
    Ok(result)
}

/// Run code in a fresh sandbox.
#[utoipa::path(post, path = "/v1/exec", tag = "exec", request_body = ExecBody,
    responses(
        (status = 200, description = "How the code ran (or a text/event-stream of `stdout`, `stderr` and `result` events when streaming)", body = ExecResponse),
        (status = 400, description = "Malformed JSON", body = crate::error::ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = crate::error::ErrorBody),
        (status = 413, description = "Body too large", body = crate::error::ErrorBody),
        (status = 422, description = "A field has a value that is not allowed", body = crate::error::ErrorBody),
        (status = 429, description = "Rate limit or sandbox quota reached (see Retry-After)", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn exec(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Json<ExecBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let mut request = body.to_request(&state.config.maxima, state.config.default_timeout)?;
    let workers = state
        .templates
        .choose(body.template.as_deref(), &request.language)?
        .workers
        .clone();
    let permit = state.fairness.reserve(&caller, 1)?;
    let hold = state
        .results
        .reserve(std::slice::from_mut(&mut request))
        .await?;
    if wants_stream(&body, &headers) {
        let state = state.clone();
        let timeout = request.limits.timeout;
        return Ok(stream::spawn(timeout, hold, move |tap| async move {
            let _permit = permit;
            run(&state, workers, &caller, request, Some(tap)).await
        }));
    }
    let result = run(&state, workers, &caller, request, None).await?;
    drop(permit);
    Ok(json_response(JsonPieces::exec(result), hold))
}

pub fn error_body(error: ApiError) -> crate::error::ErrorBody {
    crate::error::ErrorBody {
        error: crate::error::ErrorDetail {
            kind: error.kind.to_string(),
            message: error.message,
            field: error.field,
        },
    }
}

/// Run several snippets in parallel, each in its own fresh sandbox.
#[utoipa::path(post, path = "/v1/exec/batch", tag = "exec", request_body = BatchBody,
    responses(
        (status = 200, description = "Results in request order", body = BatchResponse),
        (status = 422, description = "A field has a value that is not allowed (the field names the execution)", body = crate::error::ErrorBody),
        (status = 429, description = "Rate limit or sandbox quota reached", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn batch(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
    body: Result<Json<BatchBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    if body.executions.is_empty() || body.executions.len() > state.config.max_batch {
        return Err(ApiError::invalid(
            "executions",
            format!("give 1 to {} executions", state.config.max_batch),
        ));
    }
    let mut requests = Vec::with_capacity(body.executions.len());
    let mut workers = Vec::with_capacity(body.executions.len());
    for (i, execution) in body.executions.iter().enumerate() {
        let in_batch = |mut e: ApiError| {
            e.field = Some(format!("executions[{i}].{}", e.field.unwrap_or_default()));
            e
        };
        let request = execution
            .to_request(&state.config.maxima, state.config.default_timeout)
            .map_err(in_batch)?;
        let served = state
            .templates
            .choose(execution.template.as_deref(), &request.language)
            .map_err(in_batch)?;
        workers.push(served.workers.clone());
        requests.push(request);
    }
    let _permit = state.fairness.reserve(&caller, requests.len())?;
    // One response cap for the whole batch: its members share it.
    let hold = state.results.reserve(&mut requests).await?;
    // Run within this handler (each on a blocking thread), not as detached tasks: a
    // client that goes away drops them all, which cancels them.
    let runs = requests
        .into_iter()
        .zip(workers)
        .map(|(request, workers)| run(&state, workers, &caller, request, None));
    let results = futures_util::future::try_join_all(runs).await?;
    Ok(json_response(JsonPieces::batch(results), hold))
}
