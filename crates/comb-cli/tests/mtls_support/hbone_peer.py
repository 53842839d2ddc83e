#!/usr/bin/python3
"""An HBONE peer that is not Comb: HTTP/2 CONNECT over mutual TLS 1.3, written with
Python's ssl module and the python-hyper `h2` state machine, to test Comb's interoperability
with Istio ambient's ztunnel (which speaks exactly this) without sharing any of Comb's code.

server: listen (inside a pod's network namespace, as ztunnel's in-pod mode does) on :15008,
        require a client certificate from the roots, answer CONNECT host:port by connecting
        to it and relaying; one JSON line per stream on stdout (peer identity, authority).
client: open one TLS connection, check the server's SPIFFE identity, send CONNECT with
        ztunnel's headers, then write --send and print what comes back as one JSON line.
"""
import argparse
import asyncio
import json
import ssl
import sys

import h2.config
import h2.connection
import h2.events


def spiffe_ids(cert):
    return [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]


def context(server, a):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(a.cert, a.key)
    ctx.load_verify_locations(a.roots)
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server:
        ctx.check_hostname = False  # HBONE has no SNI/hostname: the SPIFFE ID is checked
    ctx.set_alpn_protocols(["h2"])
    return ctx


class Conn:
    """One HTTP/2 connection over an asyncio stream pair."""

    def __init__(self, reader, writer, client):
        self.r, self.w = reader, writer
        # h2 4.1 predates RFC 8441-style checks and wants :path/:scheme on every request;
        # a CONNECT has neither (RFC 9113 8.5), so header validation is off both ways.
        cfg = h2.config.H2Configuration(
            client_side=client,
            header_encoding="utf-8",
            validate_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.streams = {}  # stream id -> asyncio.Queue of bytes (b"" = end)
        self.windows = {}  # stream id -> asyncio.Event (window opened)

    async def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.w.write(data)
            await self.w.drain()

    async def send(self, sid, data, end=False):
        while data:
            n = min(len(data), self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if n <= 0:
                ev = self.windows.setdefault(sid, asyncio.Event())
                ev.clear()
                await ev.wait()
                continue
            self.h2.send_data(sid, data[:n])
            data = data[n:]
            await self.flush()
        if end:
            self.h2.end_stream(sid)
            await self.flush()

    async def pump(self, on_request=None, on_response=None):
        while True:
            data = await self.r.read(65536)
            if not data:
                for q in self.streams.values():
                    q.put_nowait(b"")
                return
            for ev in self.h2.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived) and on_request:
                    self.streams[ev.stream_id] = asyncio.Queue()
                    asyncio.ensure_future(on_request(ev.stream_id, dict(ev.headers)))
                elif isinstance(ev, h2.events.ResponseReceived) and on_response:
                    on_response(ev.stream_id, dict(ev.headers))
                elif isinstance(ev, h2.events.DataReceived):
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    q = self.streams.get(ev.stream_id)
                    if q is not None and ev.data:
                        q.put_nowait(ev.data)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    q = self.streams.get(ev.stream_id)
                    if q is not None:
                        q.put_nowait(b"")
                elif isinstance(ev, h2.events.WindowUpdated):
                    for e in self.windows.values():
                        e.set()
            await self.flush()


async def serve(a):
    ctx = context(True, a)
    host, port = a.listen.rsplit(":", 1)

    async def on_conn(reader, writer):
        peer = writer.get_extra_info("ssl_object").getpeercert()
        c = Conn(reader, writer, client=False)
        c.h2.initiate_connection()
        await c.flush()

        async def on_request(sid, headers):
            authority = headers.get(":authority", "")
            line = {"peer": spiffe_ids(peer), "authority": authority,
                    "source": writer.get_extra_info("peername")[0]}
            if headers.get(":method") != "CONNECT" or ":" not in authority:
                c.h2.send_headers(sid, [(":status", "400")], end_stream=True)
                await c.flush()
                print(json.dumps({**line, "status": 400}), flush=True)
                return
            h, p = authority.rsplit(":", 1)
            try:
                ur, uw = await asyncio.open_connection(h, int(p))
            except OSError:
                c.h2.send_headers(sid, [(":status", "503")], end_stream=True)
                await c.flush()
                print(json.dumps({**line, "status": 503}), flush=True)
                return
            c.h2.send_headers(sid, [(":status", "200")])
            await c.flush()
            print(json.dumps({**line, "status": 200}), flush=True)

            async def down():
                while True:
                    chunk = await c.streams[sid].get()
                    if not chunk:
                        uw.write_eof()
                        return
                    uw.write(chunk)
                    await uw.drain()

            async def up():
                while True:
                    chunk = await ur.read(65536)
                    if not chunk:
                        await c.send(sid, b"", end=True)
                        return
                    await c.send(sid, chunk)

            await asyncio.gather(down(), up())
            uw.close()

        try:
            await c.pump(on_request=on_request)
        except (ConnectionError, ssl.SSLError):
            pass

    server = await asyncio.start_server(on_conn, host, int(port), ssl=ctx)
    print(json.dumps({"listening": a.listen}), flush=True)
    async with server:
        await server.serve_forever()


async def client(a):
    ctx = context(False, a)
    host, port = a.connect.rsplit(":", 1)
    out = {}
    try:
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=None)
    except (ssl.SSLError, ConnectionError, OSError) as e:
        print(json.dumps({"error": f"handshake: {e}"}), flush=True)
        return 1
    tls = writer.get_extra_info("ssl_object")
    out["server_ids"] = spiffe_ids(tls.getpeercert())
    out["tls_version"] = tls.version()
    out["cipher"] = tls.cipher()[0]
    out["alpn"] = tls.selected_alpn_protocol()
    if a.expect_id and a.expect_id not in out["server_ids"]:
        print(json.dumps({**out, "error": "server identity mismatch"}), flush=True)
        return 1
    c = Conn(reader, writer, client=True)
    c.h2.initiate_connection()
    sid = c.h2.get_next_available_stream_id()
    c.streams[sid] = asyncio.Queue()
    status = asyncio.get_running_loop().create_future()
    c.h2.send_headers(sid, [
        (":method", "CONNECT"), (":authority", a.authority),
        ("baggage", "k8s.namespace.name=test,k8s.cluster.name=Kubernetes"),
        ("forwarded", f"for={a.forwarded_for}" if a.forwarded_for else "for=unknown"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ])
    await c.flush()
    pump = asyncio.ensure_future(c.pump(on_response=lambda s, h: status.done() or status.set_result(h)))
    try:
        headers = await asyncio.wait_for(status, 10)
    except asyncio.TimeoutError:
        print(json.dumps({**out, "error": "no response"}), flush=True)
        return 1
    out["status"] = int(headers.get(":status", "0"))
    if out["status"] == 200:
        await c.send(sid, a.send.encode(), end=True)
        got = b""
        while True:
            chunk = await asyncio.wait_for(c.streams[sid].get(), 10)
            if not chunk:
                break
            got += chunk
        out["received"] = got.decode(errors="replace")
    pump.cancel()
    writer.close()
    print(json.dumps(out), flush=True)
    return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["server", "client"])
    p.add_argument("--cert", required=True, help="PEM chain, leaf first")
    p.add_argument("--key", required=True)
    p.add_argument("--roots", required=True)
    p.add_argument("--listen", default="0.0.0.0:15008")
    p.add_argument("--connect")
    p.add_argument("--authority")
    p.add_argument("--expect-id")
    p.add_argument("--forwarded-for")
    p.add_argument("--send", default="")
    a = p.parse_args()
    if a.mode == "server":
        asyncio.run(serve(a))
        return 0
    return asyncio.run(client(a))


if __name__ == "__main__":
    sys.exit(main())
