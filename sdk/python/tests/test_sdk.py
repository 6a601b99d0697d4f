"""The Python SDK against a live ``forkvm serve``.

The server, and the environment, come from the caller (``crates/forkvm/tests/sdk.rs``):
``FORKVM_URL``, ``FORKVM_API_KEY`` (alice) and ``FORKVM_OTHER_KEY`` (bob, used to hit the
rate limit), on a server started with ``--rate 20 --burst 40`` serving the python and
node templates.
"""

import asyncio
import os
import socket
import unittest

import forkvm
from forkvm import AsyncSandbox, Sandbox


class SyncTests(unittest.TestCase):
    def test_the_seeds_one_liner(self):
        result = Sandbox(os.environ["FORKVM_API_KEY"]).run("print(1 + 1)")
        self.assertEqual(result.stdout, "2\n")
        self.assertTrue(result.ok)
        self.assertIsNone(result.error)
        self.assertGreater(result.timings.total_ms, 0)

    def test_other_languages_and_templates(self):
        sb = Sandbox()
        self.assertEqual(sb.run("console.log(1+1)", language="javascript").stdout, "2\n")
        typed = sb.run("const n: number = 41; console.log(n + 1)", language="typescript")
        self.assertEqual(typed.stdout, "42\n")
        self.assertEqual(sb.run("console.log(typeof require)", template="node").stdout, "function\n")
        with self.assertRaises(forkvm.InvalidRequestError):
            sb.run("print(1)", template="no-such-template")
        with Sandbox.create(template="node") as session:
            session.run("let x = 41")
            self.assertEqual(session.run("console.log(x + 1)").stdout, "42\n")
            self.assertEqual(session.info().template, "node")

    def test_run_with_everything(self):
        with Sandbox() as sb:
            result = sb.run(
                "import os, sys\nprint(os.environ['GREETING'], sys.stdin.read(), open('data.txt').read())\n"
                "sys.stderr.write('warned')\nsys.exit(3)",
                env={"GREETING": "hi"},
                stdin="from stdin",
                files={"data.txt": "from a file"},
                cwd="/tmp/work",
                timeout=20,
            )
        self.assertEqual(result.stdout, "hi from stdin from a file\n")
        self.assertEqual(result.stderr, "warned")
        self.assertEqual(result.exit_code, 3)
        self.assertFalse(result.ok)

    def test_binary_output_comes_back_exactly(self):
        result = Sandbox().run("import sys; sys.stdout.buffer.write(bytes(range(256)))")
        self.assertEqual(result.stdout_bytes, bytes(range(256)))

    def test_limits_end_the_code_not_the_call(self):
        result = Sandbox().run("while True: pass", timeout=1)
        self.assertEqual(result.error.kind, "timeout")
        result = Sandbox().run("x = bytearray(1 << 30)", memory_mb=64)
        self.assertEqual(result.error.kind, "memory_limit")

    def test_batch(self):
        results = Sandbox().run_batch(
            ["print(1)", {"code": "import sys; print(sys.stdin.read())", "stdin": "two"}]
        )
        self.assertEqual([r.stdout for r in results], ["1\n", "two\n"])

    def test_streaming_delivers_output_as_it_comes(self):
        chunks, errors = [], []
        result = Sandbox().run(
            "import sys, time\nfor i in range(3):\n    print(i, flush=True); time.sleep(0.05)\n"
            "sys.stderr.write('e')",
            on_stdout=chunks.append,
            on_stderr=errors.append,
        )
        self.assertEqual("".join(chunks), "0\n1\n2\n")
        self.assertEqual("".join(errors), "e")
        self.assertEqual(result.stdout, "0\n1\n2\n")

    def test_sessions_keep_state_fork_files_and_commands(self):
        with Sandbox.create(metadata={"test": "sdk"}) as sb:
            self.assertIsNotNone(sb.id)
            sb.run("x = 41")
            self.assertEqual(sb.run("print(x + 1)").stdout, "42\n")
            sb.files.write("/tmp/notes.txt", "hello")
            sb.files.write("/tmp/blob.bin", b"\x00\xff")
            self.assertEqual(sb.files.read("/tmp/notes.txt"), b"hello")
            self.assertEqual(sb.files.read("/tmp/blob.bin"), b"\x00\xff")
            self.assertEqual(sb.commands.run("cat /tmp/notes.txt; echo").stdout, "hello\n")
            ids = [s.id for s in Sandbox.list()]
            self.assertIn(sb.id, ids)
            # Another handle on the same session, as another process would make.
            again = Sandbox.connect(sb.id)
            self.assertEqual(again.run("print(x)").stdout, "41\n")
            with self.assertRaises(forkvm.NotFoundError):
                Sandbox.connect("00000000-0000-0000-0000-000000000000")
            self.assertEqual(sb.info().metadata, {"test": "sdk"})
            paused = sb.pause()
            self.assertEqual((paused.state, paused.memory_bytes), ("paused", 0))
            self.assertGreater(paused.stored_bytes, 0)
            self.assertEqual(sb.run("print(x)").stdout, "41\n")  # resumed by the call
            self.assertEqual(sb.info().state, "running")
            sb.pause()
            self.assertEqual(sb.resume().state, "running")
            branches = sb.fork(2)
            try:
                for i, branch in enumerate(branches):
                    branch.run(f"x += {i}")
                self.assertEqual(branches[0].run("print(x)").stdout, "41\n")
                self.assertEqual(branches[1].run("print(x)").stdout, "42\n")
                self.assertEqual(sb.run("print(x)").stdout, "41\n")
            finally:
                for branch in branches:
                    branch.kill()
            gone = sb.id
        self.assertNotIn(gone, [s.id for s in Sandbox.list()])
        with self.assertRaises(forkvm.NotFoundError):
            Sandbox(_session_id=gone).run("print(1)")

    def test_errors_are_exceptions_with_the_apis_kinds(self):
        with self.assertRaises(forkvm.AuthenticationError) as caught:
            Sandbox(api_key="fvk_not_a_key").run("print(1)")
        self.assertEqual(caught.exception.status, 401)
        with self.assertRaises(forkvm.InvalidRequestError) as caught:
            Sandbox().run("print(1)", language="cobol")
        self.assertEqual(caught.exception.field, "language")
        with self.assertRaises(forkvm.ForkvmError):
            Sandbox().files.read("/etc/passwd")  # not a session

    def test_the_rate_limit_is_an_exception_with_retry_after_or_is_waited_out(self):
        key = os.environ["FORKVM_OTHER_KEY"]
        with self.assertRaises(forkvm.RateLimitError) as caught:
            for _ in range(200):
                Sandbox.list(key, max_retries=0)
        self.assertEqual(caught.exception.kind, "rate_limited")
        self.assertGreater(caught.exception.retry_after, 0)
        # With retries (the default), the client waits as told and gets through.
        self.assertIsInstance(Sandbox.list(key), list)

    def test_a_server_that_never_answers_is_a_timeout(self):
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        try:
            url = "http://127.0.0.1:%d" % silent.getsockname()[1]
            with self.assertRaises(forkvm.TimeoutError):
                Sandbox.list(base_url=url, timeout=0.5)
        finally:
            silent.close()


class AsyncTests(unittest.IsolatedAsyncioTestCase):
    async def test_run_batch_stream_and_concurrency(self):
        sb = AsyncSandbox()
        try:
            results = await asyncio.gather(*(sb.run(f"print({i} * 2)") for i in range(6)))
            self.assertEqual([r.stdout for r in results], [f"{i * 2}\n" for i in range(6)])
            batch = await sb.run_batch(["print('a')", "print('b')"])
            self.assertEqual([r.stdout for r in batch], ["a\n", "b\n"])
            chunks = []
            streamed = await sb.run("print('x'); print('y')", on_stdout=chunks.append)
            self.assertEqual("".join(chunks), "x\ny\n")
            self.assertEqual(streamed.stdout, "x\ny\n")
        finally:
            await sb.close()

    async def test_sessions(self):
        async with await AsyncSandbox.create() as sb:
            await sb.run("import numpy as np\na = np.arange(10)")
            self.assertEqual((await sb.run("print(int(a.sum()))")).stdout, "45\n")
            await sb.files.write("/tmp/a.txt", "async")
            self.assertEqual(await sb.files.read("/tmp/a.txt"), b"async")
            self.assertEqual((await sb.commands.run("echo hi")).stdout, "hi\n")
            self.assertEqual((await sb.pause()).state, "paused")
            self.assertEqual((await sb.resume()).state, "running")
            [branch] = await sb.fork()
            async with branch:
                self.assertEqual((await branch.run("print(len(a))")).stdout, "10\n")
            self.assertIn(sb.id, [s.id for s in await AsyncSandbox.list()])
            again = await AsyncSandbox.connect(sb.id)
            self.assertEqual((await again.run("print(len(a))")).stdout, "10\n")
            await again.close()

    async def test_errors(self):
        sb = AsyncSandbox(api_key="fvk_wrong")
        try:
            with self.assertRaises(forkvm.AuthenticationError):
                await sb.run("print(1)")
        finally:
            await sb.close()


if __name__ == "__main__":
    unittest.main()
