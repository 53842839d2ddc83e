#!/usr/bin/python3
"""gRPC echo server and client for the L7 lab tests, with Debian's python3-grpcio.

No generated code: messages are raw bytes (identity serializers), service comb.test.Echo with
Unary (answers b"echo:" + request, trailer x-echo-trailer; a request starting with b"fail"
ends with NOT_FOUND) and Stream (bidirectional: one reply per request, as they come).

  grpc_echo.py serve PORT
  grpc_echo.py call HOST:PORT [STREAM_MESSAGES]   -> one JSON line with both outcomes
"""
import json
import sys
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
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
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


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        call(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 5)
