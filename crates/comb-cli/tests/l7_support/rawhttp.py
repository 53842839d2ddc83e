#!/usr/bin/python3
"""Raw-socket HTTP clients for the L7 robustness tests, and a tiny OTLP/HTTP collector.

  rawhttp.py send HOST PORT HEX          -> sends bytes.fromhex(HEX), prints {"status": first
                                            status line or "", "closed": bool} (5 s timeout)
  rawhttp.py slowloris HOST PORT CONNS SECS
        opens CONNS connections that start a request and then trickle one header byte per
        second; prints {"closed_by_server": n, "alive_after": n, "longest_s": x} after SECS
  rawhttp.py fuzz HOST PORT COUNT SEED   -> COUNT mutated HTTP/1.1 requests, one connection
                                            each; prints {"sent": n, "statuses": {...}}
  rawhttp.py collect PORT FILE           -> OTLP/HTTP receiver: appends each POST body to FILE
                                            (one JSON document per line)
"""
import json
import random
import socket
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


def exchange(host, port, data, timeout=5.0):
    s = socket.create_connection((host, port), timeout=timeout)
    s.settimeout(timeout)
    try:
        s.sendall(data)
    except OSError:
        pass
    got = b""
    closed = False
    try:
        while b"\r\n" not in got:
            chunk = s.recv(4096)
            if not chunk:
                closed = True
                break
            got += chunk
    except socket.timeout:
        pass
    except OSError:
        closed = True
    # Abortive close (RST): neither side keeps a TIME_WAIT. A later connection from the same
    # 4-tuple would otherwise meet the proxy's TIME_WAIT socket, which a SYN to a redirected
    # flow cannot reopen (docs/l7.md, known limits); this client tests the parser, not that.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    line = got.split(b"\r\n", 1)[0].decode("latin-1") if got else ""
    return line, closed


def send(host, port, hexdata):
    line, closed = exchange(host, int(port), bytes.fromhex(hexdata))
    print(json.dumps({"status": line, "closed": closed}))


def slowloris(host, port, conns, secs):
    socks = []
    for _ in range(conns):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: slow\r\nX-Slow: ")
        s.setblocking(False)
        socks.append([s, time.time(), None])
    start = time.time()
    while time.time() - start < secs:
        for entry in socks:
            s, opened, closed_at = entry
            if closed_at is not None:
                continue
            try:
                data = s.recv(4096)
                if data == b"":
                    entry[2] = time.time()
                    continue
                # A response (408/400) also means the server gave up on us.
                entry[2] = time.time()
                continue
            except BlockingIOError:
                pass
            except OSError:
                entry[2] = time.time()
                continue
            try:
                s.send(b"a")
            except OSError:
                entry[2] = time.time()
        time.sleep(1.0)
    closed = [e for e in socks if e[2] is not None]
    longest = max([e[2] - e[1] for e in closed], default=0.0)
    print(json.dumps({"closed_by_server": len(closed), "alive_after": len(socks) - len(closed),
                      "longest_s": round(longest, 2)}))
    for e in socks:
        e[0].close()


BASE = [
    b"GET / HTTP/1.1\r\nHost: web\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /a?b=c HTTP/1.1\r\nHost: web\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
]
JUNK = [b"\r\n", b"\x00", b":", b" ", b"\xff", b"HTTP/9.9", b"Content-Length: -1\r\n",
        b"Transfer-Encoding: chunked\r\n", b"Content-Length: 99999999999999999999\r\n",
        b"\r\n\r\n", b"zz\r\n", b"Host: a\r\nHost: b\r\n"]


def mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randint(0, 3)
        pos = rng.randint(0, len(data))
        if op == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randint(0, 255)
        elif op == 1:
            data[pos:pos] = rng.choice(JUNK)
        elif op == 2 and data:
            del data[pos:pos + rng.randint(1, 8)]
        else:
            data[pos:pos] = bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 16)))
    return bytes(data)


def fuzz(host, port, count, seed):
    rng = random.Random(seed)
    statuses = {}
    errors = {}
    for _ in range(count):
        data = mutate(rng, rng.choice(BASE))
        try:
            line, _closed = exchange(host, port, data, timeout=3.0)
        except OSError as e:
            # Connecting failed: the proxy did not accept (a failure the test reports).
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            continue
        code = line.split(" ")[1] if line.startswith("HTTP/") and " " in line else "none"
        statuses[code] = statuses.get(code, 0) + 1
    print(json.dumps({"sent": count, "statuses": statuses, "errors": errors}, sort_keys=True))


def collect(port, path):
    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            n = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(n)
            with open(path, "ab") as f:
                f.write(json.dumps({"path": self.path,
                                    "content_type": self.headers.get("Content-Type"),
                                    "body": json.loads(body)}).encode() + b"\n")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    srv = HTTPServer(("127.0.0.1", port), H)
    print("listening on %d" % port, flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "send":
        send(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "slowloris":
        slowloris(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
    elif cmd == "fuzz":
        fuzz(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    elif cmd == "collect":
        collect(int(sys.argv[2]), sys.argv[3])
