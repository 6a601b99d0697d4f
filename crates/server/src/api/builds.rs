//! Building templates through the API (operator keys only): see `crate::builds`.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::Caller;
use crate::AppState;
use crate::error::ApiError;
use crate::wire::{BuildInfo, TemplateBuildBody};
use axum::Extension;

/// Operator keys only (with authentication off, every caller is the operator).
fn require_operator(state: &AppState, caller: &str) -> Result<(), ApiError> {
    match &state.config.keys {
        Some(keys) if !keys.is_operator(caller) => Err(ApiError::forbidden(
            "building templates needs an operator key (`forkvm keys add NAME --operator`)",
        )),
        _ => Ok(()),
    }
}

/// Build a template from a spec and serve it (operator keys only).
#[utoipa::path(post, path = "/v1/templates", tag = "system", request_body = TemplateBuildBody,
    responses(
        (status = 202, description = "Building: poll the build", body = BuildInfo),
        (status = 403, description = "Not an operator key", body = crate::error::ErrorBody),
        (status = 409, description = "The name is served already, or another build runs", body = crate::error::ErrorBody),
        (status = 422, description = "An invalid name, spec or lock", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn build(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
    body: Result<Json<TemplateBuildBody>, JsonRejection>,
) -> Result<(StatusCode, Json<BuildInfo>), ApiError> {
    require_operator(&state, &caller)?;
    let Json(body) = body?;
    let serving = state.templates.serves(&body.name);
    let (info, builder) =
        state
            .builds
            .start(&body.name, &body.spec, body.lock.as_deref(), serving)?;
    tracing::info!(
        key = caller,
        build = info.id,
        template = body.name,
        "building a template"
    );
    let id = info.id.clone();
    let task_state = state.clone();
    tokio::task::spawn_blocking(move || {
        let TemplateBuildBody { name, spec, lock } = body;
        let outcome = builder
            .build(&name, &spec, lock.as_deref())
            .and_then(|built| match builder.serve(&name) {
                Ok(served) => {
                    if task_state.templates.add(served) {
                        Ok(built)
                    } else {
                        Err(crate::builds::Failed {
                            error: format!("template {name:?} was served meanwhile"),
                            log: built.log,
                        })
                    }
                }
                Err(error) => Err(crate::builds::Failed {
                    error: format!("built, but serving it failed: {error}"),
                    log: built.log,
                }),
            });
        match &outcome {
            Ok(_) => tracing::info!(build = id, template = name, "template built and served"),
            Err(failed) => tracing::warn!(
                build = id,
                template = name,
                error = failed.error,
                "template build failed"
            ),
        }
        task_state.builds.finish(&id, outcome);
    });
    Ok((StatusCode::ACCEPTED, Json(info)))
}

/// A template build's status, output and lock (operator keys only).
#[utoipa::path(get, path = "/v1/templates/builds/{id}", tag = "system",
    params(("id" = String, Path, description = "Build id")),
    responses(
        (status = 200, description = "The build", body = BuildInfo),
        (status = 403, description = "Not an operator key", body = crate::error::ErrorBody),
        (status = 404, description = "No such build (the server keeps the last 32)", body = crate::error::ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn show(
    State(state): State<Arc<AppState>>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<BuildInfo>, ApiError> {
    require_operator(&state, &caller)?;
    state
        .builds
        .get(&id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no build {id:?}")))
}
