//! `forkvm sessions list|pause|resume`: a running server's sessions, from the shell (the
//! same calls as the HTTP API and the SDKs).

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Which call to make.
pub enum Action {
    List,
    Pause(String),
    Resume(String),
}

/// Makes the call against `url` with `key` and prints the answer (one session per line for
/// `list`). Exits non-zero with the server's message when it refuses.
pub fn run(url: &str, key: Option<&str>, action: Action) -> Result<i32> {
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(300))
        .build()?;
    let base = url.trim_end_matches('/');
    let request = match &action {
        Action::List => client.get(format!("{base}/v1/sandboxes")),
        Action::Pause(id) => client.post(format!("{base}/v1/sandboxes/{id}/pause")),
        Action::Resume(id) => client.post(format!("{base}/v1/sandboxes/{id}/resume")),
    };
    let request = match key {
        Some(key) => request.bearer_auth(key),
        None => request,
    };
    let response = request.send().with_context(|| format!("reaching {base}"))?;
    let status = response.status();
    let body: Value = response.json().unwrap_or(Value::Null);
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        bail!("the server answered {status}: {message}");
    }
    let line = |s: &Value| {
        format!(
            "{}  {:<8} {:<10} memory {:>6} KiB  stored {:>7} KiB",
            s["id"].as_str().unwrap_or(""),
            s["state"].as_str().unwrap_or(""),
            s["template"].as_str().unwrap_or(""),
            s["memory_bytes"].as_u64().unwrap_or(0) >> 10,
            s["stored_bytes"].as_u64().unwrap_or(0) >> 10,
        )
    };
    match action {
        Action::List => {
            for session in body["sandboxes"].as_array().into_iter().flatten() {
                println!("{}", line(session));
            }
        }
        Action::Pause(_) | Action::Resume(_) => println!("{}", line(&body)),
    }
    Ok(0)
}
