//! API keys. The keys file stores only SHA-256 hashes with a name for each key; a request's
//! bearer token is hashed and compared against every stored hash in constant time. Keys are
//! never logged: requests are attributed by key name.
//!
//! File format (`forkvm keys add` writes it):
//! `{"keys": [{"id": "alice", "sha256": "<64 hex digits>"}, {"id": "ops", "sha256": "…",
//! "operator": true}]}`. Operator keys may also build templates (`POST /v1/templates`).

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of generated keys (recognizable in secret scanners).
pub const KEY_PREFIX: &str = "fvk_";

/// Why the keys file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Malformed { path: String, reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyEntry {
    id: String,
    sha256: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    operator: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct KeysFile {
    keys: Vec<KeyEntry>,
}

/// The accepted keys, as hashes.
#[derive(Debug, Clone)]
pub struct KeyStore {
    keys: Vec<(String, [u8; 32])>,
    /// The names of operator keys.
    operators: Vec<String>,
}

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl KeyStore {
    /// Loads the keys file.
    pub fn load(path: &Path) -> Result<KeyStore, KeysError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Io {
            path: display.clone(),
            source,
        })?;
        let file: KeysFile = serde_json::from_str(&text).map_err(|e| KeysError::Malformed {
            path: display.clone(),
            reason: e.to_string(),
        })?;
        let mut keys: Vec<(String, [u8; 32])> = Vec::with_capacity(file.keys.len());
        let mut operators = Vec::new();
        for entry in file.keys {
            let malformed = |reason: String| KeysError::Malformed {
                path: display.clone(),
                reason: format!("key {:?}: {reason}", entry.id),
            };
            let hash = parse_hex(&entry.sha256)
                .ok_or_else(|| malformed("sha256 must be 64 hex digits".into()))?;
            // Two entries with one name would share its sessions and quotas; one key under
            // two names would be attributed to either.
            if keys.iter().any(|(id, _)| *id == entry.id) {
                return Err(malformed("the name appears twice".into()));
            }
            if keys.iter().any(|(_, h)| *h == hash) {
                return Err(malformed(
                    "the same key is already listed under another name".into(),
                ));
            }
            if entry.operator {
                operators.push(entry.id.clone());
            }
            keys.push((entry.id, hash));
        }
        if keys.is_empty() {
            return Err(KeysError::Malformed {
                path: display,
                reason: "no keys: add one with `forkvm keys add`".into(),
            });
        }
        Ok(KeyStore { keys, operators })
    }

    /// Whether the key named `id` is an operator's.
    pub fn is_operator(&self, id: &str) -> bool {
        self.operators.iter().any(|o| o == id)
    }

    /// The name of the key `token` is, if any. Every stored hash is compared, each in
    /// constant time, so timing says nothing about which key (or how much of it) matched.
    pub fn identify(&self, token: &str) -> Option<String> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (id, hash) in &self.keys {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(id.clone());
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Creates a new random key named `id` (an operator's if `operator`), appends its hash to
/// the keys file (creating it), and returns the key: the only time it is ever shown.
pub fn add_key(path: &Path, id: &str, operator: bool) -> Result<String, KeysError> {
    let display = path.display().to_string();
    let mut file = match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str::<KeysFile>(&text).map_err(|e| KeysError::Malformed {
            path: display.clone(),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => KeysFile::default(),
        Err(source) => {
            return Err(KeysError::Io {
                path: display,
                source,
            });
        }
    };
    if file.keys.iter().any(|k| k.id == id) {
        return Err(KeysError::Malformed {
            path: display,
            reason: format!("a key named {id:?} already exists"),
        });
    }
    let mut secret = [0u8; 32];
    forkvm_kernel::entropy::host_random(&mut secret);
    let key = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(secret));
    file.keys.push(KeyEntry {
        id: id.to_string(),
        sha256: hex(&Sha256::digest(key.as_bytes())),
        operator,
    });
    let json = serde_json::to_string_pretty(&file).expect("keys file serializes");
    write_private(path, (json + "\n").as_bytes()).map_err(|source| KeysError::Io {
        path: display,
        source,
    })?;
    Ok(key)
}

/// Replaces `path` with `data`, readable by its owner only: written to a 0600 temporary
/// file beside it (removed if anything fails) and renamed over it.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new().prefix(".keys-").tempfile_in(dir)?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stored_hashed_and_identified() {
        let dir = std::env::temp_dir().join(format!("forkvm-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.json");
        let _ = std::fs::remove_file(&path);
        let alice = add_key(&path, "alice", false).unwrap();
        let bob = add_key(&path, "bob", true).unwrap();
        assert!(alice.starts_with(KEY_PREFIX) && alice != bob);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(&alice[KEY_PREFIX.len()..]),
            "the key itself must not be stored"
        );
        let store = KeyStore::load(&path).unwrap();
        assert_eq!(store.identify(&alice).as_deref(), Some("alice"));
        assert_eq!(store.identify(&bob).as_deref(), Some("bob"));
        assert_eq!(store.identify("fvk_wrong"), None);
        assert!(store.is_operator("bob") && !store.is_operator("alice"));
        assert!(add_key(&path, "alice", false).is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["keys.json"], "no temporary file lingers");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn duplicate_names_and_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("forkvm-dup-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.json");
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        for (keys, complaint) in [
            (
                format!(r#"[{{"id":"x","sha256":"{a}"}},{{"id":"x","sha256":"{b}"}}]"#),
                "twice",
            ),
            (
                format!(r#"[{{"id":"x","sha256":"{a}"}},{{"id":"y","sha256":"{a}"}}]"#),
                "another name",
            ),
        ] {
            std::fs::write(&path, format!(r#"{{"keys":{keys}}}"#)).unwrap();
            let err = KeyStore::load(&path).unwrap_err().to_string();
            assert!(err.contains(complaint), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
