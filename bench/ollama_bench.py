"""velod's Ollama benchmark end to end, against the fake Ollama (and a real one if reachable).

MEASURED AGAINST THE FAKE: the fake Ollama (tests/fakes/fake_ollama.py) sleeps a configured
time per token and reports its own eval_count/eval_duration, so the tok/s velod reports from
those counters can be checked against the configured speed, and the client side (time
between streamed tokens) shows what velod's streaming client costs per token. The same
requests are also timed with a bare aiohttp client in this script, side by side, so that the
fake's own sleep overshoot is not charged to velod. Nothing here says how fast a real
Ollama is.

    .venv/bin/python bench/ollama_bench.py [--gen 64] [--repeat 5]
        [--ollama-url http://127.0.0.1:11434 --model llama3.2:3b]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

from harness import ROOT, BenchDaemon, machine

from tests.fakes.fake_ollama import free_port

FAKE = ROOT / "tests" / "fakes" / "fake_ollama.py"
MODEL = "llama3.2:3b"
FLASH_SPEEDUP = 1.25  # the fake's default: flash attention is on with a GPU


def start_fake(token_delay: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "FAKE_OLLAMA_VRAM": "24GiB", "FAKE_OLLAMA_TOKEN_DELAY": str(token_delay),
           "OLLAMA_HOST": f"127.0.0.1:{port}"}
    proc = subprocess.Popen([sys.executable, str(FAKE)], env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if reachable(url):
            return proc, url
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the fake Ollama did not start")


def reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/api/version", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


async def bare_client(url: str, model: str, gen: int, requests: int) -> list[float]:
    """Seconds per streamed token (first to last token) seen by a plain aiohttp client."""
    import aiohttp

    out = []
    async with aiohttp.ClientSession() as session:
        for i in range(requests + 1):
            body = {"model": model, "prompt": f"[bare {i}] hello there", "stream": True,
                    "options": {"num_predict": gen}}
            first = last = None
            count = 0
            async with session.post(url + "/api/generate", json=body) as resp:
                async for line in resp.content:
                    chunk = json.loads(line)
                    if chunk.get("response"):
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        count += 1
            if i and first and last and count > 1:  # the first request is the warm-up
                out.append((last - first) / (count - 1))
    return out


def velod_per_token(result: dict[str, Any]) -> list[float]:
    """Client-side seconds per token from velod's samples: (total - ttft) / (tokens - 1)."""
    out = []
    for case in result["cases"]:
        for run in case["samples"]:
            for s in run:
                if s["ttft_s"] is not None and s["eval_count"] > 1:
                    out.append((s["total_s"] - s["ttft_s"]) / (s["eval_count"] - 1))
    return out


def run_bench(d: BenchDaemon, model: str, gen: int, repeat: int,
              concurrency: list[int]) -> tuple[dict[str, Any], float]:
    with d.client() as client:
        t0 = time.perf_counter()
        result = client.call("bench.run", {"model": model, "gen": gen, "repeat": repeat,
                                           "concurrency": concurrency, "prompts": ["chat"]},
                             timeout=900)
        return result, time.perf_counter() - t0


def against_fake(token_delay: float, gen: int, repeat: int) -> dict[str, Any]:
    proc, url = start_fake(token_delay)
    try:
        with BenchDaemon({"ollama": {"url": url}, "hardware": {"enabled": False}}) as d:
            result, wall = run_bench(d, MODEL, gen, repeat, [1, 4])
        bare = asyncio.run(bare_client(url, MODEL, gen, repeat))
    finally:
        proc.terminate()
        proc.wait(5)
    nominal_tps = FLASH_SPEEDUP / token_delay
    one, four = result["cases"]
    velod_tok = statistics.median(velod_per_token({"cases": [one]}))
    bare_tok = statistics.median(bare)
    nominal_tok = token_delay / FLASH_SPEEDUP
    return {
        "token_delay_s": token_delay, "configured_tok_s": nominal_tps,
        "reported_gen_tok_s": one["metrics"]["gen_tps"]["median"],
        "reported_over_configured": one["metrics"]["gen_tps"]["median"] / nominal_tps,
        "client_s_per_token_velod": velod_tok, "client_s_per_token_bare_aiohttp": bare_tok,
        "client_s_per_token_configured": nominal_tok,
        "velod_minus_bare_us_per_token": (velod_tok - bare_tok) * 1e6,
        "velod_over_bare": velod_tok / bare_tok,
        "ttft_s_x1": one["metrics"]["ttft_s"]["median"],
        "aggregate_tok_s_x1": one["metrics"]["aggregate_tps"]["median"],
        "aggregate_tok_s_x4": four["metrics"]["aggregate_tps"]["median"],
        "rpc_wall_s": wall, "daemon_elapsed_s": result["elapsed_s"],
        "requests": 1 + sum(len(r) for c in result["cases"] for r in c["samples"]),
    }


def against_real(url: str, model: str, gen: int, repeat: int) -> dict[str, Any]:
    if not reachable(url):
        return {"url": url, "reachable": False, "note": "no Ollama answered; nothing measured"}
    with BenchDaemon({"ollama": {"url": url}, "hardware": {"enabled": False}}) as d:
        result, wall = run_bench(d, model, gen, repeat, [1, 2, 4])
    return {"url": url, "reachable": True, "ollama": result["server"], "model": result["model"],
            "cases": [{"concurrency": c["concurrency"],
                       **{k: (v or {}).get("median") for k, v in c["metrics"].items()}}
                      for c in result["cases"]], "complete": result["complete"],
            "error": result["error"], "rpc_wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--delays", default="0.002,0.005,0.02",
                        help="the fake's seconds per token, comma-separated")
    parser.add_argument("--ollama-url", default="http://127.0.0.1:11434")
    parser.add_argument("--model", default=MODEL, help="model for the real Ollama")
    args = parser.parse_args()
    fake = [against_fake(float(d), args.gen, args.repeat) for d in args.delays.split(",")]
    out = {"benchmark": "ollama_bench", "machine": machine(),
           "measured_against": "the fake Ollama (tests/fakes/fake_ollama.py)",
           "gen": args.gen, "repeat": args.repeat, "fake": fake,
           "real_ollama": against_real(args.ollama_url, args.model, args.gen, args.repeat)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
