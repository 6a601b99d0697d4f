//! JSON-RPC 2.0 messages of MCP: requests get a response, notifications none.

use serde_json::{Value, json};

use crate::Api;
use crate::tools;

/// The protocol revision this server speaks.
pub const PROTOCOL_VERSION: &str = "2025-06-18";

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;

/// The MCP server for one client connection.
pub struct McpServer<A: Api> {
    api: A,
}

impl<A: Api> McpServer<A> {
    pub fn new(api: A) -> McpServer<A> {
        McpServer { api }
    }

    /// Handles one line of the stdio transport: the response to write, if any.
    pub fn handle_line(&self, line: &str) -> Option<String> {
        let response = match serde_json::from_str::<Value>(line) {
            Ok(message) => self.handle(&message)?,
            Err(e) => error(Value::Null, PARSE_ERROR, &format!("not JSON: {e}")),
        };
        Some(response.to_string())
    }

    /// Handles one message: `None` for a notification (or a response sent to us).
    pub fn handle(&self, message: &Value) -> Option<Value> {
        let Some(object) = message.as_object() else {
            return Some(error(
                Value::Null,
                INVALID_REQUEST,
                "a message is an object",
            ));
        };
        let id = object.get("id").cloned();
        let Some(method) = object.get("method").and_then(Value::as_str) else {
            // A response or garbage: answer garbage that has an id, ignore the rest.
            let is_response = object.contains_key("result") || object.contains_key("error");
            return match id {
                Some(id) if !is_response => {
                    Some(error(id, INVALID_REQUEST, "a request needs a method"))
                }
                _ => None,
            };
        };
        let params = object.get("params").cloned().unwrap_or(Value::Null);
        // Notifications (`notifications/initialized`, `notifications/cancelled`, …) need
        // nothing from us.
        let id = id?;
        Some(match self.dispatch(method, &params) {
            Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
            Err((code, message)) => error(id, code, &message),
        })
    }

    fn dispatch(&self, method: &str, params: &Value) -> Result<Value, (i64, String)> {
        match method {
            "initialize" => Ok(initialize()),
            "ping" => Ok(json!({})),
            "tools/list" => Ok(json!({ "tools": tools::tool_list() })),
            "tools/call" => {
                let name = params
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or((INVALID_PARAMS, "tools/call needs a tool name".to_string()))?;
                let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
                tools::call(&self.api, name, &arguments).map_err(|e| (INVALID_PARAMS, e))
            }
            other => Err((METHOD_NOT_FOUND, format!("no method {other:?}"))),
        }
    }
}

/// The answer to `initialize`: our version if the client speaks it, else ours anyway
/// (the client then decides whether it can go on).
fn initialize() -> Value {
    json!({
        "protocolVersion": PROTOCOL_VERSION,
        "capabilities": { "tools": { "listChanged": false } },
        "serverInfo": {
            "name": "forkvm",
            "title": "forkvm sandboxes",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "instructions": "Run code in fresh, hardware-isolated sandboxes (a KVM virtual machine \
            each, ready in about a millisecond). Use run_code for one-off code. Use \
            create_session when state should last between calls (variables, files, \
            installed data), then run_in_session; fork_session copies a session's whole \
            state to try several alternatives; delete sessions you no longer need.",
    })
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ApiCall, ApiReply};
    use std::cell::RefCell;

    /// Answers every call with `reply`, remembering the calls.
    struct Recorder {
        reply: ApiReply,
        calls: RefCell<Vec<ApiCall>>,
    }

    impl Api for &Recorder {
        fn call(&self, call: ApiCall) -> Result<ApiReply, String> {
            self.calls.borrow_mut().push(call);
            Ok(self.reply.clone())
        }
    }

    fn recorder(status: u16, body: Value) -> Recorder {
        Recorder {
            reply: ApiReply {
                status,
                body: body.to_string().into_bytes(),
            },
            calls: RefCell::new(Vec::new()),
        }
    }

    fn request(id: u64, method: &str, params: Value) -> String {
        json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }).to_string()
    }

    #[test]
    fn initialize_list_and_notifications() {
        let api = recorder(200, json!({}));
        let server = McpServer::new(&api);
        let reply: Value = serde_json::from_str(
            &server
                .handle_line(&request(
                    1,
                    "initialize",
                    json!({ "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
                            "clientInfo": { "name": "test", "version": "0" } }),
                ))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(reply["id"], 1);
        assert_eq!(reply["result"]["protocolVersion"], PROTOCOL_VERSION);
        assert!(reply["result"]["capabilities"]["tools"].is_object());
        let note = json!({ "jsonrpc": "2.0", "method": "notifications/initialized" });
        assert!(server.handle_line(&note.to_string()).is_none());
        let list: Value = serde_json::from_str(
            &server
                .handle_line(&request(2, "tools/list", json!({})))
                .unwrap(),
        )
        .unwrap();
        let names: Vec<&str> = list["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        for tool in [
            "run_code",
            "create_session",
            "run_in_session",
            "fork_session",
            "write_file",
            "read_file",
            "delete_session",
        ] {
            assert!(names.contains(&tool), "{tool} missing from {names:?}");
        }
        assert!(api.calls.borrow().is_empty());
    }

    #[test]
    fn malformed_messages_get_json_rpc_errors() {
        let api = recorder(200, json!({}));
        let server = McpServer::new(&api);
        let parse: Value = serde_json::from_str(&server.handle_line("{nope").unwrap()).unwrap();
        assert_eq!(parse["error"]["code"], PARSE_ERROR);
        let unknown: Value = serde_json::from_str(
            &server
                .handle_line(&request(3, "nope/nope", json!({})))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(unknown["error"]["code"], METHOD_NOT_FOUND);
        assert_eq!(unknown["id"], 3);
        let no_name: Value = serde_json::from_str(
            &server
                .handle_line(&request(4, "tools/call", json!({})))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(no_name["error"]["code"], INVALID_PARAMS);
        let not_object: Value = serde_json::from_str(&server.handle_line("[1]").unwrap()).unwrap();
        assert_eq!(not_object["error"]["code"], INVALID_REQUEST);
    }
}
