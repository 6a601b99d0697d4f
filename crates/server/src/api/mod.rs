//! Request handlers, one module per area.

pub mod builds;
pub mod exec;
pub mod mcp;
pub mod middleware;
pub mod sessions;
pub mod stream;
pub mod system;

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use forkvm_protocol::worker::FailureKind;
use forkvm_worker::{Cancellation, WorkerError};
use futures_util::StreamExt;

use crate::AppState;
use crate::error::ApiError;
use crate::result_json::JsonPieces;
use crate::slots::Slot;

/// The caller, as authenticated by `middleware::authenticate`.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

/// How a worker's failure looks to an API client. `field` names the request field a
/// refused file came from.
pub fn worker_error(error: WorkerError, field: &str) -> ApiError {
    let message = error.to_string();
    match error {
        WorkerError::Failed(failure) => match failure.kind {
            FailureKind::UnsupportedLanguage => ApiError::invalid("language", message),
            FailureKind::SessionEnded => ApiError::conflict("session_ended", message),
            FailureKind::ProcessesRunning => ApiError::conflict("processes_running", message),
            FailureKind::BadPausedState => ApiError::conflict("session_lost", message),
            FailureKind::TemplateUnavailable => ApiError::unavailable(message),
            FailureKind::BadFile => ApiError::invalid(field, message),
            FailureKind::BadCwd => ApiError::invalid("cwd", message),
            FailureKind::FileNotFound => ApiError::not_found(message),
            FailureKind::FileTooLarge => ApiError::too_large(message),
            FailureKind::NoSuchSession | FailureKind::Internal => {
                tracing::error!(error = %message, "worker failure");
                ApiError::internal(message)
            }
        },
        WorkerError::Unavailable(_) => ApiError::unavailable(message),
        WorkerError::Gone(_) | WorkerError::Unresponsive(_) => {
            tracing::error!(error = %message, "worker lost");
            ApiError::internal(message)
        }
    }
}

/// An execution slot for `caller`, waited for in fair order between keys (`slots`).
pub async fn acquire_slot(state: &AppState, caller: &str) -> Result<Slot, ApiError> {
    let slot = state
        .slots
        .acquire(caller)
        .await
        .map_err(|_| ApiError::unavailable("the server is shutting down"))?;
    state.metrics.record_queued(slot.waited);
    Ok(slot)
}

/// A JSON response made piece by piece as the client takes it (`result_json`); `hold`
/// (a share of the results budget) is kept until it is sent or dropped.
pub fn json_response<H: Send + 'static>(pieces: JsonPieces, hold: H) -> Response {
    held_response("application/json", pieces, hold)
}

/// A response of `pieces`, made as the client takes them, holding `hold` until it is
/// sent or dropped.
pub fn held_response<I, H>(content_type: &'static str, pieces: I, hold: H) -> Response
where
    I: IntoIterator<Item = Bytes>,
    I::IntoIter: Send + 'static,
    H: Send + 'static,
{
    let body = futures_util::stream::iter(pieces).map(move |piece| {
        let _held = &hold;
        Ok::<_, Infallible>(piece)
    });
    (
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(body),
    )
        .into_response()
}

/// Cancels an execution if dropped before `disarm`: the future waiting for it was dropped,
/// which is what becomes of a handler whose client went away.
pub struct CancelOnDrop(Option<Cancellation>);

impl CancelOnDrop {
    pub fn new(cancellation: Cancellation) -> CancelOnDrop {
        CancelOnDrop(Some(cancellation))
    }

    /// The execution finished: nothing to cancel.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(cancellation) = self.0.take() else {
            return;
        };
        tracing::info!("the client went away; ending its execution");
        // Telling the worker is a socket write: off the async threads when there are some.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn_blocking(move || cancellation.cancel());
            }
            Err(_) => cancellation.cancel(),
        }
    }
}
