//! Template specs: what `forkvm template build NAME --spec FILE` reads.
//!
//! ```toml
//! runtime = "python"              # or "node"
//! debian = ["python3-scipy"]      # Debian packages added to the image
//! pypi = ["faker", "httpx==0.28.1"]
//! npm = ["lodash@4"]
//! modules = ["faker"]             # imported (or required) before the snapshot
//! memory_mib = 1024
//! warmup = "import faker; faker.Faker().name()"   # run once before the snapshot
//!
//! [env]
//! GREETING = "hi"
//!
//! [[files]]
//! from = "data"                   # on the host, relative to the spec file
//! to = "/data"                    # in the sandbox
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::build::TemplateSpec;
use crate::runtime::Runtime;

/// Largest spec file read.
const MAX_SPEC_BYTES: u64 = 1 << 20;

/// Why a spec could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// A spec file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default)]
    pub debian: Vec<String>,
    #[serde(default)]
    pub pypi: Vec<String>,
    #[serde(default)]
    pub npm: Vec<String>,
    #[serde(default)]
    pub modules: Vec<String>,
    #[serde(default)]
    pub memory_mib: Option<u64>,
    #[serde(default)]
    pub warmup: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub files: Vec<FileCopy>,
}

/// A host file or directory copied into the sandbox's filesystem.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCopy {
    pub from: PathBuf,
    pub to: String,
}

impl SpecFile {
    /// Reads and checks the spec at `path`: the template `name` it describes, and the
    /// spec's text (recorded in the template).
    pub fn load(path: &Path, name: &str) -> Result<(TemplateSpec, String), SpecError> {
        let read = |source| SpecError::Read {
            path: path.to_owned(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read)?.len();
        let invalid = |reason: String| SpecError::Invalid {
            path: path.to_owned(),
            reason,
        };
        if size > MAX_SPEC_BYTES {
            return Err(invalid(format!("larger than {MAX_SPEC_BYTES} bytes")));
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let template = SpecFile::parse(&text, name, Some(base)).map_err(invalid)?;
        Ok((template, text))
    }

    /// The template `name` a spec's `text` describes, its files relative to `base`; with
    /// no `base` (a spec from the API, which may not name host paths) files are refused.
    pub fn parse(text: &str, name: &str, base: Option<&Path>) -> Result<TemplateSpec, String> {
        if text.len() as u64 > MAX_SPEC_BYTES {
            return Err(format!("larger than {MAX_SPEC_BYTES} bytes"));
        }
        let spec: SpecFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if base.is_none() && !spec.files.is_empty() {
            return Err(
                "[[files]] copies host paths: build such templates with `forkvm template build --spec`"
                    .into(),
            );
        }
        let mut template = spec.into_template(name, base.unwrap_or(Path::new("/nonexistent")))?;
        template.spec_text = Some(text.to_string());
        Ok(template)
    }

    fn into_template(self, name: &str, base: &Path) -> Result<TemplateSpec, String> {
        let mut template = match self.runtime {
            Runtime::Python => TemplateSpec::python(name),
            Runtime::Node => TemplateSpec::node(name),
        };
        for package in &self.debian {
            let valid = !package.is_empty()
                && !package.starts_with('-')
                && package
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
            if !valid {
                return Err(format!("invalid Debian package name {package:?}"));
            }
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
                return Err(format!("invalid environment variable {key:?}"));
            }
        }
        for copy in &self.files {
            if !copy.to.starts_with('/') {
                return Err(format!("files: `to` must be absolute, not {:?}", copy.to));
            }
        }
        template.extra_packages = self.debian;
        template.modules.extend(self.modules);
        template.pypi = self.pypi;
        template.npm = self.npm;
        template.warmup = self.warmup;
        template.env = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        template.files = self
            .files
            .into_iter()
            .map(|c| (base.join(c.from), c.to))
            .collect();
        if let Some(mib) = self.memory_mib {
            template.memory_mib = mib;
        }
        Ok(template)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<TemplateSpec, SpecError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("template.toml");
        std::fs::write(&path, text).unwrap();
        SpecFile::load(&path, "t").map(|(spec, _)| spec)
    }

    #[test]
    fn a_full_spec_becomes_a_template() {
        let spec = load(
            "runtime = \"node\"\npypi = [\"faker\"]\nnpm = [\"lodash@4\"]\ndebian = [\"jq\"]\n\
             modules = [\"lodash\"]\nmemory_mib = 512\nwarmup = \"1\"\n\
             [env]\nA = \"b\"\n[[files]]\nfrom = \"data\"\nto = \"/data\"\n",
        )
        .unwrap();
        assert_eq!(spec.runtime, Runtime::Node);
        assert_eq!(
            (spec.pypi.len(), spec.npm.len(), spec.memory_mib),
            (1, 1, 512)
        );
        assert_eq!(spec.extra_packages, ["jq"]);
        assert_eq!(spec.modules, ["lodash"]);
        assert_eq!(spec.env, ["A=b"]);
        assert!(spec.files[0].0.ends_with("data"));
        assert_eq!(spec.warmup.as_deref(), Some("1"));
    }

    #[test]
    fn mistakes_are_named() {
        for (text, says) in [
            ("runtime = \"ruby\"", "ruby"),
            ("pipy = [\"x\"]", "pipy"),
            ("debian = [\"-oops\"]", "-oops"),
            ("[[files]]\nfrom = \"a\"\nto = \"relative\"", "absolute"),
            ("[env]\n\"\" = \"x\"", "environment"),
        ] {
            let error = load(text).unwrap_err().to_string();
            assert!(error.contains(says), "{text}: {error}");
        }
    }
}
