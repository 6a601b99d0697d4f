"""forkvm's in-sandbox agent.

A template runs this file once: it imports the template's modules (argv[1:]), freezes the
heap, and reads its first request from the control channel (descriptor 3). That read parks
the sandbox, and the VMM snapshots it there. Every fork resumes inside that read, with a
request.

Frames on the control channel are a 4-byte little-endian length followed by a MessagePack
map, in both directions. Code output goes through descriptors 1 and 2, which the VMM
captures, so C extensions' output is captured too. The reply frame carries no output, only
how the code ended. Nothing in either stream is a marker.
"""

import gc
import os
import struct
import sys
import traceback
import types

import msgpack

CONTROL_FD = 3
PROTOCOL_VERSION = 1
# Largest request accepted (the VMM enforces its own, smaller, limit first).
MAX_FRAME = 1 << 30


def read_exact(n, prefix=b""):
    """Reads until `n` bytes are buffered; EOF means the VMM is done with us."""
    chunks = [prefix]
    have = len(prefix)
    while have < n:
        chunk = os.read(CONTROL_FD, max(n - have, 1 << 16))
        if not chunk:
            os._exit(0)
        chunks.append(chunk)
        have += len(chunk)
    data = b"".join(chunks)
    return data[:n], data[n:]


def read_frame():
    # One large read usually returns the whole frame: one exit to the VMM per request.
    head, rest = read_exact(4, os.read(CONTROL_FD, 1 << 20))
    (length,) = struct.unpack("<I", head)
    if length > MAX_FRAME:
        raise ValueError(f"request frame of {length} bytes is too large")
    body, _ = read_exact(length, rest)
    return msgpack.unpackb(body, raw=False)


def write_frame(message):
    body = msgpack.packb(message, use_bin_type=True)
    data = memoryview(struct.pack("<I", len(body)) + body)
    while data:
        written = os.write(CONTROL_FD, data)
        data = data[written:]


def reseed():
    """Gives this fork its own userspace random state: every generator seeded before the
    snapshot would otherwise repeat the same sequence in every fork."""
    import random

    # One read of host entropy for every generator: each syscall is an exit to the VMM.
    seed = os.urandom(68)
    random.seed(seed[:32])
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(seed[32:36], "little"))
    ssl = sys.modules.get("ssl")
    if ssl is not None:
        # OpenSSL's DRBGs were seeded before the fork and do not see it (the pid is the
        # same): mixing fresh entropy into the primary makes them all reseed.
        ssl.RAND_add(seed[36:], 32.0)
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        # Its name generator is a random.Random created on first use.
        tempfile._name_sequence = None


def exit_status(code):
    """The exit status `python3` gives `sys.exit(code)`: None is 0, an int is taken as C's
    exit() takes it (its low 8 bits; 255 when it does not fit a C long), anything else is
    printed to stderr and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF if -(2**63) <= code < 2**63 else 255
    print(code, file=sys.stderr)
    return 1


def run_code(code, main):
    """Runs `code` in module `main` as `python3 -c` runs it: as `__main__` in sys.modules
    (so pickle, dataclasses and typing find what it defines), with sys.argv ['-c']. Returns
    the exit status and the type name of an uncaught exception (None if there was none)."""
    sys.modules["__main__"] = main
    sys.argv[:] = ["-c"]
    try:
        compiled = compile(code, "<string>", "exec")
        exec(compiled, main.__dict__)
        return 0, None
    except SystemExit as stop:
        return exit_status(stop.code), None
    except BaseException as error:  # noqa: B902 - the user's code may raise anything
        # Print the traceback as python3 would: without this frame of the agent.
        # A MemoryError may leave too little memory to format it: report it anyway.
        try:
            traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        except MemoryError:
            os.write(2, b"MemoryError\n")
        return 1, type(error).__name__


# Shells a request may name as its language; the code runs as `SHELL -c CODE`.
SHELLS = {"bash": "/bin/bash", "sh": "/bin/sh"}


def run_shell(code, shell):
    """Runs `code` with `shell` on the request's streams (descriptors 0-2, inherited) and
    returns its exit status as a shell reports a child's: 128 + signal when one ended it."""
    try:
        pid = os.posix_spawn(SHELLS[shell], [shell, "-c", code], os.environ)
    except OSError as error:
        os.write(2, f"forkvm: cannot start {shell}: {error}\n".encode())
        return 127, type(error).__name__
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    return (128 - code if code < 0 else code), None


# The `__main__` of a session: what one request defines, the next one sees.
SESSION_MAIN = types.ModuleType("__main__")
# This agent's own module, `__main__` again between requests.
AGENT_MAIN = sys.modules["__main__"]


def serve(request):
    # Not timed here: the VMM measures the exec, and a clock read is an exit (no vDSO).
    # Only a new fork reseeds: in a session, a seed the code set holds for its next request.
    if request.get("fresh_fork", True):
        reseed()
    os.environ.update(request.get("env") or {})
    cwd = request.get("cwd")
    if cwd:
        os.makedirs(cwd, exist_ok=True)
        os.chdir(cwd)
    if request.get("keep_namespace"):
        main = SESSION_MAIN
    else:
        main = types.ModuleType("__main__")
    language = request.get("language") or "python"
    if language in SHELLS:
        exit_code, exception = run_shell(request.get("code", b""), language)
    else:
        exit_code, exception = run_code(request.get("code", b""), main)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a broken stream must not lose the reply
            pass
    if not request.get("keep_namespace"):
        sys.modules["__main__"] = AGENT_MAIN
        if exception == "MemoryError":
            # What the code's globals hold may leave too little memory for the reply.
            main.__dict__.clear()
    return {
        "v": PROTOCOL_VERSION,
        "exit_code": exit_code,
        "exception": exception,
    }


# Standard-library modules most code imports: loaded before the snapshot, an `import` of
# them in a request costs a dictionary lookup instead of file reads and compilation.
PRELOAD = (
    "json", "re", "math", "random", "datetime", "collections", "itertools", "functools",
    "decimal", "fractions", "statistics", "string", "textwrap", "hashlib", "base64",
    "struct", "io", "csv", "time", "traceback", "dataclasses", "enum", "typing", "pathlib",
    "tempfile", "copy", "heapq", "bisect", "operator", "subprocess", "shlex", "shutil",
)


# A template's own warm-up code (a spec's `warmup`), run once before the snapshot.
WARMUP = "/opt/forkvm/warmup.py"


def main():
    for module in PRELOAD + tuple(sys.argv[1:]):
        __import__(module)
    if os.path.exists(WARMUP):
        import runpy

        runpy.run_path(WARMUP, run_name="__forkvm_warmup__")
    # Move everything imported so far out of the collector's reach: forks then never touch
    # (and so never copy) those pages while collecting garbage.
    gc.collect()
    gc.freeze()
    while True:
        request = read_frame()
        write_frame(serve(request))


main()
