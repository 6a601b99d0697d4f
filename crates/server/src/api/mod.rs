//! Request handlers, one module per area.

pub mod exec;
pub mod middleware;
pub mod sessions;
pub mod stream;
pub mod system;

use forkvm_engine::EngineError;

use crate::error::ApiError;

/// The caller, as authenticated by `middleware::authenticate`.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

/// How an engine error looks to an API client.
pub fn engine_error(error: EngineError) -> ApiError {
    match error {
        EngineError::UnsupportedLanguage { .. } => ApiError::invalid("language", error.to_string()),
        EngineError::SessionEnded => ApiError::conflict("session_ended", error.to_string()),
        EngineError::Store(forkvm_template_error) => {
            ApiError::unavailable(forkvm_template_error.to_string())
        }
        EngineError::PlaceFile(e) => ApiError::invalid("files", e.to_string()),
        other => {
            tracing::error!(error = %other, "engine failure");
            ApiError::internal(other.to_string())
        }
    }
}
