//! `POST /mcp`: forkvm's MCP tools (`forkvm_mcp`) over streamable HTTP, with the caller's
//! own key. Each tool call goes through this server's own routes in-process, so it meets
//! exactly the authentication, quotas and limits a direct API call would.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use forkvm_mcp::{Api, ApiBody, ApiCall, ApiReply, McpServer};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::AppState;
use crate::error::ApiError;

/// Most bytes of an API answer a tool call takes in (a file read is the largest).
const MAX_REPLY_BYTES: usize = 128 << 20;

/// Marks a request the server made to itself for an MCP tool: its body is covered by the
/// `/mcp` request's own reservation, so it reserves none (waiting for room while the outer
/// request holds some could wedge both).
#[derive(Debug, Clone, Copy)]
pub struct InProcessCall;

/// The API, called in-process with the MCP client's key.
struct InProcess {
    router: Router,
    authorization: Option<HeaderValue>,
    runtime: tokio::runtime::Handle,
}

impl Api for InProcess {
    fn call(&self, call: ApiCall) -> Result<ApiReply, String> {
        let mut request = Request::builder().method(call.method).uri(&call.path);
        if let Some(authorization) = &self.authorization {
            request = request.header(header::AUTHORIZATION, authorization);
        }
        let body = match call.body {
            ApiBody::None => Body::empty(),
            ApiBody::Json(value) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(value.to_string())
            }
            ApiBody::Bytes(bytes) => Body::from(bytes),
        };
        let mut request = request.body(body).map_err(|e| e.to_string())?;
        request.extensions_mut().insert(InProcessCall);
        let router = self.router.clone();
        // On a blocking thread (see `mcp`), so waiting on the runtime here is allowed.
        self.runtime.block_on(async move {
            let response = router.oneshot(request).await.map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let body = axum::body::to_bytes(response.into_body(), MAX_REPLY_BYTES)
                .await
                .map_err(|e| e.to_string())?;
            Ok(ApiReply {
                status,
                body: body.to_vec(),
            })
        })
    }
}

/// MCP over streamable HTTP: one JSON-RPC message per POST. A request is answered with
/// its JSON-RPC response; a notification (or a response) with 202 and no body.
#[utoipa::path(post, path = "/mcp", tag = "mcp",
    request_body(content = Object, description = "One JSON-RPC 2.0 message of the Model Context Protocol (2025-06-18)", content_type = "application/json"),
    responses(
        (status = 200, description = "The JSON-RPC response", content_type = "application/json"),
        (status = 202, description = "A notification, accepted"),
        (status = 401, description = "Missing or invalid API key", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn mcp(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let message: Value = match serde_json::from_slice(&body) {
        Ok(message) => message,
        Err(e) => {
            let error = json!({ "jsonrpc": "2.0", "id": null,
                "error": { "code": -32700, "message": format!("not JSON: {e}") } });
            return Ok((StatusCode::BAD_REQUEST, axum::Json(error)).into_response());
        }
    };
    let router = state
        .router
        .get()
        .cloned()
        .ok_or_else(|| ApiError::unavailable("the server is starting"))?;
    let api = InProcess {
        router,
        authorization: headers.get(header::AUTHORIZATION).cloned(),
        runtime: tokio::runtime::Handle::current(),
    };
    let reply = tokio::task::spawn_blocking(move || McpServer::new(api).handle(&message))
        .await
        .map_err(|e| ApiError::internal(format!("MCP call failed: {e}")))?;
    Ok(match reply {
        Some(response) => axum::Json(response).into_response(),
        None => StatusCode::ACCEPTED.into_response(),
    })
}
