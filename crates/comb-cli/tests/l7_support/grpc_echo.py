#!/usr/bin/python3
"""gRPC echo server and client for the L7 lab tests, with Debian's python3-grpcio.

No generated code: messages are raw bytes (identity serializers), service comb.test.Echo with
Unary (answers b"echo:" + request, trailer x-echo-trailer; a request starting with b"fail"
ends with NOT_FOUND) and Stream (bidirectional: one reply per request, as they come).

  grpc_echo.py serve PORT
  grpc_echo.py call HOST:PORT [STREAM_MESSAGES]   -> one JSON line with both outcomes
  grpc_echo.py hold HOST:PORT STREAMS STOP_FILE    -> STREAMS bidirectional streams on one
      channel, each sending a numbered message every 100 ms and checking its echo, until
      STOP_FILE exists; then each ends cleanly. Prints "open N" once all are up, then one
      JSON line: streams, messages echoed, failures (a wrong echo, an error, a missing end).
"""
import json
import os
import queue
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "comb.test.Echo"


def serve(port):
    def unary(req, ctx):
        if req.startswith(b"fail"):
            ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        ctx.set_trailing_metadata((("x-echo-trailer", "unary-done"),))
        return b"echo:" + req

    def stream(requests, ctx):
        for m in requests:
            yield b"echo:" + m
        ctx.set_trailing_metadata((("x-echo-trailer", "stream-done"),))

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    # A bidirectional stream holds a worker for its whole life: room for the upgrade
    # test's 100 concurrent streams.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=128))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port("0.0.0.0:%d" % port)
    server.start()
    print("listening on %d" % port, flush=True)
    server.wait_for_termination()


def outcome(fn):
    try:
        return fn()
    except grpc.RpcError as e:
        return {"code": e.code().name, "details": e.details()}


def call(target, n):
    ch = grpc.insecure_channel(target)
    unary = ch.unary_unary("/%s/Unary" % SERVICE)
    stream = ch.stream_stream("/%s/Stream" % SERVICE)

    def do_unary():
        resp, c = unary.with_call(b"hello", timeout=10)
        return {"code": "OK", "reply": resp.decode(), "trailers": dict(c.trailing_metadata())}

    def do_fail():
        unary(b"fail-me", timeout=10)
        return {"code": "OK"}

    def do_stream():
        it = stream(iter([b"m%d" % i for i in range(n)]), timeout=10)
        replies = [r.decode() for r in it]
        return {"code": "OK", "replies": replies, "trailers": dict(it.trailing_metadata())}

    out = {"unary": outcome(do_unary), "fail": outcome(do_fail), "stream": outcome(do_stream)}
    print(json.dumps(out, sort_keys=True))


def hold(target, n, stop_file):
    ch = grpc.insecure_channel(target)
    stream = ch.stream_stream("/%s/Stream" % SERVICE)
    results = [None] * n
    up = threading.Barrier(n + 1)

    def one(k):
        q = queue.Queue()
        sent = [0]

        def requests():
            while True:
                m = q.get()
                if m is None:
                    return
                yield m

        echoed, failures = 0, []
        try:
            q.put(b"%d:0" % k)
            sent[0] = 1
            it = stream(requests())
            first = next(it)
            if first != b"echo:%d:0" % k:
                failures.append("first echo %r" % first)
            echoed += 1
            up.wait()
            i = 1
            while not os.path.exists(stop_file):
                msg = b"%d:%d" % (k, i)
                q.put(msg)
                r = next(it)
                if r != b"echo:" + msg:
                    failures.append("echo %r for %r" % (r, msg))
                    break
                echoed += 1
                i += 1
                time.sleep(0.1)
            q.put(None)
            rest = list(it)
            if rest:
                failures.append("unexpected replies %r" % rest[:3])
            if it.code() != grpc.StatusCode.OK:
                failures.append("status %s" % it.code())
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failures.append("%s: %s" % (type(e).__name__, e))
            try:
                up.abort()
            except Exception:  # noqa: BLE001
                pass
        results[k] = (echoed, failures)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    try:
        up.wait()
        print("open %d" % n, flush=True)
    except threading.BrokenBarrierError:
        print("open failed", flush=True)
    for t in threads:
        t.join()
    failures = [f for r in results for f in (r[1] if r else ["no result"])]
    print(json.dumps({"streams": n, "echoed": sum(r[0] for r in results if r),
                      "failures": failures[:10], "failed": len(failures)}, sort_keys=True))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    elif sys.argv[1] == "hold":
        hold(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        call(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 5)
