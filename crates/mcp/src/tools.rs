//! The tools an agent calls, and how each becomes API calls.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};

use crate::{Api, ApiBody, ApiCall};

/// What one execution gives back, as structured content.
fn execution_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "stdout": { "type": "string" },
            "stderr": { "type": "string" },
            "exit_code": { "type": "integer" },
            "error_kind": { "type": "string", "description": "none, timeout, cpu_time_limit, memory_limit, output_limit, fault, ..." },
            "error_message": { "type": "string" },
        },
        "required": ["stdout", "stderr", "exit_code", "error_kind"],
    })
}

fn code_properties() -> Map<String, Value> {
    let mut properties = Map::new();
    properties.insert(
        "code".into(),
        json!({ "type": "string", "description": "The program to run." }),
    );
    properties.insert(
        "language".into(),
        json!({
            "type": "string",
            "enum": ["python", "javascript", "typescript", "bash", "sh"],
            "description": "python (default), javascript or typescript (run by Node.js, where \
                the server serves a Node.js template), or a bash / sh script.",
        }),
    );
    properties.insert(
        "timeout_seconds".into(),
        json!({ "type": "number", "description": "Wall-clock limit (default 30, at most 300)." }),
    );
    properties
}

fn session_id() -> Value {
    json!({ "type": "string", "description": "The id create_session or fork_session gave." })
}

/// Every tool, as `tools/list` describes it (descriptions written for a model).
pub fn tool_list() -> Vec<Value> {
    let mut in_session = code_properties();
    in_session.insert("session_id".into(), session_id());
    vec![
        json!({
            "name": "run_code",
            "title": "Run code in a fresh sandbox",
            "description": "Runs a Python program (or JavaScript, TypeScript, or a bash \
                script: see language) in a brand-new, isolated \
                sandbox and returns its stdout, stderr and exit code. Nothing persists \
                afterwards: use create_session and run_in_session to keep variables or files \
                between runs. numpy is already imported in the runtime and fast to use; \
                print what you want to see.",
            "inputSchema": { "type": "object", "properties": code_properties(), "required": ["code"] },
            "outputSchema": execution_schema(),
        }),
        json!({
            "name": "create_session",
            "title": "Create a persistent sandbox",
            "description": "Creates a session: a sandbox whose state (Python variables, imported \
                modules, files, running processes) lasts between run_in_session calls. Returns \
                its session_id. Sessions expire after a while idle; delete them when done.",
            "inputSchema": { "type": "object", "properties": {
                "template": { "type": "string", "description": "Runtime template (default: the server's, Python with numpy)." }
            } },
            "outputSchema": { "type": "object", "properties": { "session_id": { "type": "string" } }, "required": ["session_id"] },
        }),
        json!({
            "name": "run_in_session",
            "title": "Run code in a session",
            "description": "Runs code in an existing session, with everything earlier calls \
                defined still there (like the next cell of a notebook). Returns stdout, stderr \
                and exit code.",
            "inputSchema": { "type": "object", "properties": in_session, "required": ["session_id", "code"] },
            "outputSchema": execution_schema(),
        }),
        json!({
            "name": "fork_session",
            "title": "Fork a session",
            "description": "Copies a session's complete state into `count` new sessions \
                (instantly, copy-on-write), to try alternatives from the same starting point \
                without redoing the setup. Returns the new session ids; the original is \
                unchanged.",
            "inputSchema": { "type": "object", "properties": {
                "session_id": session_id(),
                "count": { "type": "integer", "minimum": 1, "maximum": 64, "description": "How many copies (default 1)." }
            }, "required": ["session_id"] },
            "outputSchema": { "type": "object", "properties": { "session_ids": { "type": "array", "items": { "type": "string" } } }, "required": ["session_ids"] },
        }),
        json!({
            "name": "write_file",
            "title": "Write a file into a session",
            "description": "Writes text (or base64-encoded bytes) to a path in a session's \
                filesystem, creating directories as needed. Relative paths are under /root.",
            "inputSchema": { "type": "object", "properties": {
                "session_id": session_id(),
                "path": { "type": "string", "description": "Where to write, e.g. /root/data.csv." },
                "content": { "type": "string", "description": "The file's text." },
                "content_base64": { "type": "string", "description": "Or its bytes, base64-encoded." }
            }, "required": ["session_id", "path"] },
        }),
        json!({
            "name": "read_file",
            "title": "Read a file from a session",
            "description": "Reads a file from a session's filesystem: text as is, anything \
                else (an image, a binary) as base64 in structured content.",
            "inputSchema": { "type": "object", "properties": {
                "session_id": session_id(),
                "path": { "type": "string", "description": "The file to read." }
            }, "required": ["session_id", "path"] },
        }),
        json!({
            "name": "pause_session",
            "title": "Pause a session",
            "description": "Stores a session's complete state on disk and frees its machine, \
                for a session you will come back to later (it survives server restarts). Any \
                later call on it resumes it exactly as it was. Idle sessions are paused on \
                their own too.",
            "inputSchema": { "type": "object", "properties": { "session_id": session_id() }, "required": ["session_id"] },
        }),
        json!({
            "name": "delete_session",
            "title": "Delete a session",
            "description": "Deletes a session and everything in it. Do this when a session is \
                no longer needed.",
            "inputSchema": { "type": "object", "properties": { "session_id": session_id() }, "required": ["session_id"] },
        }),
    ]
}

/// Calls tool `name`: its result (a failure the model can act on is a result with
/// `isError`); `Err` only for a tool that does not exist.
pub fn call(api: &impl Api, name: &str, arguments: &Value) -> Result<Value, String> {
    let outcome = match name {
        "run_code" => run(api, "/v1/exec".to_string(), arguments),
        "create_session" => create_session(api, arguments),
        "run_in_session" => session(arguments)
            .and_then(|id| run(api, format!("/v1/sandboxes/{id}/exec"), arguments)),
        "fork_session" => fork_session(api, arguments),
        "write_file" => write_file(api, arguments),
        "read_file" => read_file(api, arguments),
        "pause_session" => pause_session(api, arguments),
        "delete_session" => delete_session(api, arguments),
        other => return Err(format!("no tool {other:?}")),
    };
    Ok(outcome.unwrap_or_else(
        |message| json!({ "content": [{ "type": "text", "text": message }], "isError": true }),
    ))
}

fn text_result(text: String, structured: Value) -> Value {
    json!({ "content": [{ "type": "text", "text": text }], "structuredContent": structured, "isError": false })
}

fn string<'a>(arguments: &'a Value, name: &str) -> Result<&'a str, String> {
    arguments
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("`{name}` is required (a string)"))
}

/// The session id argument, checked so it can only name a session (it goes into a URL).
fn session(arguments: &Value) -> Result<&str, String> {
    let id = string(arguments, "session_id")?;
    let valid = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if valid {
        Ok(id)
    } else {
        Err(format!("{id:?} is not a session id"))
    }
}

/// Percent-encodes a file path for the URL (slashes kept).
fn url_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.trim_start_matches('/').bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An API call's JSON answer, or the API's error as a message for the model.
fn api_json(api: &impl Api, call: ApiCall) -> Result<Value, String> {
    let reply = api
        .call(call)
        .map_err(|e| format!("the sandbox service is unreachable: {e}"))?;
    let body: Value = if reply.body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&reply.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&reply.body).into_owned()))
    };
    if (200..300).contains(&reply.status) {
        return Ok(body);
    }
    Err(api_error(reply.status, &body))
}

fn api_error(status: u16, body: &Value) -> String {
    let error = &body["error"];
    let kind = error["kind"].as_str().unwrap_or("error");
    let message = error["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| body.to_string());
    match error["field"].as_str() {
        Some(field) => format!("{kind} ({status}): {message} [field: {field}]"),
        None => format!("{kind} ({status}): {message}"),
    }
}

fn run(api: &impl Api, path: String, arguments: &Value) -> Result<Value, String> {
    let mut body = json!({ "code": string(arguments, "code")? });
    for field in ["language", "timeout_seconds"] {
        if let Some(value) = arguments.get(field).filter(|v| !v.is_null()) {
            body[field] = value.clone();
        }
    }
    let reply = api_json(
        api,
        ApiCall {
            method: "POST",
            path,
            body: ApiBody::Json(body),
        },
    )?;
    let stdout = reply["stdout"].as_str().unwrap_or_default();
    let stderr = reply["stderr"].as_str().unwrap_or_default();
    let exit_code = reply["exit_code"].as_i64().unwrap_or(-1);
    let kind = reply["error"]["kind"].as_str().unwrap_or("none");
    let message = reply["error"]["message"].as_str().unwrap_or_default();
    let mut text = format!("exit code {exit_code}\n");
    if kind != "none" {
        text.push_str(&format!("ended by: {kind}: {message}\n"));
    }
    text.push_str(&format!("--- stdout ---\n{stdout}"));
    if !stderr.is_empty() {
        text.push_str(&format!("\n--- stderr ---\n{stderr}"));
    }
    Ok(text_result(
        text,
        json!({
            "stdout": stdout,
            "stderr": stderr,
            "exit_code": exit_code,
            "error_kind": kind,
            "error_message": message,
        }),
    ))
}

fn create_session(api: &impl Api, arguments: &Value) -> Result<Value, String> {
    let mut body = json!({});
    if let Some(template) = arguments.get("template").and_then(Value::as_str) {
        body["template"] = json!(template);
    }
    let reply = api_json(
        api,
        ApiCall {
            method: "POST",
            path: "/v1/sandboxes".into(),
            body: ApiBody::Json(body),
        },
    )?;
    let id = reply["id"].as_str().unwrap_or_default().to_string();
    Ok(text_result(
        format!("session_id: {id}"),
        json!({ "session_id": id }),
    ))
}

fn fork_session(api: &impl Api, arguments: &Value) -> Result<Value, String> {
    let id = session(arguments)?;
    let count = arguments.get("count").and_then(Value::as_u64).unwrap_or(1);
    let reply = api_json(
        api,
        ApiCall {
            method: "POST",
            path: format!("/v1/sandboxes/{id}/fork"),
            body: ApiBody::Json(json!({ "count": count })),
        },
    )?;
    let ids: Vec<String> = reply["ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|i| i.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok(text_result(
        format!("new session_ids: {}", ids.join(", ")),
        json!({ "session_ids": ids }),
    ))
}

fn write_file(api: &impl Api, arguments: &Value) -> Result<Value, String> {
    let id = session(arguments)?;
    let path = string(arguments, "path")?;
    let bytes = match (
        arguments.get("content").and_then(Value::as_str),
        arguments.get("content_base64").and_then(Value::as_str),
    ) {
        (Some(text), None) => text.as_bytes().to_vec(),
        (None, Some(encoded)) => BASE64
            .decode(encoded)
            .map_err(|e| format!("content_base64 is not base64: {e}"))?,
        _ => return Err("give exactly one of `content` and `content_base64`".into()),
    };
    let size = bytes.len();
    api_json(
        api,
        ApiCall {
            method: "PUT",
            path: format!("/v1/sandboxes/{id}/files/{}", url_path(path)),
            body: ApiBody::Bytes(bytes),
        },
    )?;
    Ok(text_result(
        format!("wrote {size} bytes to {path}"),
        json!({ "path": path, "size": size }),
    ))
}

fn read_file(api: &impl Api, arguments: &Value) -> Result<Value, String> {
    let id = session(arguments)?;
    let path = string(arguments, "path")?;
    let reply = api
        .call(ApiCall {
            method: "GET",
            path: format!("/v1/sandboxes/{id}/files/{}", url_path(path)),
            body: ApiBody::None,
        })
        .map_err(|e| format!("the sandbox service is unreachable: {e}"))?;
    if !(200..300).contains(&reply.status) {
        let body = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
        return Err(api_error(reply.status, &body));
    }
    Ok(match String::from_utf8(reply.body) {
        Ok(text) => text_result(text.clone(), json!({ "path": path, "content": text })),
        Err(e) => {
            let bytes = e.into_bytes();
            text_result(
                format!(
                    "{path}: {} bytes of binary data (base64 in structured content)",
                    bytes.len()
                ),
                json!({ "path": path, "content_base64": BASE64.encode(&bytes) }),
            )
        }
    })
}

fn pause_session(api: &impl Api, arguments: &Value) -> Result<Value, String> {
    let id = session(arguments)?;
    let reply = api_json(
        api,
        ApiCall {
            method: "POST",
            path: format!("/v1/sandboxes/{id}/pause"),
            body: ApiBody::None,
        },
    )?;
    let stored = reply["stored_bytes"].as_u64().unwrap_or(0);
    Ok(text_result(
        format!(
            "paused session {id} ({} KiB stored); any call resumes it",
            stored >> 10
        ),
        json!({ "session_id": id, "stored_bytes": stored }),
    ))
}

fn delete_session(api: &impl Api, arguments: &Value) -> Result<Value, String> {
    let id = session(arguments)?;
    api_json(
        api,
        ApiCall {
            method: "DELETE",
            path: format!("/v1/sandboxes/{id}"),
            body: ApiBody::None,
        },
    )?;
    Ok(text_result(
        format!("deleted session {id}"),
        json!({ "session_id": id }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiReply;
    use std::cell::RefCell;

    struct Canned(RefCell<Vec<(ApiCall, ApiReply)>>);

    impl Api for Canned {
        fn call(&self, call: ApiCall) -> Result<ApiReply, String> {
            let (expected, reply) = self.0.borrow_mut().remove(0);
            assert_eq!(call, expected);
            Ok(reply)
        }
    }

    fn reply(status: u16, body: Value) -> ApiReply {
        ApiReply {
            status,
            body: body.to_string().into_bytes(),
        }
    }

    #[test]
    fn run_code_gives_text_and_structured_content() {
        let api = Canned(RefCell::new(vec![(
            ApiCall {
                method: "POST",
                path: "/v1/exec".into(),
                body: ApiBody::Json(json!({ "code": "print(2)", "timeout_seconds": 5 })),
            },
            reply(
                200,
                json!({ "stdout": "2\n", "stderr": "", "exit_code": 0,
                        "error": { "kind": "none", "message": "" } }),
            ),
        )]));
        let result = call(
            &api,
            "run_code",
            &json!({ "code": "print(2)", "timeout_seconds": 5 }),
        )
        .unwrap();
        assert_eq!(result["isError"], false);
        assert_eq!(result["structuredContent"]["stdout"], "2\n");
        assert!(
            result["content"][0]["text"]
                .as_str()
                .unwrap()
                .contains("--- stdout ---\n2\n")
        );
    }

    #[test]
    fn api_errors_and_bad_arguments_are_results_the_model_can_read() {
        let api = Canned(RefCell::new(vec![(
            ApiCall {
                method: "POST",
                path: "/v1/sandboxes/abc/exec".into(),
                body: ApiBody::Json(json!({ "code": "1" })),
            },
            reply(
                404,
                json!({ "error": { "kind": "not_found", "message": "no such session" } }),
            ),
        )]));
        let result = call(
            &api,
            "run_in_session",
            &json!({ "session_id": "abc", "code": "1" }),
        )
        .unwrap();
        assert_eq!(result["isError"], true);
        assert!(
            result["content"][0]["text"]
                .as_str()
                .unwrap()
                .contains("not_found")
        );
        // A session id that would steer the URL elsewhere never reaches the API.
        let result = call(
            &api,
            "delete_session",
            &json!({ "session_id": "../../v1/exec" }),
        )
        .unwrap();
        assert_eq!(result["isError"], true);
        assert!(call(&api, "no_such_tool", &json!({})).is_err());
    }

    #[test]
    fn file_paths_are_encoded_for_the_url() {
        assert_eq!(url_path("/tmp/a b/ü.txt"), "tmp/a%20b/%C3%BC.txt");
        assert_eq!(url_path("x?y#z"), "x%3Fy%23z");
    }
}
