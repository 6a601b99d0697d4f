//! The Node.js template on real KVM: JavaScript and TypeScript run as `node` runs them
//! (output, exit codes, uncaught errors), sessions keep what they declare, forks draw fresh
//! randomness, and programs whose output is deterministic print what `node` on the host
//! prints.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use forkvm_engine::{Engine, EngineError, ErrorKind, ExecRequest, ExecResult, Session, Streams};
use forkvm_vmm::{PoolConfig, Vmm};

fn engine() -> Option<&'static Engine> {
    if !forkvm_testkit::kvm_available() {
        return None;
    }
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    Some(ENGINE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("node-templates");
        Engine::new(
            Arc::new(Vmm::new().unwrap()),
            forkvm_testkit::node_template(&dir),
            PoolConfig {
                size: 2,
                refill_threads: 1,
            },
        )
    }))
}

fn request(language: &str, code: &str) -> ExecRequest {
    let mut request = ExecRequest::python(code);
    request.language = language.to_string();
    request
}

fn exec(engine: &Engine, language: &str, code: &str) -> ExecResult {
    engine.exec("node", &request(language, code)).unwrap()
}

/// Runs JavaScript in a fresh fork, which must succeed; its stdout.
fn js(engine: &Engine, code: &str) -> String {
    ok(exec(engine, "javascript", code))
}

fn ok(result: ExecResult) -> String {
    assert_eq!(
        (result.exit_code, result.error.kind),
        (0, ErrorKind::None),
        "stderr: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    String::from_utf8(result.stdout).unwrap()
}

fn stderr(result: &ExecResult) -> String {
    String::from_utf8_lossy(&result.stderr).into_owned()
}

/// What `node -e CODE` prints on the host, if the host has node.
fn host_node(code: &str) -> Option<String> {
    let out = Command::new("node").args(["-e", code]).output().ok()?;
    assert!(
        out.status.success(),
        "host node failed on {code}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

/// Programs whose output does not depend on the machine: the sandbox prints what the
/// host's `node` prints.
const DETERMINISTIC: &[&str] = &[
    "console.log(1+1)",
    "setTimeout(() => console.log('t2'), 20); setTimeout(() => console.log('t1'), 5);\
     Promise.resolve().then(() => console.log('micro')); queueMicrotask(() => console.log('q'));\
     process.nextTick(() => console.log('tick'));\
     console.log('sync')",
    "const fs = require('fs'); const dir = fs.mkdtempSync('/tmp/rt-'); const f = dir + '/a.txt';\
     fs.writeFileSync(f, 'héllo\\n'.repeat(3)); fs.appendFileSync(f, 'end');\
     console.log(JSON.stringify(fs.readFileSync(f, 'utf8')), fs.statSync(f).size);\
     fs.rmSync(dir, { recursive: true })",
    "const c = require('crypto'); console.log(c.createHash('sha256').update('abc').digest('hex'),\
     c.createHmac('sha1', 'k').update('v').digest('base64'))",
    "console.log(require('child_process').execSync('echo hi').toString().trim())",
    "const {Worker} = require('worker_threads');\
     const w = new Worker(\"require('worker_threads').parentPort.postMessage(6 * 7)\", {eval: true});\
     w.on('message', (m) => { console.log('worker says', m); w.terminate(); })",
    "const http = require('http');\
     const server = http.createServer((req, res) => res.end('pong ' + req.url)).listen(0, '127.0.0.1', () => {\
       http.get(`http://127.0.0.1:${server.address().port}/x`, (res) => {\
         let body = ''; res.on('data', (d) => body += d);\
         res.on('end', () => { console.log(res.statusCode, body); server.close(); });\
       });\
     })",
    "const zlib = require('zlib'); const z = zlib.gzipSync('a'.repeat(1000));\
     console.log(zlib.gunzipSync(z).length, [3, 1, 2].sort().join())",
    // fetch (undici parses HTTP in WebAssembly) against a server in the same program.
    "const server = require('http').createServer((req, res) => res.end('pong ' + req.method))\
       .listen(0, '127.0.0.1', async () => {\
         const res = await fetch(`http://127.0.0.1:${server.address().port}/`, { method: 'POST' });\
         console.log(res.status, await res.text(), res.headers.get('content-length'));\
         server.close();\
       })",
    WASM_PROGRAM,
];

/// A WebAssembly memory (V8 reserves 10 GiB for each: the memory and its guard regions),
/// an out-of-bounds load trapping through the guard, growth, and several memories.
const WASM_PROGRAM: &str = "\
    const bytes = new Uint8Array([0,97,115,109,1,0,0,0, 1,6,1,96,1,127,1,127, 3,2,1,0, 5,3,1,0,1,\
      7,12,2,1,109,2,0,4,108,111,97,100,0,0, 10,9,1,7,0,32,0,40,2,0,11]);\
    WebAssembly.instantiate(bytes).then(({ instance }) => {\
      const { m, load } = instance.exports;\
      new Uint32Array(m.buffer)[1] = 42;\
      const out = [load(4)];\
      try { load(65536); out.push('no trap'); } catch (e) { out.push(e.constructor.name + ': ' + e.message); }\
      m.grow(3);\
      new Uint32Array(m.buffer)[65536 * 3 / 4] = 7;\
      out.push(load(65536 * 3), m.buffer.byteLength);\
      const mems = []; for (let i = 0; i < 8; i++) mems.push(new WebAssembly.Memory({ initial: 16 }));\
      out.push(mems.length);\
      console.log(out.join(' | '));\
    })";

#[test]
fn programs_print_what_node_on_the_host_prints() {
    let Some(engine) = engine() else { return };
    for code in DETERMINISTIC {
        let sandbox = js(engine, code);
        assert!(!sandbox.is_empty(), "no output from {code}");
        match host_node(code) {
            Some(host) => assert_eq!(sandbox, host, "{code}"),
            None => eprintln!("no node on the host: not compared: {code}"),
        }
    }
}

#[test]
fn top_level_await_import_and_require_all_work() {
    let Some(engine) = engine() else { return };
    let code = "import { createHash } from 'node:crypto';\n\
                import * as path from 'path';\n\
                import os, { EOL } from 'os';\n\
                const fs = require('fs');\n\
                const v = await new Promise((r) => setTimeout(() => r(7), 10));\n\
                const { join } = await import('path');\n\
                console.log(v, path.basename('/a/b.txt'), typeof os.cpus, JSON.stringify(EOL),\n\
                  typeof fs.readFileSync, join('x', 'y'), createHash('md5').update('').digest('hex'))";
    assert_eq!(
        js(engine, code),
        "7 b.txt function \"\\n\" function x/y d41d8cd98f00b204e9800998ecf8427e\n"
    );
}

#[test]
fn typescript_types_are_stripped_and_syntax_errors_reported() {
    let Some(engine) = engine() else { return };
    // The seed project's example, then a typed one.
    assert_eq!(ok(exec(engine, "typescript", "console.log(1+1)")), "2\n");
    let typed = "interface Point { x: number; y: number }\n\
                 type Pair<T> = [T, T];\n\
                 function add(p: Point): number { return p.x + p.y; }\n\
                 const pair: Pair<string> = ['a', 'b'];\n\
                 enum Color { Red = 1, Green }\n\
                 class Box<T> { constructor(private readonly value: T) {} get(): T { return this.value; } }\n\
                 const n = await Promise.resolve<number>(add({ x: 40, y: 2 }));\n\
                 console.log(n, pair.join(''), Color.Green, new Box<string>('ok').get());";
    assert_eq!(ok(exec(engine, "typescript", typed)), "42 ab 2 ok\n");

    let bad = exec(
        engine,
        "typescript",
        "const n: number = ;\nconsole.log('ran')",
    );
    assert_eq!(bad.exit_code, 1);
    assert!(bad.stdout.is_empty(), "code with a syntax error ran");
    assert!(
        stderr(&bad).contains("(1,19): error TS1109: Expression expected."),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn errors_and_exit_codes_are_nodes() {
    let Some(engine) = engine() else { return };
    let thrown = exec(
        engine,
        "javascript",
        "console.log('before'); throw new Error('boom')",
    );
    assert_eq!(
        (thrown.exit_code, thrown.stdout.as_slice()),
        (1, &b"before\n"[..])
    );
    let text = stderr(&thrown);
    assert!(text.contains("Error: boom\n    at [eval]:1:"), "{text}");
    assert!(text.contains("Node.js v"), "{text}");
    assert!(
        !text.contains("agent.js"),
        "the agent's frames leak: {text}"
    );

    let syntax = exec(engine, "javascript", "let x = ;");
    assert_eq!(syntax.exit_code, 1);
    assert!(
        stderr(&syntax).contains("SyntaxError: Unexpected token ';'"),
        "{}",
        stderr(&syntax)
    );

    // An uncaught error in a callback ends the program: the later timer never fires.
    let later = exec(
        engine,
        "javascript",
        "setTimeout(() => { throw new TypeError('late') }, 5); setTimeout(() => console.log('no'), 50)",
    );
    assert_eq!(later.exit_code, 1);
    assert!(later.stdout.is_empty());
    assert!(stderr(&later).contains("TypeError: late"));

    let rejected = exec(
        engine,
        "javascript",
        "Promise.reject(new RangeError('nope'))",
    );
    assert_eq!(rejected.exit_code, 1);
    assert!(stderr(&rejected).contains("RangeError: nope"));
    let reason = exec(engine, "javascript", "Promise.reject(42)");
    assert_eq!(reason.exit_code, 1);
    assert!(
        stderr(&reason).contains("ERR_UNHANDLED_REJECTION"),
        "{}",
        stderr(&reason)
    );

    let exit = exec(engine, "javascript", "process.exit(4); console.log('no')");
    assert_eq!((exit.exit_code, exit.stdout.len()), (4, 0));
    let code = exec(
        engine,
        "javascript",
        "process.exitCode = 3; setTimeout(() => console.log('still runs'), 5)",
    );
    assert_eq!(
        (code.exit_code, code.stdout.as_slice()),
        (3, &b"still runs\n"[..])
    );
}

#[test]
fn stdin_env_and_shells() {
    let Some(engine) = engine() else { return };
    let mut with_stdin = request(
        "javascript",
        "const s = require('fs').readFileSync(0, 'utf8'); console.log(s.split('\\n').length, process.env.GREETING)",
    );
    with_stdin.stdin = b"a\nb\nc".to_vec();
    with_stdin.env.insert("GREETING".into(), "hej".into());
    assert_eq!(ok(engine.exec("node", &with_stdin).unwrap()), "3 hej\n");
    assert_eq!(ok(exec(engine, "node", "console.log('alias')")), "alias\n");
    assert_eq!(
        ok(exec(
            engine,
            "bash",
            "for i in 1 2 3; do echo $i; done | sort -rn | head -1; node -e 'console.log(5)'"
        )),
        "3\n5\n"
    );
}

#[test]
fn languages_the_template_does_not_run_are_refused() {
    let Some(engine) = engine() else { return };
    for language in ["python", "ruby"] {
        let refused = engine.exec("node", &request(language, "print(1)"));
        assert!(
            matches!(refused, Err(EngineError::UnsupportedLanguage { .. })),
            "{language}: {refused:?}"
        );
    }
    // An empty language is the template's own.
    assert_eq!(
        ok(exec(engine, "", "console.log(typeof process)")),
        "object\n"
    );
}

fn session_run(engine: &Engine, session: &mut Session, code: &str) -> String {
    ok(engine
        .session_exec(session, &request("javascript", code), Streams::new())
        .unwrap())
}

#[test]
fn sessions_keep_declarations_and_forks_diverge() {
    let Some(engine) = engine() else { return };
    let mut session = engine.create_session("node").unwrap();
    session_run(
        engine,
        &mut session,
        "let x = 41; const items = [1, 2]; class Counter { constructor() { this.n = 0 } inc() { return ++this.n } }\n\
         function twice(v) { return 2 * v }\nimport path from 'path';\nconst c = new Counter();",
    );
    assert_eq!(
        session_run(
            engine,
            &mut session,
            "console.log(x + 1, twice(items.length), path.extname('a.js'), c.inc())"
        ),
        "42 4 .js 1\n"
    );
    // Declaring again, as a re-run notebook cell does, is fine.
    session_run(
        engine,
        &mut session,
        "const items = [1, 2, 3]; let x = 1; x += await Promise.resolve(1)",
    );
    assert_eq!(
        session_run(
            engine,
            &mut session,
            "console.log(x, items.length, c.inc())"
        ),
        "2 3 2\n"
    );
    // An uncaught error is reported and the session goes on.
    let failed = engine
        .session_exec(
            &mut session,
            &request("javascript", "throw new Error('oops')"),
            Streams::new(),
        )
        .unwrap();
    assert_eq!(failed.exit_code, 1);
    assert!(stderr(&failed).contains("Error: oops"));
    assert_eq!(session_run(engine, &mut session, "console.log(x)"), "2\n");

    let mut branches = engine.fork_session(&mut session, 2).unwrap();
    session_run(engine, &mut branches[0], "x = 100");
    assert_eq!(
        session_run(engine, &mut branches[0], "console.log(x, c.inc())"),
        "100 3\n"
    );
    assert_eq!(
        session_run(engine, &mut branches[1], "console.log(x, c.inc())"),
        "2 3\n"
    );
    assert_eq!(session_run(engine, &mut session, "console.log(x)"), "2\n");
}

/// A session's WebAssembly memory lives above guest RAM (`high`): each fork of the session
/// has its own copy, at the same address, with its page tables.
#[test]
fn webassembly_memory_survives_session_forks() {
    let Some(engine) = engine() else { return };
    let mut session = engine.create_session("node").unwrap();
    session_run(
        engine,
        &mut session,
        "globalThis.mem = new WebAssembly.Memory({ initial: 4 });\
         globalThis.view = new Uint8Array(mem.buffer); view[70000] = 9;",
    );
    let mut branches = engine.fork_session(&mut session, 2).unwrap();
    session_run(
        engine,
        &mut branches[0],
        "view[70000] = 1; mem.grow(1); new Uint8Array(mem.buffer)[300000] = 5",
    );
    assert_eq!(
        session_run(
            engine,
            &mut branches[0],
            "const v = new Uint8Array(mem.buffer); console.log(v[70000], v[300000], mem.buffer.byteLength)"
        ),
        "1 5 327680\n"
    );
    assert_eq!(
        session_run(
            engine,
            &mut branches[1],
            "console.log(view[70000], mem.buffer.byteLength)"
        ),
        "9 262144\n"
    );
    assert_eq!(
        session_run(engine, &mut session, "console.log(view[70000])"),
        "9\n"
    );
}

#[test]
fn forks_never_repeat_any_generator() {
    let Some(engine) = engine() else { return };
    // OpenSSL's generators (behind `crypto`) were seeded in the template, and reseed only
    // because every fork shows a new pid; `Math.random` the agent reseeds.
    let mut seen = HashSet::new();
    for _ in 0..100 {
        let out = js(
            engine,
            "const c = require('crypto');\n\
             console.log(Math.random(), c.randomBytes(16).toString('hex'), c.randomUUID(),\n\
               c.getRandomValues(new Uint32Array(2)).join('-'), c.randomInt(2 ** 47))",
        );
        for value in out.split_whitespace() {
            assert!(seen.insert(value.to_string()), "a fork repeated {value}");
        }
        let first: f64 = out.split_whitespace().next().unwrap().parse().unwrap();
        assert!((0.0..1.0).contains(&first), "{first}");
    }
}
