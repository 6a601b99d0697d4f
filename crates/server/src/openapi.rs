//! The OpenAPI document, derived from the handlers' annotations and the wire types, served at
//! `/v1/openapi.json`. A test checks that it describes exactly the routes in `ROUTES`.

use utoipa::Modify;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::api;
use crate::error::{ErrorBody, ErrorDetail};
use crate::wire;

/// Adds the bearer-key security scheme.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key from the server's keys file (`forkvm keys add`).",
                    ))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "forkvm",
        description = "Run untrusted code in hardware-isolated, kernel-less KVM sandboxes forked from warm templates."
    ),
    paths(
        api::exec::exec,
        api::exec::batch,
        api::system::health,
        api::system::metrics,
        api::system::openapi,
        api::system::templates,
        api::builds::build,
        api::builds::show,
        api::sessions::create,
        api::sessions::list,
        api::sessions::show,
        api::sessions::delete,
        api::sessions::exec,
        api::sessions::commands,
        api::sessions::fork,
        api::sessions::pause,
        api::sessions::resume,
        api::sessions::put_file,
        api::sessions::get_file,
        api::mcp::mcp,
    ),
    components(schemas(
        wire::ExecBody,
        wire::CommandBody,
        wire::FileBody,
        wire::ExecResponse,
        wire::ErrorInfo,
        wire::BatchBody,
        wire::BatchResponse,
        wire::HealthResponse,
        wire::TemplateHealth,
        wire::TemplateInfo,
        wire::TemplateList,
        wire::TemplateBuildBody,
        wire::BuildInfo,
        wire::BuildStatus,
        wire::CreateSessionBody,
        wire::SessionInfo,
        wire::SessionList,
        wire::ForkBody,
        wire::ForkResponse,
        wire::FileWritten,
        ErrorBody,
        ErrorDetail,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "exec", description = "Code in fresh forks"),
        (name = "sessions", description = "Sandboxes that keep state, take files and fork"),
        (name = "system", description = "Health, metrics and this document"),
    )
)]
pub struct ApiDoc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_describes_exactly_the_served_routes() {
        let doc = ApiDoc::openapi();
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in &doc.paths.paths {
            let methods = [
                ("get", item.get.is_some()),
                ("post", item.post.is_some()),
                ("put", item.put.is_some()),
                ("delete", item.delete.is_some()),
                ("patch", item.patch.is_some()),
            ];
            for (method, present) in methods {
                if present {
                    documented.push((method.to_string(), path.clone()));
                }
            }
        }
        documented.sort();
        let mut served: Vec<(String, String)> = crate::ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        served.sort();
        assert_eq!(documented, served);
    }
}
