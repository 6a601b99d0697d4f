//! JavaScript and TypeScript through the real server and CLI: a server serving the python
//! and node templates routes each request by its template or language, sessions of the
//! node template keep state and fork, batches mix runtimes, and `forkvm exec --template
//! node` runs JavaScript.

#[path = "support/server.rs"]
mod server;

use std::process::Command;

use serde_json::{Value, json};
use server::{Server, client};

fn start() -> Option<Server> {
    if !forkvm_testkit::kvm_available() {
        return None;
    }
    server::build_node_template();
    Some(Server::start(&["--template", "python,node"]))
}

fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let response = client()
        .post(server.url(path))
        .bearer_auth(&server.alice)
        .json(&body)
        .send()
        .unwrap();
    (response.status().as_u16(), response.json().unwrap())
}

#[test]
fn requests_run_in_the_template_their_language_or_name_picks() {
    let Some(server) = start() else { return };
    let cases = [
        (json!({"code": "print(1 + 1)"}), "2\n"),
        (
            json!({"code": "console.log(1+1)", "language": "javascript"}),
            "2\n",
        ),
        (
            json!({"code": "console.log(typeof require)", "language": "node"}),
            "function\n",
        ),
        (
            json!({"code": "const s: string = 'typed'; console.log(s)", "language": "typescript"}),
            "typed\n",
        ),
        (
            json!({"code": "console.log(process.version.startsWith('v'))", "template": "node"}),
            "true\n",
        ),
        (
            json!({"code": "echo $0", "language": "bash", "template": "node"}),
            "bash\n",
        ),
    ];
    for (body, stdout) in cases {
        let (status, result) = post(&server, "/v1/exec", body.clone());
        assert_eq!(status, 200, "{body}: {result}");
        assert_eq!(result["stdout"], stdout, "{body}: {result}");
        assert_eq!(result["exit_code"], 0, "{body}: {result}");
    }

    let (status, error) = post(
        &server,
        "/v1/exec",
        json!({"code": "1", "template": "ruby"}),
    );
    assert_eq!(
        (status, error["error"]["field"].as_str()),
        (422, Some("template"))
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("python, node")
    );
    let (status, error) = post(
        &server,
        "/v1/exec",
        json!({"code": "print(1)", "template": "node", "language": "python"}),
    );
    assert_eq!(
        (status, error["error"]["field"].as_str()),
        (422, Some("language"))
    );

    let listed = client()
        .get(server.url("/v1/templates"))
        .bearer_auth(&server.alice)
        .send()
        .unwrap();
    assert_eq!(listed.status().as_u16(), 200);
    let listed: Value = listed.json().unwrap();
    let templates = listed["templates"].as_array().unwrap();
    let summary: Vec<(&str, &str, bool)> = templates
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap(),
                t["runtime"].as_str().unwrap(),
                t["default"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("python", "python", true), ("node", "node", false)]
    );
    assert_eq!(templates[1]["languages"][1], "node");
    assert!(templates[0]["memory_mb"].as_u64().unwrap() > 0);
    let anonymous = client().get(server.url("/v1/templates")).send().unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);

    let health: Value = client()
        .get(server.url("/v1/health"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(health["templates"]["node"]["languages"][0], "javascript");
    assert_eq!(health["templates"]["python"]["languages"][0], "python");
}

#[test]
fn node_sessions_keep_state_and_fork_and_batches_mix_runtimes() {
    let Some(server) = start() else { return };
    let (status, info) = post(&server, "/v1/sandboxes", json!({"template": "node"}));
    assert_eq!(status, 201, "{info}");
    assert_eq!(info["template"], "node");
    let id = info["id"].as_str().unwrap().to_string();
    let exec = format!("/v1/sandboxes/{id}/exec");
    let (status, _) = post(
        &server,
        &exec,
        json!({"code": "let x = 41; const seen = []"}),
    );
    assert_eq!(status, 200);
    let (_, result) = post(
        &server,
        &exec,
        json!({"code": "seen.push(x + 1); console.log(seen)"}),
    );
    assert_eq!(result["stdout"], "[ 42 ]\n", "{result}");
    let (status, error) = post(&server, &exec, json!({"code": "1", "template": "python"}));
    assert_eq!(
        (status, error["error"]["field"].as_str()),
        (422, Some("template"))
    );

    let (status, forked) = post(
        &server,
        &format!("/v1/sandboxes/{id}/fork"),
        json!({"count": 1}),
    );
    assert_eq!(status, 200, "{forked}");
    let branch = forked["ids"][0].as_str().unwrap().to_string();
    let (_, result) = post(
        &server,
        &format!("/v1/sandboxes/{branch}/exec"),
        json!({"code": "seen.push('branch'); console.log(seen.length)"}),
    );
    assert_eq!(result["stdout"], "2\n", "{result}");
    let (_, result) = post(&server, &exec, json!({"code": "console.log(seen.length)"}));
    assert_eq!(result["stdout"], "1\n", "{result}");

    let (status, batch) = post(
        &server,
        "/v1/exec/batch",
        json!({"executions": [
            {"code": "print('py')"},
            {"code": "console.log('js')", "language": "javascript"},
            {"code": "console.log('ts' as string)", "language": "typescript"},
        ]}),
    );
    assert_eq!(status, 200, "{batch}");
    let outputs: Vec<&str> = batch["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["stdout"].as_str().unwrap())
        .collect();
    assert_eq!(outputs, ["py\n", "js\n", "ts\n"]);
}

#[test]
fn the_cli_runs_javascript_in_the_node_template() {
    if !forkvm_testkit::kvm_available() {
        return;
    }
    server::build_node_template();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_forkvm"))
            .args(args)
            .env("FORKVM_CACHE_DIR", server::cache_dir())
            .output()
            .unwrap()
    };
    let out = run(&[
        "exec",
        "--template",
        "node",
        "--language",
        "javascript",
        "console.log(1+1)",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"2\n");
    let out = run(&["exec", "--template", "node", "process.exitCode = 7"]);
    assert_eq!(out.status.code(), Some(7));
    let out = run(&["template", "show", "node"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("runtime:     node"));
}
