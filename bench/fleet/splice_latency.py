"""The router's added latency per round trip: a loopback ping-pong straight to an echo server vs
through :func:`pipesd.fleet.router.splice` (the fleet router's byte copy), same process layout
as a fleet on one node (router and replica in other processes than the edge).

    python bench/fleet/splice_latency.py [--n 2000] [--size 64]

Prints p50/p90 round-trip times and the difference (docs/fleet.md quotes it).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import time


def _echo(q) -> None:
    async def main():
        async def on(r, w):
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
        srv = await asyncio.start_server(on, "127.0.0.1", 0)
        q.put(srv.sockets[0].getsockname()[1])
        await asyncio.Event().wait()
    asyncio.run(main())


def _router(q, up_port: int) -> None:
    from pipesd.fleet.router import splice

    async def main():
        async def on(r, w):
            ur, uw = await asyncio.open_connection("127.0.0.1", up_port)
            await splice(r, w, ur, uw)
            uw.close()
            w.close()
        srv = await asyncio.start_server(on, "127.0.0.1", 0)
        q.put(srv.sockets[0].getsockname()[1])
        await asyncio.Event().wait()
    asyncio.run(main())


def _rtts(port: int, n: int, size: int) -> list:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * size
    out = []
    for i in range(n + 100):
        t = time.perf_counter()
        s.sendall(msg)
        got = 0
        while got < size:
            got += len(s.recv(1 << 16))
        if i >= 100:  # warm-up left out
            out.append(time.perf_counter() - t)
    s.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64, help="bytes per message")
    a = ap.parse_args()
    q = mp.Queue()
    echo = mp.Process(target=_echo, args=(q,), daemon=True)
    echo.start()
    eport = q.get(timeout=30)
    router = mp.Process(target=_router, args=(q, eport), daemon=True)
    router.start()
    rport = q.get(timeout=30)
    res = {}
    for name, port in (("direct", eport), ("router", rport)):
        r = sorted(_rtts(port, a.n, a.size))
        res[name] = {"p50_us": 1e6 * statistics.median(r), "p90_us": 1e6 * r[int(0.9 * len(r))]}
    res["added_p50_us"] = res["router"]["p50_us"] - res["direct"]["p50_us"]
    res["settings"] = {"n": a.n, "size": a.size}
    print(json.dumps(res, indent=1))
    for p in (echo, router):
        p.terminate()
        p.join(5)


if __name__ == "__main__":
    main()
