//! Sessions: sandboxes that keep their state between requests, take files in and out, and
//! fork into branches. Each belongs to the key that created it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::{Extension, Json};
use forkvm_worker::RemoteSession as Session;
use uuid::Uuid;

use super::exec::wants_stream;
use super::{
    Caller, CancelOnDrop, acquire_slot, held_response, json_response, stream, worker_error,
};
use crate::AppState;
use crate::error::ApiError;
use crate::pausing;
use crate::result_json::JsonPieces;
use crate::sessions::{Held, SessionEntry};
use crate::validate;
use crate::wire::{
    CommandBody, CreateSessionBody, ExecBody, ExecResponse, FileWritten, ForkBody, ForkResponse,
    SessionInfo, SessionList,
};

/// Most branches one fork request may make.
const MAX_FORK_COUNT: usize = 16;

fn session_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found(format!("no sandbox {raw:?}")))
}

/// Refuses to let `caller`'s sessions grow while they hold more host memory than the
/// key may.
fn check_memory(state: &AppState, caller: &str) -> Result<(), ApiError> {
    let held = state.sessions.host_bytes_of(caller);
    match state.config.key_memory_bytes {
        Some(limit) if held >= limit => Err(ApiError::quota(format!(
            "this key's sessions hold {} MiB of host memory, its limit is {} MiB: delete \
             sessions to make room",
            held >> 20,
            limit >> 20
        ))),
        _ => Ok(()),
    }
}

fn find(state: &AppState, id: &str, caller: &str) -> Result<Arc<SessionEntry>, ApiError> {
    let uuid = session_id(id)?;
    state
        .sessions
        .get(uuid, caller)
        .ok_or_else(|| ApiError::not_found(format!("no sandbox {id}")))
}

/// Runs `work` on the session on a blocking thread (the sandbox is moved there and back),
/// resuming it first if it is paused.
async fn with_session<T: Send + 'static>(
    state: &Arc<AppState>,
    entry: &SessionEntry,
    work: impl FnOnce(&mut Session) -> T + Send + 'static,
) -> Result<T, ApiError> {
    let mut guard = entry.session.lock().await;
    let mut session = match guard.take() {
        None => return Err(ApiError::not_found("the sandbox was deleted")),
        Some(Held::Running(session)) => session,
        Some(Held::Paused) => match pausing::resume(state, entry).await {
            Ok(session) => session,
            Err(e) => {
                *guard = Some(Held::Paused);
                return Err(e);
            }
        },
    };
    let joined = tokio::task::spawn_blocking(move || {
        let value = work(&mut session);
        (session, value)
    })
    .await;
    match joined {
        Ok((session, value)) => {
            entry.touch(session.host_bytes());
            *guard = Some(Held::Running(session));
            Ok(value)
        }
        Err(e) => Err(ApiError::internal(format!("sandbox thread failed: {e}"))),
    }
}

/// Tears a session down, wherever it is: its stored state is deleted, and its worker drops
/// its VM (the message is sent from a blocking thread). Either way it no longer holds
/// a sandbox of its owner's.
async fn dispose(state: &AppState, entry: &SessionEntry, held: Option<Held>) {
    if let Some(config) = &state.config.paused {
        // Awaited: once a deletion is answered, no restart brings the session back.
        let (store, id) = (config.store.clone(), entry.id.to_string());
        let _ = tokio::task::spawn_blocking(move || store.remove(&id)).await;
    }
    match held {
        Some(Held::Running(session)) => {
            state.fairness.release(&entry.owner, 1);
            tokio::task::spawn_blocking(move || drop(session));
        }
        Some(Held::Paused) => state
            .metrics
            .sessions_paused_now
            .set(state.sessions.paused_count() as i64),
        None => {}
    }
}

/// Notes a new session as running in the paused store (so a crash counts it as lost).
fn note_running(state: &AppState, entry: &SessionEntry) {
    if let Some(config) = &state.config.paused {
        config.store.mark_running(&entry.id.to_string());
    }
}

/// Create a session.
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sessions", request_body = CreateSessionBody,
    responses(
        (status = 201, description = "The new session", body = SessionInfo),
        (status = 422, description = "A field has a value that is not allowed", body = crate::error::ErrorBody),
        (status = 429, description = "Sandbox quota reached", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
    body: Bytes,
) -> Result<(StatusCode, Json<SessionInfo>), ApiError> {
    let body: CreateSessionBody = validate::optional_json(&body)?;
    validate::metadata(&body.metadata)?;
    let served = state.templates.choose(body.template.as_deref(), "")?;
    let template = served.name.clone();
    let workers = served.workers.clone();
    let ttl = match body.ttl_seconds {
        None => state.config.default_ttl,
        Some(0) => {
            return Err(ApiError::invalid(
                "ttl_seconds",
                "ttl_seconds must be positive",
            ));
        }
        Some(s) if Duration::from_secs(s) > state.config.max_ttl => {
            return Err(ApiError::invalid(
                "ttl_seconds",
                format!(
                    "ttl_seconds may be at most {}",
                    state.config.max_ttl.as_secs()
                ),
            ));
        }
        Some(s) => Duration::from_secs(s),
    };
    check_memory(&state, &caller)?;
    let permit = state.fairness.reserve(&caller, 1)?;
    let session = tokio::task::spawn_blocking(move || workers.create_session())
        .await
        .map_err(|e| ApiError::internal(format!("sandbox thread failed: {e}")))?
        .map_err(|e| worker_error(e, "template"))?;
    permit.keep();
    let entry = Arc::new(SessionEntry::new(
        &caller,
        &template,
        body.metadata,
        ttl,
        session,
    ));
    note_running(&state, &entry);
    state.sessions.insert(entry.clone());
    Ok((StatusCode::CREATED, Json(entry.info())))
}

/// List the caller's sessions.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sessions",
    responses((status = 200, description = "The caller's sessions", body = SessionList)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
) -> Json<SessionList> {
    Json(SessionList {
        sandboxes: state
            .sessions
            .list(&caller)
            .iter()
            .map(|e| e.info())
            .collect(),
    })
}

/// Show one session.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session", body = SessionInfo),
        (status = 404, description = "No such session for this key", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn show(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    Ok(Json(find(&state, &id, &caller)?.info()))
}

/// Delete a session (its memory goes back to the host).
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such session for this key", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let uuid = session_id(&id)?;
    let entry = state
        .sessions
        .remove(uuid, &caller)
        .ok_or_else(|| ApiError::not_found(format!("no sandbox {id}")))?;
    let held = entry.session.lock().await.take();
    dispose(&state, &entry, held).await;
    Ok(StatusCode::NO_CONTENT)
}

/// Run code in a session: variables, imports and files persist between calls.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "sessions", request_body = ExecBody,
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "How the code ran (or an event stream)", body = ExecResponse),
        (status = 404, description = "No such session for this key", body = crate::error::ErrorBody),
        (status = 409, description = "The session's code has exited; it cannot run more", body = crate::error::ErrorBody),
        (status = 422, description = "A field has a value that is not allowed", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn exec(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<ExecBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    run_in_session(state, caller, id, headers, body).await
}

/// Run a command line in a session (`bash -c CMD`), in its filesystem and with its
/// environment; background processes it starts stay in the session.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/commands", tag = "sessions", request_body = CommandBody,
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "How the command ran (or an event stream)", body = ExecResponse),
        (status = 404, description = "No such session for this key", body = crate::error::ErrorBody),
        (status = 409, description = "The session's code has exited; it cannot run more", body = crate::error::ErrorBody),
        (status = 422, description = "A field has a value that is not allowed", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn commands(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<CommandBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    run_in_session(state, caller, id, headers, body.into_exec()).await
}

async fn run_in_session(
    state: Arc<AppState>,
    caller: String,
    id: String,
    headers: HeaderMap,
    body: ExecBody,
) -> Result<Response, ApiError> {
    let entry = find(&state, &id, &caller)?;
    check_memory(&state, &caller)?;
    if let Some(template) = body.template.as_deref().filter(|t| *t != entry.template) {
        return Err(ApiError::invalid(
            "template",
            format!(
                "this session runs template {:?}, not {template:?}",
                entry.template
            ),
        ));
    }
    let mut request = body.to_request(&state.config.maxima, state.config.default_timeout)?;
    let timeout = request.limits.timeout;
    let hold = state
        .results
        .reserve(std::slice::from_mut(&mut request))
        .await?;
    let run = {
        let state = state.clone();
        move |tap: Option<forkvm_worker::Tap>| async move {
            // A session's execution takes a slot like any other.
            let slot = acquire_slot(&state, &caller).await?;
            let cancellation = forkvm_worker::Cancellation::default();
            let cancel_on_drop = CancelOnDrop::new(cancellation.clone());
            let result = with_session(&state, &entry, move |session| {
                session.exec(request, tap, &cancellation)
            })
            .await;
            cancel_on_drop.disarm();
            let mut result = result?.map_err(|e| worker_error(e, "files"))?;
            result.timings.queue_us = slot.waited.as_micros() as u64;
            state.metrics.record(&result);
            Ok::<_, ApiError>(result)
        }
    };
    if wants_stream(&body, &headers) {
        return Ok(stream::spawn(timeout, hold, move |tap| run(Some(tap))));
    }
    let result = run(None).await?;
    Ok(json_response(JsonPieces::exec(result), hold))
}

/// Fork a session into `count` new sessions that start from its exact state.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", tag = "sessions", request_body = ForkBody,
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The new sessions' ids", body = ForkResponse),
        (status = 404, description = "No such session for this key", body = crate::error::ErrorBody),
        (status = 422, description = "count out of range", body = crate::error::ErrorBody),
        (status = 429, description = "Sandbox quota reached", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn fork(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<ForkResponse>, ApiError> {
    let count = validate::optional_json::<ForkBody>(&body)?
        .count
        .unwrap_or(1);
    if count == 0 || count > MAX_FORK_COUNT {
        return Err(ApiError::invalid(
            "count",
            format!("count must be between 1 and {MAX_FORK_COUNT}"),
        ));
    }
    let entry = find(&state, &id, &caller)?;
    check_memory(&state, &caller)?;
    let permit = state.fairness.reserve(&caller, count)?;
    let _slot = acquire_slot(&state, &caller).await?;
    let branches = with_session(&state, &entry, move |session| session.fork(count))
        .await?
        .map_err(|e| worker_error(e, "count"))?;
    permit.keep();
    let mut ids = Vec::with_capacity(branches.len());
    for branch in branches {
        let child = Arc::new(SessionEntry::new(
            &caller,
            &entry.template,
            entry.metadata.clone(),
            entry.ttl,
            branch,
        ));
        ids.push(child.id);
        note_running(&state, &child);
        state.sessions.insert(child);
    }
    Ok(Json(ForkResponse { ids }))
}

/// Write a file into a session (the raw request body is its contents).
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files/{path}", tag = "sessions",
    params(("id" = String, Path, description = "Session id"), ("path" = String, Path, description = "Absolute path inside the sandbox, without the leading slash")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Written", body = FileWritten),
        (status = 404, description = "No such session for this key", body = crate::error::ErrorBody),
        (status = 413, description = "Larger than the server allows", body = crate::error::ErrorBody),
        (status = 422, description = "Not a valid file path", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn put_file(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<FileWritten>), ApiError> {
    let data = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large("the file is larger than the server allows")
        } else {
            ApiError::invalid("body", e.body_text())
        }
    })?;
    let entry = find(&state, &id, &caller)?;
    check_memory(&state, &caller)?;
    let absolute = format!("/{}", path.trim_start_matches('/'));
    validate::path("path", &absolute, false)?;
    let size = data.len() as u64;
    let target = absolute.clone();
    with_session(&state, &entry, move |session| {
        session.put_file(&target, data.to_vec(), 0o644)
    })
    .await?
    .map_err(|e| worker_error(e, "path"))?;
    Ok((
        StatusCode::CREATED,
        Json(FileWritten {
            path: absolute,
            size,
        }),
    ))
}

/// Read a file from a session (raw bytes).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/{path}", tag = "sessions",
    params(("id" = String, Path, description = "Session id"), ("path" = String, Path, description = "Absolute path inside the sandbox, without the leading slash")),
    responses(
        (status = 200, description = "The file's bytes", content_type = "application/octet-stream"),
        (status = 404, description = "No such session or file", body = crate::error::ErrorBody),
        (status = 413, description = "Larger than the server returns", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn get_file(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
    Path((id, path)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let entry = find(&state, &id, &caller)?;
    let absolute = format!("/{}", path.trim_start_matches('/'));
    validate::path("path", &absolute, true)?;
    let max = state.config.max_file_bytes;
    // The file, and its copy while the worker's message is decoded.
    let hold = state.results.reserve_bytes(2 * max).await?;
    let data = with_session(&state, &entry, move |session| {
        session.get_file(&absolute, max)
    })
    .await?
    .map_err(|e| worker_error(e, "path"))?;
    Ok(held_response(
        "application/octet-stream",
        [Bytes::from(data)],
        hold,
    ))
}

/// Every second, pauses sessions idle past the pause time (when the server pauses idle
/// sessions), deletes sessions, running or paused, idle past their TTL, and (when asked)
/// checkpoints running sessions used since their last checkpoint.
pub async fn reap_expired(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_checkpoints = std::time::Instant::now();
    loop {
        tick.tick().await;
        for entry in state.sessions.take_expired() {
            state.metrics.sessions_expired.inc();
            tracing::info!(session = %entry.id, key = %entry.owner, "session expired");
            let held = entry.session.lock().await.take();
            dispose(&state, &entry, held).await;
        }
        state.metrics.sessions_live.set(state.sessions.len() as i64);
        if let Some(idle) = state.config.paused.as_ref().and_then(|p| p.idle_after) {
            pausing::pause_idle(&state, idle).await;
        }
        let every = state
            .config
            .paused
            .as_ref()
            .and_then(|p| p.checkpoint_every);
        if let Some(every) = every
            && last_checkpoints.elapsed() >= every
        {
            pausing::checkpoint_used(&state).await;
            last_checkpoints = std::time::Instant::now();
        }
    }
}

/// At shutdown: pauses every running session when the server stores paused sessions (so
/// the next server serves them), else tears it down.
pub async fn drop_all(state: &Arc<AppState>) {
    if state.config.paused.is_some() {
        let mut paused = 0;
        for entry in state.sessions.list_all() {
            match pausing::pause(state, &entry).await {
                Ok(()) => paused += 1,
                Err(e) => {
                    tracing::warn!(session = %entry.id, error = %e.message, "not paused at shutdown")
                }
            }
        }
        eprintln!("forkvm: {paused} session(s) paused for the next start");
    }
    for entry in state.sessions.take_all() {
        if let Some(Held::Running(session)) = entry.session.lock().await.take() {
            let _ = tokio::task::spawn_blocking(move || drop(session)).await;
        }
    }
}

/// Pause a session: its complete state is stored on disk and its VM freed. Any later
/// request to it (or `resume`) brings it back as it was; it survives server restarts.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session, paused", body = SessionInfo),
        (status = 404, description = "No such session for this key", body = crate::error::ErrorBody),
        (status = 409, description = "It cannot be paused now (its code has exited, or processes are running), or this server stores no paused sessions", body = crate::error::ErrorBody),
        (status = 429, description = "The key's storage quota is reached", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn pause(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    let entry = find(&state, &id, &caller)?;
    pausing::pause(&state, &entry).await?;
    Ok(Json(entry.info()))
}

/// Resume a paused session (any request to it does too). Resuming a running session does
/// nothing.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sessions",
    params(("id" = String, Path, description = "Session id")),
    responses(
        (status = 200, description = "The session, running", body = SessionInfo),
        (status = 404, description = "No such session for this key", body = crate::error::ErrorBody),
        (status = 409, description = "It cannot be resumed here (CPU features or template build differ) or its stored state is unusable", body = crate::error::ErrorBody),
        (status = 429, description = "Sandbox quota reached", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn resume(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    let entry = find(&state, &id, &caller)?;
    with_session(&state, &entry, |_| ()).await?;
    Ok(Json(entry.info()))
}
