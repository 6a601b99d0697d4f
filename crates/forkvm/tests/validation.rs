//! Malformed requests against the real `forkvm serve`: each is refused with a 4xx in the one
//! JSON error shape, naming the field at fault, and the server goes on serving.

mod common;
#[path = "support/server.rs"]
mod server;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use server::{Server, client};

enum Body {
    None,
    Json(Value),
    Raw(&'static str),
}

/// One malformed request: where it goes (`{id}` is a live session), what it sends, and the
/// status and field (`None`: the error need not name one) it must get back.
struct Case {
    method: Method,
    path: &'static str,
    body: Body,
    status: u16,
    field: Option<&'static str>,
}

fn case(path: &'static str, body: Value, field: &'static str) -> Case {
    Case {
        method: Method::POST,
        path,
        body: Body::Json(body),
        status: 422,
        field: Some(field),
    }
}

fn raw(method: Method, path: &'static str, body: Body, status: u16) -> Case {
    Case {
        method,
        path,
        body,
        status,
        field: None,
    }
}

fn cases() -> Vec<Case> {
    let exec = "/v1/exec";
    let code = |extra: Value| {
        let mut body = json!({ "code": "print(1)" });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let file = |f: Value| code(json!({ "files": [f] }));
    let long_name = format!("/{}", "a".repeat(300));
    let long_path = "/x".repeat(3000);
    vec![
        raw(Method::POST, exec, Body::Raw("{not json"), 400),
        raw(Method::POST, exec, Body::Raw("[1, 2]"), 422),
        case(exec, json!({}), "code"),
        case(exec, json!({ "code": 5 }), "code"),
        case(exec, code(json!({ "bogus": 1 })), "bogus"),
        case(exec, code(json!({ "language": "cobol" })), "language"),
        case(
            exec,
            code(json!({ "timeout_seconds": 0 })),
            "timeout_seconds",
        ),
        case(
            exec,
            code(json!({ "timeout_seconds": -1 })),
            "timeout_seconds",
        ),
        case(
            exec,
            code(json!({ "timeout_seconds": 1e9 })),
            "timeout_seconds",
        ),
        case(
            exec,
            code(json!({ "timeout_seconds": "soon" })),
            "timeout_seconds",
        ),
        case(exec, code(json!({ "cpu_seconds": 0 })), "cpu_seconds"),
        case(exec, code(json!({ "memory_mb": 0 })), "memory_mb"),
        case(
            exec,
            code(json!({ "memory_mb": 17592186044416u64 })),
            "memory_mb",
        ),
        case(exec, code(json!({ "memory_mb": -1 })), "memory_mb"),
        case(
            exec,
            code(json!({ "output_limit_bytes": 0 })),
            "output_limit_bytes",
        ),
        case(
            exec,
            code(json!({ "output_limit_bytes": 1_000_000_000_000_000u64 })),
            "output_limit_bytes",
        ),
        case(exec, code(json!({ "env": { "A=B": "1" } })), "env"),
        case(exec, code(json!({ "env": { "": "1" } })), "env"),
        case(exec, code(json!({ "env": { "A": "x\u{0}" } })), "env.A"),
        case(exec, code(json!({ "env": { "A": 5 } })), "env.A"),
        case(exec, code(json!({ "cwd": "relative/dir" })), "cwd"),
        case(exec, code(json!({ "cwd": "/a\u{0}b" })), "cwd"),
        case(exec, code(json!({ "cwd": long_name })), "cwd"),
        case(exec, code(json!({ "cwd": long_path })), "cwd"),
        // Only the sandbox's filesystem knows this one: still a 422 naming the field.
        case(exec, code(json!({ "cwd": "/etc/passwd" })), "cwd"),
        case(exec, file(json!({ "path": "" })), "files[0].path"),
        case(exec, file(json!({ "path": "../x" })), "files[0].path"),
        case(exec, file(json!({ "path": "dir/" })), "files[0].path"),
        case(
            exec,
            file(json!({ "path": "a", "content": "x", "content_base64": "eA==" })),
            "files[0]",
        ),
        case(
            exec,
            file(json!({ "path": "a", "content_base64": "!!!" })),
            "files[0].content_base64",
        ),
        case(
            exec,
            file(json!({ "path": "a", "mode": 70000 })),
            "files[0].mode",
        ),
        case(exec, code(json!({ "stdin": 5 })), "stdin"),
        case(exec, code(json!({ "stream": "yes" })), "stream"),
        case("/v1/exec/batch", json!({ "executions": [] }), "executions"),
        case(
            "/v1/exec/batch",
            json!({ "executions": vec![json!({ "code": "1" }); 65] }),
            "executions",
        ),
        case(
            "/v1/exec/batch",
            json!({ "executions": [{ "code": "1" }, { "code": "1", "memory_mb": 0 }] }),
            "executions[1].memory_mb",
        ),
        raw(Method::POST, "/v1/exec/batch", Body::Raw("nope"), 400),
        raw(Method::POST, "/v1/sandboxes", Body::Raw("{"), 400),
        case("/v1/sandboxes", json!({ "ttl_seconds": 0 }), "ttl_seconds"),
        case(
            "/v1/sandboxes",
            json!({ "ttl_seconds": 99_999_999_999u64 }),
            "ttl_seconds",
        ),
        case("/v1/sandboxes", json!({ "template": "nope" }), "template"),
        case("/v1/sandboxes", json!({ "metadata": 5 }), "metadata"),
        case(
            "/v1/sandboxes",
            json!({ "metadata": { "k": "x".repeat(20_000) } }),
            "metadata",
        ),
        case("/v1/sandboxes", json!({ "color": "red" }), "color"),
        case("/v1/sandboxes/{id}/fork", json!({ "count": 0 }), "count"),
        case("/v1/sandboxes/{id}/fork", json!({ "count": 17 }), "count"),
        case(
            "/v1/sandboxes/{id}/fork",
            json!({ "count": "two" }),
            "count",
        ),
        raw(Method::POST, "/v1/sandboxes/{id}/fork", Body::Raw("{"), 400),
        case(
            "/v1/sandboxes/{id}/exec",
            json!({ "code": "1", "env": { "=": "x" } }),
            "env",
        ),
        case("/v1/sandboxes/{id}/commands", json!({}), "cmd"),
        case(
            "/v1/sandboxes/{id}/commands",
            json!({ "cmd": "ls", "cwd": "/etc/passwd" }),
            "cwd",
        ),
        Case {
            method: Method::PUT,
            path: "/v1/sandboxes/{id}/files/tmp/a%00b",
            body: Body::Raw("data"),
            status: 422,
            field: Some("path"),
        },
        raw(Method::GET, "/v1/sandboxes/not-a-uuid", Body::None, 404),
        raw(Method::GET, "/v1/no-such-route", Body::None, 404),
        raw(Method::DELETE, "/v1/exec", Body::None, 405),
    ]
}

#[test]
fn every_malformed_request_gets_a_json_error_naming_its_field() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    let server = Server::start(&[]);
    let key = &server.alice;
    let created = client()
        .post(server.url("/v1/sandboxes"))
        .bearer_auth(key)
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let id = created.json::<Value>().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let cases = cases();
    assert!(cases.len() >= 30);
    for case in cases {
        let path = case.path.replace("{id}", &id);
        let request = client()
            .request(case.method.clone(), server.url(&path))
            .bearer_auth(key);
        let request = match case.body {
            Body::None => request,
            Body::Json(body) => request.json(&body),
            Body::Raw(text) => request
                .header("content-type", "application/json")
                .body(text),
        };
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        let text = response.text().unwrap();
        let what = format!("{} {path}: {status} {text}", case.method);
        assert_eq!(status, case.status, "{what}");
        let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}"));
        let error = &body["error"];
        assert!(
            error["kind"].as_str().is_some_and(|k| !k.is_empty()),
            "{what}"
        );
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}"
        );
        if let Some(field) = case.field {
            assert_eq!(error["field"], field, "{what}");
        }
    }
    // Nothing broke: the session and the server still answer.
    for path in ["/v1/exec".to_string(), format!("/v1/sandboxes/{id}/exec")] {
        let response = client()
            .post(server.url(&path))
            .bearer_auth(key)
            .json(&json!({ "code": "print(6 * 7)" }))
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.json::<Value>().unwrap()["stdout"], "42\n");
    }
}
