//! forkvm as a Model Context Protocol server (protocol version 2025-06-18).
//!
//! An agent's host (Claude, Cursor, an OpenAI agent) speaks JSON-RPC to this server and
//! calls its tools: run code, make and fork sessions, move files. Each tool call becomes
//! calls to the forkvm HTTP API through `Api`, so the MCP server enforces nothing of its
//! own: authentication, quotas and limits are the API's. Two transports use it: stdio
//! (`forkvm mcp`, one JSON message per line, against a server's URL) and streamable HTTP
//! (`POST /mcp` on `forkvm serve`, the caller's own key).
//!
//! Why not the `rmcp` crate: forkvm needs four methods of the protocol (initialize, ping,
//! tools/list, tools/call) over two transports it already has; rmcp would bring its own
//! async runtime model and HTTP stack for that. This layer is small and tested.

mod rpc;
mod tools;

pub use rpc::{McpServer, PROTOCOL_VERSION};
pub use tools::tool_list;

/// One call to the forkvm HTTP API.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiCall {
    pub method: &'static str,
    /// Path and query, from `/v1/…`.
    pub path: String,
    pub body: ApiBody,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ApiBody {
    None,
    Json(serde_json::Value),
    Bytes(Vec<u8>),
}

/// The API's answer: status and body bytes.
#[derive(Debug, Clone)]
pub struct ApiReply {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Makes API calls for the tools (over HTTP, or in-process in the server).
pub trait Api {
    /// The API's answer, or why there was none (the server unreachable).
    fn call(&self, call: ApiCall) -> Result<ApiReply, String>;
}
