#!/usr/bin/python3
"""WebSocket echo server and client for the L7 lab tests, with Debian's python3-websockets.

  ws_echo.py serve PORT
  ws_echo.py call ws://HOST:PORT/PATH MESSAGES SIZE   -> one JSON line
  ws_echo.py hold ws://HOST:PORT/PATH CONNS STOP_FILE -> CONNS WebSockets, each sending a
      numbered message every 100 ms and checking its echo until STOP_FILE exists, then a
      clean close. Prints "open N" once all are up, then one JSON line (echoed, failures).
"""
import asyncio
import json
import os
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


async def hold(url, n, stop_file):
    socks = [await websockets.connect(url, max_size=None, compression=None) for _ in range(n)]
    print("open %d" % n, flush=True)

    async def one(k, ws):
        echoed, failures, i = 0, [], 0
        try:
            while not os.path.exists(stop_file):
                msg = "%d:%d:" % (k, i) + "y" * 512
                await ws.send(msg)
                r = await ws.recv()
                if r != msg:
                    failures.append("wrong echo on %d" % k)
                    break
                echoed += 1
                i += 1
                await asyncio.sleep(0.1)
            await ws.close()
            if ws.close_code != 1000:
                failures.append("close code %s on %d" % (ws.close_code, k))
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failures.append("%s on %d: %s" % (type(e).__name__, k, e))
        return echoed, failures

    results = await asyncio.gather(*(one(k, ws) for k, ws in enumerate(socks)))
    failures = [f for r in results for f in r[1]]
    print(json.dumps({"conns": n, "echoed": sum(r[0] for r in results),
                      "failures": failures[:10], "failed": len(failures)}, sort_keys=True))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(serve(int(sys.argv[2])))
    elif sys.argv[1] == "hold":
        asyncio.run(hold(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
    else:
        asyncio.run(call(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
