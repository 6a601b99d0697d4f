//! MCP against the real server: `forkvm mcp` on stdio and `POST /mcp`, the same scenario
//! through each (initialize, tools/list, every tool), results checked.

#[path = "support/server.rs"]
mod server;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use server::{Server, client};

/// Runs the scenario through `send`, which delivers one message and returns the response
/// (`None` for a notification).
fn scenario(send: &mut dyn FnMut(Value) -> Option<Value>) {
    let mut id = 0;
    let mut request =
        |send: &mut dyn FnMut(Value) -> Option<Value>, method: &str, params: Value| {
            id += 1;
            let response =
                send(json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }))
                    .expect("a request gets a response");
            assert_eq!(response["id"], id, "{response}");
            assert!(response.get("error").is_none(), "{response}");
            response["result"].clone()
        };
    let init = request(
        send,
        "initialize",
        json!({ "protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": { "name": "forkvm-test", "version": "0" } }),
    );
    assert_eq!(init["protocolVersion"], "2025-06-18");
    assert!(send(json!({ "jsonrpc": "2.0", "method": "notifications/initialized" })).is_none());
    let tools = request(send, "tools/list", json!({}));
    assert_eq!(tools["tools"].as_array().unwrap().len(), 8, "{tools}");
    let mut tool = |send: &mut dyn FnMut(Value) -> Option<Value>, name: &str, arguments: Value| {
        let result = request(
            send,
            "tools/call",
            json!({ "name": name, "arguments": arguments }),
        );
        assert_eq!(result["isError"], false, "{name}: {result}");
        result
    };
    let run = tool(send, "run_code", json!({ "code": "print(6 * 7)" }));
    assert_eq!(run["structuredContent"]["stdout"], "42\n");
    assert_eq!(run["structuredContent"]["exit_code"], 0);
    assert!(run["content"][0]["text"].as_str().unwrap().contains("42"));
    let session = tool(send, "create_session", json!({}));
    let sid = session["structuredContent"]["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    tool(
        send,
        "run_in_session",
        json!({ "session_id": sid, "code": "x = 20" }),
    );
    tool(
        send,
        "write_file",
        json!({ "session_id": sid, "path": "/tmp/n.txt", "content": "hi there" }),
    );
    let read = tool(
        send,
        "read_file",
        json!({ "session_id": sid, "path": "/tmp/n.txt" }),
    );
    assert_eq!(read["content"][0]["text"], "hi there");
    let forked = tool(
        send,
        "fork_session",
        json!({ "session_id": sid, "count": 1 }),
    );
    let branch = forked["structuredContent"]["session_ids"][0]
        .as_str()
        .unwrap()
        .to_string();
    let got = tool(
        send,
        "run_in_session",
        json!({ "session_id": branch, "code": "print(x + 1, open('/tmp/n.txt').read())" }),
    );
    assert_eq!(got["structuredContent"]["stdout"], "21 hi there\n");
    let paused = tool(send, "pause_session", json!({ "session_id": branch }));
    assert!(
        paused["structuredContent"]["stored_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    let again = tool(
        send,
        "run_in_session",
        json!({ "session_id": branch, "code": "print(x)" }),
    );
    assert_eq!(again["structuredContent"]["stdout"], "20\n");
    tool(send, "delete_session", json!({ "session_id": branch }));
    tool(send, "delete_session", json!({ "session_id": sid }));
    // A failing call is a result the model reads, not a protocol error.
    let gone = request(
        send,
        "tools/call",
        json!({ "name": "run_in_session", "arguments": { "session_id": sid, "code": "1" } }),
    );
    assert_eq!(gone["isError"], true, "{gone}");
}

#[test]
fn forkvm_mcp_on_stdio_runs_every_tool() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    // Caches of their own: each server holds its own paused-session store.
    let cache = server::private_cache("mcp-stdio");
    let server = Server::start_in(&cache, &cache.join("keys.json"), &[]);
    let mut mcp = Command::new(env!("CARGO_BIN_EXE_forkvm"))
        .arg("mcp")
        .env("FORKVM_URL", &server.base)
        .env("FORKVM_API_KEY", &server.alice)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = mcp.stdin.take().unwrap();
    let mut stdout = BufReader::new(mcp.stdout.take().unwrap());
    scenario(&mut |message: Value| {
        writeln!(stdin, "{message}").unwrap();
        stdin.flush().unwrap();
        message.get("id")?;
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        Some(serde_json::from_str(&line).unwrap())
    });
    drop(stdin);
    assert!(mcp.wait().unwrap().success());
}

#[test]
fn post_mcp_runs_every_tool_with_the_callers_key() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let cache = server::private_cache("mcp-http");
    let server = Server::start_in(&cache, &cache.join("keys.json"), &[]);
    let http = client();
    scenario(&mut |message: Value| {
        let response = http
            .post(server.url("/mcp"))
            .bearer_auth(&server.alice)
            .header("accept", "application/json, text/event-stream")
            .json(&message)
            .send()
            .unwrap();
        if message.get("id").is_none() {
            assert_eq!(response.status().as_u16(), 202);
            return None;
        }
        assert_eq!(response.status().as_u16(), 200);
        Some(response.json().unwrap())
    });
    // The key is checked as on every route.
    let anonymous = http
        .post(server.url("/mcp"))
        .json(&json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/list" }))
        .send()
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    // Malformed messages get JSON-RPC errors, and the server serves on.
    let garbage = http
        .post(server.url("/mcp"))
        .bearer_auth(&server.alice)
        .body("{nope")
        .send()
        .unwrap();
    assert_eq!(garbage.status().as_u16(), 400);
    let body: Value = garbage.json().unwrap();
    assert_eq!(body["error"]["code"], -32700, "{body}");
    for (message, code) in [
        (
            json!({ "jsonrpc": "2.0", "id": 7, "method": "no/such" }),
            -32601,
        ),
        (
            json!({ "jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {} }),
            -32602,
        ),
        (json!([1, 2]), -32600),
    ] {
        let reply: Value = http
            .post(server.url("/mcp"))
            .bearer_auth(&server.alice)
            .json(&message)
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(reply["error"]["code"], code, "{message}: {reply}");
    }
}
