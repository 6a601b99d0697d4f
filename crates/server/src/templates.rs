//! The templates a server serves, each with its own jailed workers, and which one a request
//! runs in: the one it names, or else the first whose runtime runs its language (so
//! `{"language": "javascript"}` finds the Node.js template without naming it).

use std::sync::Arc;

use forkvm_worker::Workers;

use crate::error::ApiError;
use crate::wire::TemplateInfo;

/// One served template.
pub struct Served {
    pub name: String,
    /// The languages its runtime runs, its own first.
    pub languages: Vec<String>,
    /// What `GET /v1/templates` says of it (`default` is filled in there).
    pub info: TemplateInfo,
    pub workers: Arc<Workers>,
}

/// Every served template; the first is the default.
pub struct Templates {
    served: Vec<Served>,
}

impl Templates {
    /// `served` must hold at least one template.
    pub fn new(served: Vec<Served>) -> Templates {
        assert!(!served.is_empty(), "a server serves at least one template");
        Templates { served }
    }

    /// The template requests run in when they name none and their language does not
    /// decide.
    pub fn default(&self) -> &Served {
        &self.served[0]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Served> {
        self.served.iter()
    }

    /// The template a request runs in: the one it names (422 `template` if this server does
    /// not serve it), or the default if it runs `language` (empty: any), or else the first
    /// that does. A language no template runs stays with the default, whose worker
    /// refuses it naming the languages it runs.
    pub fn choose(&self, template: Option<&str>, language: &str) -> Result<&Served, ApiError> {
        if let Some(name) = template {
            return self.served.iter().find(|s| s.name == name).ok_or_else(|| {
                ApiError::invalid(
                    "template",
                    format!(
                        "unknown template {name:?} (this server serves: {})",
                        self.names().join(", ")
                    ),
                )
            });
        }
        let runs = |s: &&Served| language.is_empty() || s.languages.iter().any(|l| l == language);
        Ok(std::iter::once(self.default())
            .chain(self.served.iter())
            .find(runs)
            .unwrap_or(self.default()))
    }

    pub fn names(&self) -> Vec<&str> {
        self.served.iter().map(|s| s.name.as_str()).collect()
    }
}
