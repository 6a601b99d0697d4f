//! Checks on what clients send, made before any sandbox is touched. Each failure is a 422
//! `invalid_request` naming its field; a body that is not JSON at all is a 400.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Bytes;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Longest path accepted (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// Longest path component (Linux's `NAME_MAX`).
pub const MAX_NAME_BYTES: usize = 255;
/// Most bytes of environment one request may set (names, values and their separators).
pub const MAX_ENV_BYTES: usize = 1 << 20;
/// Most bytes of labels one session may carry.
pub const MAX_METADATA_BYTES: usize = 16 << 10;

/// A path inside the sandbox: not empty, no NUL, within `PATH_MAX` and `NAME_MAX`, and,
/// unless `parents` allows it, no `..` (a file is placed from the host, where `..` has
/// no business).
pub fn path(field: &str, path: &str, parents: bool) -> Result<(), ApiError> {
    let problem = if path.is_empty() {
        Some("must not be empty".to_string())
    } else if path.len() > MAX_PATH_BYTES {
        Some(format!("is longer than {MAX_PATH_BYTES} bytes"))
    } else if path.contains('\0') {
        Some("contains a NUL byte".to_string())
    } else if path.split('/').any(|c| c.len() > MAX_NAME_BYTES) {
        Some(format!(
            "has a component longer than {MAX_NAME_BYTES} bytes"
        ))
    } else if !parents && path.split('/').any(|c| c == "..") {
        Some("must not contain `..`".to_string())
    } else {
        None
    };
    match problem {
        Some(problem) => Err(ApiError::invalid(field, format!("{field} {problem}"))),
        None => Ok(()),
    }
}

/// Environment variables: names that `execve` would accept (not empty, no `=`, no NUL),
/// values without NUL, and at most `MAX_ENV_BYTES` in all.
pub fn env(env: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let mut total = 0usize;
    for (name, value) in env {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(ApiError::invalid(
                "env",
                format!("{name:?} is not a variable name (empty, or holds `=` or NUL)"),
            ));
        }
        if value.contains('\0') {
            return Err(ApiError::invalid(
                &format!("env.{name}"),
                "a value must not contain a NUL byte",
            ));
        }
        total = total.saturating_add(name.len() + value.len() + 2);
    }
    if total > MAX_ENV_BYTES {
        return Err(ApiError::invalid(
            "env",
            format!("the environment is larger than {MAX_ENV_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// A session's labels: at most `MAX_METADATA_BYTES` in all.
pub fn metadata(metadata: &BTreeMap<String, String>) -> Result<(), ApiError> {
    let total: usize = metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_METADATA_BYTES {
        return Err(ApiError::invalid(
            "metadata",
            format!("metadata is larger than {MAX_METADATA_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// A JSON body that may be left out (an empty body is `T::default()`), with the same
/// errors as a required one.
pub fn optional_json<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    Ok(Json::<T>::from_bytes(body)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_component_by_component() {
        assert!(path("cwd", "/tmp/work", false).is_ok());
        assert!(path("cwd", "/tmp/../etc", true).is_ok());
        assert!(path("cwd", "/tmp/../etc", false).is_err());
        assert!(path("cwd", "", true).is_err());
        assert!(path("cwd", "/a\0b", true).is_err());
        assert!(path("cwd", &format!("/{}", "a".repeat(256)), true).is_err());
        assert!(path("cwd", &"/a".repeat(2049), true).is_err());
    }

    #[test]
    fn env_names_are_what_execve_accepts() {
        let one = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(env(&one("PATH", "/bin")).is_ok());
        assert_eq!(
            env(&one("A=B", "x")).unwrap_err().field.as_deref(),
            Some("env")
        );
        assert!(env(&one("", "x")).is_err());
        assert!(env(&one("A\0", "x")).is_err());
        assert_eq!(
            env(&one("A", "x\0")).unwrap_err().field.as_deref(),
            Some("env.A")
        );
        assert!(env(&one("BIG", &"x".repeat(MAX_ENV_BYTES))).is_err());
    }
}
