//! The templates a server serves, each with its own jailed workers, and which one a request
//! runs in: the one it names, or else the first whose runtime runs its language (so
//! `{"language": "javascript"}` finds the Node.js template without naming it).

use std::sync::{Arc, RwLock};

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
    /// The build's digest (`SnapshotMeta::digest`): what paused sessions are layered over.
    pub digest: String,
}

/// Every served template; the first is the default. Operators may add templates while the
/// server runs (`POST /v1/templates`), never replace or remove one: requests and sessions
/// hold the `Served` they chose.
pub struct Templates {
    served: RwLock<Vec<Arc<Served>>>,
}

impl Templates {
    /// `served` must hold at least one template.
    pub fn new(served: Vec<Served>) -> Templates {
        assert!(!served.is_empty(), "a server serves at least one template");
        Templates {
            served: RwLock::new(served.into_iter().map(Arc::new).collect()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Served>>> {
        self.served.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The template requests run in when they name none and their language does not
    /// decide.
    pub fn default(&self) -> Arc<Served> {
        self.read()[0].clone()
    }

    /// Every served template, the default first.
    pub fn all(&self) -> Vec<Arc<Served>> {
        self.read().clone()
    }

    /// Whether a template of that name is served.
    pub fn serves(&self, name: &str) -> bool {
        self.read().iter().any(|s| s.name == name)
    }

    /// Serves one more template (after the others: it is never the default). Refused
    /// (false, and `served` is dropped, its workers with it) if one of that name is served
    /// already.
    pub fn add(&self, served: Served) -> bool {
        let mut all = self.served.write().unwrap_or_else(|e| e.into_inner());
        if all.iter().any(|s| s.name == served.name) {
            return false;
        }
        all.push(Arc::new(served));
        true
    }

    /// The template a request runs in: the one it names (422 `template` if this server does
    /// not serve it), or the default if it runs `language` (empty: any), or else the first
    /// that does. A language no template runs stays with the default, whose worker
    /// refuses it naming the languages it runs.
    pub fn choose(&self, template: Option<&str>, language: &str) -> Result<Arc<Served>, ApiError> {
        let served = self.read();
        if let Some(name) = template {
            return served
                .iter()
                .find(|s| s.name == name)
                .cloned()
                .ok_or_else(|| {
                    ApiError::invalid(
                        "template",
                        format!(
                            "unknown template {name:?} (this server serves: {})",
                            names(&served).join(", ")
                        ),
                    )
                });
        }
        let runs =
            |s: &&Arc<Served>| language.is_empty() || s.languages.iter().any(|l| l == language);
        Ok(served.iter().find(runs).unwrap_or(&served[0]).clone())
    }

    pub fn names(&self) -> Vec<String> {
        names(&self.read())
            .into_iter()
            .map(str::to_string)
            .collect()
    }
}

fn names(served: &[Arc<Served>]) -> Vec<&str> {
    served.iter().map(|s| s.name.as_str()).collect()
}
