#!/usr/bin/python3
"""WebSocket echo server and client for the L7 lab tests, with Debian's python3-websockets.

  ws_echo.py serve PORT
  ws_echo.py call ws://HOST:PORT/PATH MESSAGES SIZE   -> one JSON line
"""
import asyncio
import json
import sys

import websockets


async def echo(ws, path=None):
    async for m in ws:
        await ws.send(m)


async def serve(port):
    async with websockets.serve(echo, "0.0.0.0", port, max_size=None):
        print("listening on %d" % port, flush=True)
        await asyncio.Future()


async def call(url, n, size):
    ok = 0
    # No permessage-deflate: frames keep their size, so tests can count spliced bytes.
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        for i in range(n):
            msg = ("%d:" % i) + "x" * size
            await ws.send(msg)
            if await ws.recv() == msg:
                ok += 1
        await ws.send(b"\x00binary\xff")
        binary_ok = await ws.recv() == b"\x00binary\xff"
    print(json.dumps({"messages": n, "echoed": ok, "binary": binary_ok}, sort_keys=True))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(serve(int(sys.argv[2])))
    else:
        asyncio.run(call(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
