#!/usr/bin/python3
"""HTTP latency of `forkvm serve`, two binaries side by side in one run (alternating, two
rounds each, so drift hits both): /v1/exec of print(1+1) (400 per round after 50 warm-up)
and a session's exec of `x += 1` (300 per round after 20). JSON on stdout.

    scripts/bench-serve.py BEFORE_BINARY AFTER_BINARY
"""
import http.client, json, subprocess, sys, time, statistics, os, signal
def start(binary, port):
    env = dict(os.environ)
    p = subprocess.Popen([binary, "serve", "--no-auth", "--listen", f"127.0.0.1:{port}", "--rate", "100000", "--burst", "100000"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    line = p.stdout.readline().decode()
    assert "listening" in line, line
    return p
def run(port, path, body, n):
    c = http.client.HTTPConnection("127.0.0.1", port)
    lat = []
    for i in range(n):
        t = time.perf_counter()
        c.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        r = c.getresponse(); d = r.read()
        lat.append((time.perf_counter() - t) * 1000)
        assert r.status == 200, d
    return lat
def pct(l, q):
    l = sorted(l); return l[min(len(l)-1, int(q*len(l)))]
out = {}
if len(sys.argv) != 3:
    sys.exit(__doc__)
for rnd in range(2):
    for name, binary in [("before", sys.argv[1]), ("after", sys.argv[2])]:
        p = start(binary, 18090)
        time.sleep(3)
        run(18090, "/v1/exec", {"code": "print(1+1)"}, 50)
        ex = run(18090, "/v1/exec", {"code": "print(1+1)"}, 400)
        c = http.client.HTTPConnection("127.0.0.1", 18090)
        c.request("POST", "/v1/sandboxes", "{}", {"content-type": "application/json"}); sid = json.loads(c.getresponse().read())["id"]
        run(18090, f"/v1/sandboxes/{sid}/exec", {"code": "x=1"}, 20)
        se = run(18090, f"/v1/sandboxes/{sid}/exec", {"code": "x+=1"}, 300)
        p.send_signal(signal.SIGTERM); p.wait()
        for k, l in [("exec", ex), ("session_exec", se)]:
            out.setdefault(name, {}).setdefault(k, []).extend(l)
res = {n: {k: {"p50_ms": round(statistics.median(l), 3), "p90_ms": round(pct(l, .9), 3), "p99_ms": round(pct(l, .99), 3), "n": len(l)} for k, l in d.items()} for n, d in out.items()}
print(json.dumps(res, indent=1))
