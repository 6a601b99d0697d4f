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

fn send(key: &str, request: reqwest::blocking::RequestBuilder) -> (u16, Value) {
    let response = request.bearer_auth(key).send().unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

/// Polls build `id` until it is no longer building.
fn finished_build(server: &Server, id: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    loop {
        let (status, build) = send(
            &server.ops,
            client().get(server.url(&format!("/v1/templates/builds/{id}"))),
        );
        assert_eq!(status, 200, "{build}");
        if build["status"] != "building" {
            return build;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "build {id} never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

#[test]
fn operators_build_templates_through_the_api_and_they_are_served_at_once() {
    let Some(server) = start() else { return };
    let name = format!("api-built-{}", std::process::id());
    let spec = "runtime = \"python\"\n\
                warmup = \"open('/tmp/warm', 'w').write('41')\"\n\
                [env]\nGREETING = \"hej\"\n";
    let body = json!({"name": name, "spec": spec});
    let build =
        |key: &str, body: &Value| send(key, client().post(server.url("/v1/templates")).json(body));

    // Only operator keys build; refusals say why, naming the field.
    let (status, refused) = build(&server.alice, &body);
    assert_eq!(
        (status, refused["error"]["kind"].as_str()),
        (403, Some("forbidden"))
    );
    let (status, _) = send(
        &server.alice,
        client().get(server.url("/v1/templates/builds/x")),
    );
    assert_eq!(status, 403);
    for (bad, field) in [
        (json!({"name": "../x", "spec": spec}), "name"),
        (json!({"name": "ok", "spec": "runtime = \"ruby\""}), "spec"),
        (
            json!({"name": "ok", "spec": "[[files]]\nfrom = \"/etc\"\nto = \"/etc2\""}),
            "spec",
        ),
        (
            json!({"name": "ok", "spec": "", "lock": "pypi = [\"-r /etc/x\"]"}),
            "lock",
        ),
    ] {
        let (status, refused) = build(&server.ops, &bad);
        assert_eq!(status, 422, "{bad}: {refused}");
        assert_eq!(refused["error"]["field"], field, "{bad}: {refused}");
    }
    let (status, refused) = build(&server.ops, &json!({"name": "python", "spec": spec}));
    assert_eq!(
        (status, refused["error"]["kind"].as_str()),
        (409, Some("template_exists"))
    );

    let (status, started) = build(&server.ops, &body);
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["status"], "building");
    let (status, busy) = build(&server.ops, &json!({"name": "other", "spec": spec}));
    assert_eq!(
        (status, busy["error"]["kind"].as_str()),
        (409, Some("build_running"))
    );
    let done = finished_build(&server, started["id"].as_str().unwrap());
    assert_eq!(done["status"], "ready", "{done}");
    assert!(
        done["lock"].as_str().unwrap().contains("content_sha256"),
        "{done}"
    );

    // Served now, beside the others, without a restart.
    let (_, list) = send(&server.alice, client().get(server.url("/v1/templates")));
    let names: Vec<&str> = list["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["python", "node", name.as_str()]);
    let (status, result) = post(
        &server,
        "/v1/exec",
        json!({"template": name, "code":
            "import os\nprint(int(open('/tmp/warm').read()) + 1, os.environ['GREETING'])"}),
    );
    assert_eq!(status, 200, "{result}");
    assert_eq!(result["stdout"], "42 hej\n");

    // A failing build reports why; the server goes on serving.
    let (status, started) = build(
        &server.ops,
        &json!({"name": format!("{name}-bad"), "spec": "warmup = \"raise SystemExit(3)\""}),
    );
    assert_eq!(status, 202);
    let failed = finished_build(&server, started["id"].as_str().unwrap());
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("entry program ended"),
        "{failed}"
    );
    let (status, result) = post(&server, "/v1/exec", json!({"code": "print(1)"}));
    assert_eq!((status, result["stdout"].as_str()), (200, Some("1\n")));
}
