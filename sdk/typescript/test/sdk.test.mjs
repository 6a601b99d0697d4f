// The TypeScript SDK (built to dist/) against a live `forkvm serve`: FORKVM_URL and
// FORKVM_API_KEY come from the caller (crates/forkvm/tests/sdk.rs).
import { test } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";

import {
  AuthenticationError,
  InvalidRequestError,
  NotFoundError,
  Sandbox,
  TimeoutError,
} from "../dist/index.js";

test("the one-liner runs code in a fresh sandbox", async () => {
  // The seed project's example: JavaScript, the TypeScript SDK's default language.
  const result = await new Sandbox(process.env.FORKVM_API_KEY).run("console.log(1+1)");
  assert.equal(result.stdout, "2\n");
  assert.equal(result.ok, true);
  assert.equal(result.error, null);
  assert.ok(result.timings.totalMs > 0);
  const typed = await new Sandbox().run("const n: number = 41; console.log(n + 1)", { language: "typescript" });
  assert.equal(typed.stdout, "42\n");
  const python = await new Sandbox().run("print(1 + 1)", { language: "python" });
  assert.equal(python.stdout, "2\n");
});

test("options, limits and batches", async () => {
  const sb = new Sandbox();
  const result = await sb.run(
    "import os, sys\nprint(os.environ['A'], sys.stdin.read(), open('f.txt').read())\nsys.exit(2)",
    { language: "python", env: { A: "a" }, stdin: "in", files: { "f.txt": "file", "b.bin": new Uint8Array([0, 255]) }, cwd: "/tmp/ts" },
  );
  assert.equal(result.stdout, "a in file\n");
  assert.equal(result.exitCode, 2);
  const timeout = await sb.run("while (true) {}", { timeout: 1 });
  assert.equal(timeout.error?.kind, "timeout");
  const batch = await sb.runBatch(["console.log('x')", { code: "print('y')", language: "python" }]);
  assert.deepEqual(batch.map((r) => r.stdout), ["x\n", "y\n"]);
});

test("streaming as an async iterator and as callbacks", async () => {
  const sb = new Sandbox();
  const seen = [];
  let last;
  for await (const event of sb.stream("for (let i = 0; i < 3; i++) console.log(i);\nprocess.stderr.write('e')")) {
    if (event.type === "result") last = event.execution;
    else seen.push(`${event.type}:${event.data}`);
  }
  assert.equal(seen.filter((s) => s.startsWith("stdout:")).map((s) => s.slice(7)).join(""), "0\n1\n2\n");
  assert.ok(seen.includes("stderr:e"));
  assert.equal(last.stdout, "0\n1\n2\n");
  const chunks = [];
  const result = await sb.run("print('cb')", { language: "python", onStdout: (c) => chunks.push(c) });
  assert.equal(chunks.join(""), "cb\n");
  assert.equal(result.stdout, "cb\n");
});

test("sessions keep state, fork, and hold files", async () => {
  const sb = await Sandbox.create({ metadata: { from: "ts" } });
  try {
    await sb.run("x = 41");
    assert.equal((await sb.run("print(x + 1)")).stdout, "42\n");
    await sb.files.write("/tmp/t.txt", "typed");
    await sb.files.write("/tmp/b.bin", new Uint8Array([1, 2, 255]));
    assert.equal(new TextDecoder().decode(await sb.files.read("/tmp/t.txt")), "typed");
    assert.deepEqual([...(await sb.files.read("/tmp/b.bin"))], [1, 2, 255]);
    assert.equal((await sb.commands.run("cat /tmp/t.txt")).stdout, "typed");
    assert.deepEqual((await sb.info()).metadata, { from: "ts" });
    assert.ok((await Sandbox.list()).some((s) => s.id === sb.id));
    const again = await Sandbox.connect(sb.id);
    assert.equal((await again.run("print(x)")).stdout, "41\n");
    await assert.rejects(Sandbox.connect("00000000-0000-0000-0000-000000000000"), NotFoundError);
    const paused = await sb.pause();
    assert.equal(paused.state, "paused");
    assert.ok(paused.storedBytes > 0);
    assert.equal((await sb.run("print(x)")).stdout, "41\n");
    assert.equal((await sb.info()).state, "running");
    await sb.pause();
    assert.equal((await sb.resume()).state, "running");
    const [branch] = await sb.fork(1);
    await branch.run("x = 0");
    assert.equal((await branch.run("print(x)")).stdout, "0\n");
    assert.equal((await sb.run("print(x)")).stdout, "41\n");
    await branch.kill();
  } finally {
    await sb.kill();
  }
  await assert.rejects(sb.run("print(1)"), NotFoundError);
});

test("errors are typed", async () => {
  await assert.rejects(new Sandbox("fvk_wrong").run("1"), (e) => e instanceof AuthenticationError && e.status === 401);
  await assert.rejects(new Sandbox().run("1", { language: "cobol" }), (e) => e instanceof InvalidRequestError && e.field === "language");
  const silent = net.createServer(() => {}).listen(0, "127.0.0.1");
  await new Promise((resolve) => silent.once("listening", resolve));
  try {
    const url = `http://127.0.0.1:${silent.address().port}`;
    await assert.rejects(Sandbox.list({ baseUrl: url, timeoutMs: 300 }), TimeoutError);
  } finally {
    silent.close();
    silent.unref();
  }
});
