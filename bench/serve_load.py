"""N concurrent streaming HTTP clients against a real velod for T seconds; prints JSON.

    .venv/bin/python bench/serve_load.py [--clients 64] [--duration 60] [--max-tokens 64]
                                         [--model GGUF] [--no-in-process]

Starts velod (localhost only, a temporary directory), loads the model (default: Gemma 3 270M
from the test asset cache), warms it up, then runs ``--clients`` clients, each streaming
``/v1/completions`` requests back to back (greedy, ``ignore_eos``: every request generates
exactly ``--max-tokens``) until ``--duration`` has passed; bounded in time and in requests.
RSS "before" is taken after a warm-up at the full concurrency.
Meanwhile a control-socket client pings velod (``system.ping``, as ``velodctl ping``) every
50 ms. Reports requests/s, aggregate tokens/s, time to first token p50/p99, errors, velod's
RSS before and after, ping latency. Then ``--rounds`` pairs of rounds, each ``--clients``
requests at once: over HTTP, then the same engine with the same model driven in this process
without HTTP; each pair gives a ratio of aggregate tokens/s (the machine's load moves between
rounds, not within a pair as much).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import BenchDaemon, machine
from tests.fakes.fake_ollama import free_port
from velod.control.client import Client

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
MAX_REQUESTS_PER_CLIENT = 10_000


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Pinger(threading.Thread):
    """Pings velod's control socket every ``interval`` seconds until stopped."""

    def __init__(self, socket: str, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.socket, self.interval = socket, interval
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with Client.connect(self.socket, timeout=10) as client:
            while not self.stop.is_set():
                start = time.perf_counter()
                client.call("system.ping")
                self.latencies.append(time.perf_counter() - start)
                self.stop.wait(self.interval)


async def one_client(session: Any, url: str, model: str, max_tokens: int, deadline: float,
                     stats: dict[str, Any], once: bool = False) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    for _ in range(1 if once else MAX_REQUESTS_PER_CLIENT):
        if time.monotonic() >= deadline and not once:
            return
        start = time.monotonic()
        first = None
        tokens = 0
        try:
            async with session.post(url, json=body) as response:
                if response.status != 200:
                    stats["errors"].append(f"{response.status}: {await response.text()}")
                    await asyncio.sleep(0.05)
                    continue
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("error"):
                        stats["errors"].append(chunk["error"].get("message"))
                        break
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        tokens += 1
                        if first is None:
                            first = time.monotonic() - start
        except Exception as exc:  # counted, not fatal: the report says how many
            stats["errors"].append(f"{type(exc).__name__}: {exc}")
            continue
        stats["requests"] += 1
        stats["chunks"] += tokens
        if first is not None:
            stats["ttft"].append(first)
        stats["done_at"] = time.monotonic()


async def http_load(url: str, model: str, clients: int, duration: float, max_tokens: int,
                    once: bool = False) -> dict[str, Any]:
    import aiohttp

    stats: dict[str, Any] = {"requests": 0, "chunks": 0, "ttft": [], "errors": []}
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=duration + 300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        await asyncio.gather(*(one_client(session, url, model, max_tokens, start + duration,
                                          stats, once)
                               for _ in range(clients)))
        elapsed = time.monotonic() - start
    return {"elapsed_s": elapsed, **stats}


class InProcess:
    """The same model and engine settings, driven in this process without HTTP."""

    def __init__(self, model: str, clients: int, kv_cache: int) -> None:
        from velod.config import EngineConfig, MemoryAmount
        from velod.engine.runtime.engine import build_engine
        from velod.engine.served import load_served
        from velod.engine.settings import EngineSettings

        settings = EngineSettings.from_config(EngineConfig(
            model=model, dtype="float32", device="cpu", kv_cache=MemoryAmount(bytes=kv_cache),
            max_batch_size=max(clients, 1)))
        served = load_served(settings)
        self.engine = build_engine(settings, model=served.model)
        self.prompt = served.tokenizer.encode(PROMPT)

    def round(self, clients: int, max_tokens: int) -> dict[str, Any]:
        """``clients`` requests at once, greedy, each exactly ``max_tokens`` long."""
        from velod.engine.models.sampling import SamplingParams

        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
        start = time.monotonic()
        for _ in range(clients):
            self.engine.submit(self.prompt, max_tokens, sampling=params)
        generated = 0
        while self.engine.has_work:
            generated += len(self.engine.step().sampled)
        elapsed = time.monotonic() - start
        return {"elapsed_s": elapsed, "tokens": generated, "tokens_per_s": generated / elapsed}


async def http_round(url: str, model: str, clients: int, max_tokens: int) -> dict[str, Any]:
    """``clients`` streaming requests at once, each one request (the same work as a round of
    :class:`InProcess`)."""
    load = await http_load(url, model, clients, 0.0, max_tokens, once=True)
    tokens = load["requests"] * max_tokens
    return {"elapsed_s": load["elapsed_s"], "tokens": tokens, "errors": len(load["errors"]),
            "tokens_per_s": tokens / load["elapsed_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", help="a GGUF (default: Gemma 3 270M from the asset cache)")
    parser.add_argument("--kv-cache", default="256MiB")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating HTTP / in-process rounds for the ratio")
    parser.add_argument("--no-in-process", action="store_true")
    args = parser.parse_args()
    if args.clients > 256 or args.duration > 600:
        parser.error("bounded: at most 256 clients and 600 s")
    model = args.model
    if model is None:
        from tests import assets

        model = str(assets.gemma3_gguf())
    port = free_port()
    config = {"engine": {"dtype": "float32", "device": "cpu", "kv_cache": args.kv_cache,
                         "max_batch_size": max(args.clients, 1), "max_tokens_per_step": 2048},
              "http": {"listen": f"127.0.0.1:{port}", "request_timeout": "30m",
                       "max_requests": 1024}}
    url = f"http://127.0.0.1:{port}/v1/completions"
    load_start = os.getloadavg()[0]  # the box is shared: say how busy it was
    own = None if args.no_in_process else InProcess(model, args.clients, _bytes(args.kv_cache))
    rounds: list[dict[str, Any]] = []
    with BenchDaemon(config) as daemon:
        pid = daemon.proc.pid
        with Client.connect(str(daemon.socket), timeout=600) as client:
            client.call("engine.load", {"model": model})
        # Warm-up at the full concurrency: the pool and the batch-sized buffers exist before
        # "RSS before", so the RSS comparison shows what the load left behind.
        asyncio.run(http_load(url, model, args.clients, 0.1, 4))
        time.sleep(1.0)
        rss_before = rss_bytes(pid)
        pinger = Pinger(str(daemon.socket))
        pinger.start()
        load = asyncio.run(http_load(url, model, args.clients, args.duration,
                                     args.max_tokens))
        pinger.stop.set()
        pinger.join(10)
        time.sleep(2.0)  # let the last sequences' buffers go
        rss_after = rss_bytes(pid)
        if own is not None:
            own.round(min(args.clients, 4), 4)  # warm-up
            # The shared machine's load moves by the minute: HTTP and in-process rounds
            # alternate, and each pair gives a ratio.
            for _ in range(args.rounds):
                via_http = asyncio.run(http_round(url, model, args.clients, args.max_tokens))
                direct = own.round(args.clients, args.max_tokens)
                rounds.append({"http": via_http, "in_process": direct,
                               "ratio": via_http["tokens_per_s"] / direct["tokens_per_s"],
                               "load_average_1m": os.getloadavg()[0]})
    tokens = load["requests"] * args.max_tokens
    http = {"clients": args.clients, "duration_s": load["elapsed_s"],
            "requests": load["requests"], "requests_per_s": load["requests"] / load["elapsed_s"],
            "tokens": tokens, "tokens_per_s": tokens / load["elapsed_s"],
            "streamed_chunks": load["chunks"],
            "ttft_s": {"p50": percentile(load["ttft"], 0.5),
                       "p99": percentile(load["ttft"], 0.99)},
            "errors": len(load["errors"]), "error_examples": load["errors"][:3],
            "rss_before_bytes": rss_before, "rss_after_bytes": rss_after,
            "rss_after_ratio": rss_after / rss_before if rss_before else None,
            "ping_s": {"count": len(pinger.latencies),
                       "p50": percentile(pinger.latencies, 0.5),
                       "p99": percentile(pinger.latencies, 0.99),
                       "max": max(pinger.latencies, default=None),
                       "mean": statistics.fmean(pinger.latencies) if pinger.latencies
                       else None}}
    result: dict[str, Any] = {"bench": "serve_load", "machine": machine(), "model": model,
                              "max_tokens": args.max_tokens, "http": http,
                              "load_average_1m": {"start": load_start,
                                                  "end": os.getloadavg()[0]}}
    if rounds:
        result["rounds"] = rounds
        result["http_over_in_process"] = {
            "median": statistics.median(r["ratio"] for r in rounds),
            "each": [r["ratio"] for r in rounds]}
    print(json.dumps(result, indent=2))


def _bytes(text: str) -> int:
    from velod.units import parse_size

    return parse_size(text)


if __name__ == "__main__":
    main()
