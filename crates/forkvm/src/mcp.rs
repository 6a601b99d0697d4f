//! `forkvm mcp`: the MCP tools over stdio (one JSON-RPC message per line), calling a
//! running `forkvm serve` at `FORKVM_URL` with `FORKVM_API_KEY`.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{Context, Result};
use forkvm_mcp::{Api, ApiBody, ApiCall, ApiReply, McpServer};

/// The forkvm HTTP API at `base`.
struct Http {
    client: reqwest::blocking::Client,
    base: String,
    key: Option<String>,
}

impl Api for Http {
    fn call(&self, call: ApiCall) -> Result<ApiReply, String> {
        let method =
            reqwest::Method::from_bytes(call.method.as_bytes()).map_err(|e| e.to_string())?;
        let mut request = self
            .client
            .request(method, format!("{}{}", self.base, call.path));
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        request = match call.body {
            ApiBody::None => request,
            ApiBody::Json(value) => request.json(&value),
            ApiBody::Bytes(bytes) => request.body(bytes),
        };
        let response = request.send().map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response.bytes().map_err(|e| e.to_string())?.to_vec();
        Ok(ApiReply { status, body })
    }
}

/// Serves MCP on stdin/stdout until stdin closes.
pub fn serve_stdio(url: &str, key: Option<String>) -> Result<i32> {
    let api = Http {
        // Long enough for the longest execution the API allows, and then some.
        client: reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(360))
            .build()?,
        base: url.trim_end_matches('/').to_string(),
        key,
    };
    let server = McpServer::new(api);
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        if let Some(response) = server.handle_line(&line) {
            writeln!(stdout, "{response}")?;
            stdout.flush()?;
        }
    }
    Ok(0)
}
