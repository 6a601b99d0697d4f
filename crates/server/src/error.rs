//! API errors: every failure is a JSON body `{"error": {"kind", "message", "field"?}}` with
//! a precise status, so clients can tell a bad field from a missing key from a full quota.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable kind: `unauthorized`, `not_found`, `invalid_request`,
    /// `payload_too_large`, `rate_limited`, `quota_exceeded`, `session_ended`,
    /// `unavailable`, `internal`.
    pub kind: String,
    pub message: String,
    /// The request field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// Seconds to wait, for 429 responses.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            kind,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// An error of `kind` with `status` (for errors the framework made; see
    /// `api::middleware::json_errors`).
    pub fn with_status(
        status: StatusCode,
        kind: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError::new(status, kind, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A well-formed request with a value that is not allowed (422), naming the field.
    pub fn invalid(field: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            field: Some(field.to_string()),
            ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
        }
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    pub fn rate_limited(retry_after: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after.max(1)),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests for this API key",
            )
        }
    }

    pub fn quota(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", message)
        }
    }

    pub fn conflict(kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, kind, message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                kind: self.kind.to_string(),
                message: self.message,
                field: self.field,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Malformed JSON is a 400, a body that is too large a 413, and a well-formed body with a
/// wrong or missing field a 422 naming the field (serde says which).
impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        let message = rejection.body_text();
        match rejection {
            JsonRejection::JsonDataError(_) => ApiError {
                field: field_in(&message),
                ..ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
            },
            JsonRejection::BytesRejection(_)
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                ApiError::too_large("the request body is larger than the server allows")
            }
            _ => ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message),
        }
    }
}

/// The field serde names in a data error: "…: missing field `code` at line 1" or
/// "…target type: timeout_seconds: invalid type …".
fn field_in(message: &str) -> Option<String> {
    if let Some(rest) = message.split("missing field `").nth(1) {
        return rest.split('`').next().map(str::to_string);
    }
    if let Some(rest) = message.split("unknown field `").nth(1) {
        return rest.split('`').next().map(str::to_string);
    }
    let detail = message.split("target type: ").nth(1)?;
    let (path, _) = detail.split_once(": ")?;
    (!path.contains(' ')).then(|| path.to_string())
}

#[cfg(test)]
mod tests {
    use super::field_in;

    #[test]
    fn finds_the_field_serde_names() {
        assert_eq!(
            field_in(
                "Failed to deserialize the JSON body into the target type: missing field `code` at line 1 column 2"
            ),
            Some("code".into())
        );
        assert_eq!(
            field_in(
                "Failed to deserialize the JSON body into the target type: timeout_seconds: invalid type: string \"x\", expected f64 at line 1 column 30"
            ),
            Some("timeout_seconds".into())
        );
        assert_eq!(
            field_in(
                "Failed to deserialize the JSON body into the target type: code: invalid type: integer `5`, expected a string at line 1 column 10"
            ),
            Some("code".into())
        );
        assert_eq!(
            field_in(
                "Failed to deserialize the JSON body into the target type: unknown field `cod`, expected one of `code` at line 1"
            ),
            Some("cod".into())
        );
    }
}
