//! The event loop and sockets in forks on real KVM: asyncio servers and clients, threaded
//! socket servers, unix sockets passing descriptors, signals in the loop, name resolution
//! without a network, and a server waiting for a client that can never come.

mod common;

use common::{run, stdout};

use forkvm_engine::{Engine, ErrorKind};

fn engine() -> Option<&'static Engine> {
    common::engine("event-loop-templates", 2)
}

#[test]
fn asyncio_gathers_sleeps_and_serves_tcp_over_loopback() {
    let Some(engine) = engine() else { return };
    let code = r#"
import asyncio, time
async def echo(reader, writer):
    while data := await reader.readline():
        writer.write(data.upper())
        await writer.drain()
    writer.close()
async def client(port, n):
    reader, writer = await asyncio.open_connection('127.0.0.1', port)
    lines = []
    for i in range(3):
        writer.write(f'client {n} line {i}\n'.encode())
        await writer.drain()
        lines.append((await reader.readline()).decode().strip())
    writer.close()
    await writer.wait_closed()
    return lines
async def main():
    start = time.monotonic()
    slept = await asyncio.gather(*(asyncio.sleep(0.05 * i, result=i) for i in range(5)))
    elapsed = time.monotonic() - start
    print(slept, 0.2 <= elapsed < 1.0)
    server = await asyncio.start_server(echo, '127.0.0.1', 0)
    port = server.sockets[0].getsockname()[1]
    results = await asyncio.gather(*(client(port, n) for n in range(10)))
    print(len(results), results[7][2])
    server.close()
    await server.wait_closed()
    try:
        await asyncio.wait_for(asyncio.sleep(10), 0.05)
    except asyncio.TimeoutError:
        print('timed out')
asyncio.run(main())
"#;
    assert_eq!(
        stdout(engine, code),
        "[0, 1, 2, 3, 4] True\n10 CLIENT 7 LINE 2\ntimed out\n"
    );
}

#[test]
fn a_threaded_http_server_answers_urllib() {
    let Some(engine) = engine() else { return };
    let code = r#"
import http.server, threading, urllib.request, json
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({'path': self.path}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
url = f'http://localhost:{server.server_port}'
for path in ['/a', '/b?x=1']:
    with urllib.request.urlopen(url + path, timeout=10) as response:
        print(response.status, json.load(response)['path'])
server.shutdown()
"#;
    assert_eq!(stdout(engine, code), "200 /a\n200 /b?x=1\n");
}

#[test]
fn unix_sockets_serve_threads_and_pass_descriptors() {
    let Some(engine) = engine() else { return };
    let code = r#"
import os, socket, threading
path = '/tmp/server.sock'
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen()
def serve():
    conn, _ = server.accept()
    with conn:
        msg, fds, _, _ = socket.recv_fds(conn, 100, 4)
        with open(fds[0]) as f:
            conn.sendall(msg + b' ' + f.read().strip().encode())
threading.Thread(target=serve).start()
with open('/tmp/secret.txt', 'w') as f:
    f.write('forty-two\n')
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.connect(path)
with open('/tmp/secret.txt') as f:
    socket.send_fds(client, [b'read'], [f.fileno()])
print(client.recv(100).decode())
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
a.send(b'one'); a.send(b'two')
print(b.recv(10), b.recv(10))
"#;
    assert_eq!(stdout(engine, code), "read forty-two\nb'one' b'two'\n");
}

#[test]
fn signals_reach_the_event_loop() {
    let Some(engine) = engine() else { return };
    let code = r#"
import asyncio, os, signal
async def main():
    loop = asyncio.get_running_loop()
    got = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, got.set)
    loop.call_later(0.05, os.kill, os.getpid(), signal.SIGUSR1)
    await asyncio.wait_for(got.wait(), 5)
    print('signalled')
asyncio.run(main())
import selectors, socket
sel = selectors.DefaultSelector()
a, b = socket.socketpair()
sel.register(b, selectors.EVENT_READ, 'b')
print(type(sel).__name__, sel.select(0))
a.send(b'x')
print([key.data for key, _ in sel.select(1)])
"#;
    assert_eq!(stdout(engine, code), "signalled\nEpollSelector []\n['b']\n");
}

#[test]
fn names_resolve_locally_and_the_outside_is_unreachable() {
    let Some(engine) = engine() else { return };
    let code = r#"
import socket, time
print(socket.gethostname(), socket.gethostbyname('localhost'))
print(sorted({info[4][0] for info in socket.getaddrinfo('localhost', 80)}))
start = time.monotonic()
try:
    socket.getaddrinfo('example.com', 443)
except socket.gaierror:
    print('no resolver', time.monotonic() - start < 3)
try:
    socket.create_connection(('93.184.216.34', 80), timeout=5)
except OSError as e:
    print(e.errno == 101)
"#;
    assert_eq!(
        stdout(engine, code),
        "forkvm 127.0.0.1\n['127.0.0.1', '::1']\nno resolver True\nTrue\n"
    );
}

#[test]
fn a_server_no_client_can_reach_is_stopped_not_hung() {
    let Some(engine) = engine() else { return };
    let out = run(
        engine,
        "import socket\ns = socket.create_server(('127.0.0.1', 0))\nprint('listening', flush=True)\ns.accept()",
    );
    assert_eq!(out.error.kind, ErrorKind::Timeout);
    assert!(
        out.error.message.contains("wait forever"),
        "{}",
        out.error.message
    );
    assert_eq!(out.stdout, b"listening\n");
    // The pool is fine afterwards.
    assert_eq!(stdout(engine, "print(1)"), "1\n");
}
