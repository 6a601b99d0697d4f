//! The language runtimes a template's agent can be written in.

use serde::{Deserialize, Serialize};

/// The language runtime a template's agent is written in; it decides which languages the
/// template's forks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    #[default]
    Python,
    Node,
}

impl Runtime {
    /// The request languages forks of this runtime's templates accept (shells run through
    /// the agent in both).
    pub fn languages(self) -> &'static [&'static str] {
        match self {
            Runtime::Python => &["python", "bash", "sh"],
            Runtime::Node => &["javascript", "node", "typescript", "bash", "sh"],
        }
    }

    /// Debian packages the runtime needs beyond the default root filesystem: Node.js, npm,
    /// and the TypeScript compiler the agent strips types with.
    pub fn packages(self) -> &'static [&'static str] {
        match self {
            Runtime::Python => &[],
            Runtime::Node => &["nodejs", "npm", "node-typescript"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Runtime::Python => "python",
            Runtime::Node => "node",
        }
    }
}

impl std::str::FromStr for Runtime {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "python" => Ok(Runtime::Python),
            "node" | "javascript" => Ok(Runtime::Node),
            _ => Err(format!("unknown runtime {s:?} (python or node)")),
        }
    }
}
