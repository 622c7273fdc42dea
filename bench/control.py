"""Control round trips: system.ping latency p50/p99 and requests/s over 1 and 32 connections.

Each connection sends one request and waits for its reply (no pipelining), as velodctl does.
The client is one asyncio process speaking raw msgpack-rpc. Prints JSON.
usage: python bench/control.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import msgpack
from harness import BenchDaemon, machine

from velod.control import protocol
from velod.engine.runtime.metrics import percentile


async def worker(path: str, deadline: float, latencies: list[float]) -> None:
    reader, writer = await asyncio.open_unix_connection(path)
    unpacker = msgpack.Unpacker(raw=False)
    msgid = 0
    while time.perf_counter() < deadline:
        msgid += 1
        start = time.perf_counter()
        writer.write(protocol.encode_request(msgid, "system.ping"))
        reply = None
        while reply is None:
            unpacker.feed(await reader.read(65536))
            for msg in unpacker:
                reply = msg
        latencies.append(time.perf_counter() - start)
    writer.close()


async def run(path: str, connections: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    await asyncio.gather(*(worker(path, deadline, latencies) for _ in range(connections)))
    elapsed = time.perf_counter() - start
    return {"connections": connections, "requests": len(latencies),
            "requests_per_s": round(len(latencies) / elapsed),
            "p50_us": round(percentile(latencies, 50) * 1e6, 1),
            "p99_us": round(percentile(latencies, 99) * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    with BenchDaemon() as daemon:
        asyncio.run(run(str(daemon.socket), 1, 0.5))  # warm-up
        results = [asyncio.run(run(str(daemon.socket), n, args.seconds)) for n in (1, 32)]
    print(json.dumps({"benchmark": "system.ping round trips", "results": results,
                      "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
