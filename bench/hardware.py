"""Benchmark the hardware monitor; prints JSON.

1. ``snapshot``: process CPU time of one read of each source and of one full monitor poll
   (threads, change detection, to_dict, publish), averaged over ``--snapshots`` runs, without
   NVML (here: the real pynvml, which finds no driver) and with NVML (the fake pynvml from
   tests/fakes/nvml serving two GPUs: it measures velod's side, not a real driver's).
2. ``daemon``: CPU of an idle real ``velod`` over ``--window`` seconds with the monitor at
   its default interval vs. ``hardware.enabled: false``, side by side, each started by this
   script as ``python -m velod --config ... --socket ...`` in a temporary directory.

usage: python bench/hardware.py [--snapshots 300] [--window 60] [--skip-daemon]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes.fake_gpus import GiB, gpu, load_fake_pynvml, write_gpu_table  # noqa: E402
from velod.bus import Bus  # noqa: E402
from velod.component import Context  # noqa: E402
from velod.config import Config, HardwareConfig  # noqa: E402
from velod.control.client import Client, DaemonUnreachable  # noqa: E402
from velod.hardware.amd import AmdSource  # noqa: E402
from velod.hardware.host import HostSource  # noqa: E402
from velod.hardware.nvml import NvmlSource  # noqa: E402
from velod.hardware.service import HardwareMonitor  # noqa: E402


def cpu_us(fn: Any, runs: int) -> float:
    """Mean process CPU time (user + system, all threads) of ``fn()``, in microseconds."""
    fn()  # warm up: first reads cache static facts
    start = time.process_time()
    for _ in range(runs):
        fn()
    return round((time.process_time() - start) / runs * 1e6, 1)


def poll_cpu_us(nvml: Any, runs: int) -> float:
    async def main() -> float:
        bus = Bus()
        bus.subscribe(["hardware.*"], lambda event: None)  # as if a client listened
        ctx = Context(Config(), bus, Path(tempfile.gettempdir()), logging.getLogger("bench"))
        monitor = HardwareMonitor(ctx, nvml_module=nvml)
        await monitor.poll()
        start = time.process_time()
        for _ in range(runs):
            await monitor.poll()
        spent = time.process_time() - start
        await monitor.stop()
        return round(spent / runs * 1e6, 1)

    return asyncio.run(main())


def bench_snapshot(runs: int) -> dict[str, Any]:
    import pynvml

    tmp = Path(tempfile.mkdtemp(prefix="velod-bench-"))
    table = write_gpu_table(tmp / "nvml.json", [
        gpu("NVIDIA GeForce RTX 4090", memory_total=24 * GiB, memory_used=3 * GiB,
            processes=[{"pid": os.getpid(), "used_memory": 3 * GiB}]),
        gpu("NVIDIA RTX A6000", memory_total=48 * GiB, memory_used=0)])
    fake = load_fake_pynvml(table)
    real_nvml, fake_nvml = NvmlSource(pynvml), NvmlSource(fake)
    out = {
        "runs": runs,
        "read_us": {
            "host_psutil": cpu_us(HostSource().read, runs),
            "amd_sysfs": cpu_us(AmdSource().read, runs),
            "nvml_absent": cpu_us(real_nvml.read, runs),
            "nvml_fake_2_gpus": cpu_us(fake_nvml.read, runs),
        },
        "poll_us": {
            "without_nvml": poll_cpu_us(pynvml, runs),
            "with_fake_nvml_2_gpus": poll_cpu_us(fake, runs),
        },
    }
    real_nvml.close()
    fake_nvml.close()
    interval = HardwareConfig().interval
    out["poll_share_of_one_core_at_default_interval_pct"] = {
        k: round(v / 1e6 / interval * 100, 4) for k, v in out["poll_us"].items()}
    return out


def daemon_cpu(hardware_enabled: bool, window: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="velod-bench-"))
    config = {"state_dir": str(tmp / "state"), "hardware": {"enabled": hardware_enabled},
              "ollama": {"url": "http://127.0.0.1:9", "systemd_dir": str(tmp / "systemd")}}
    (tmp / "velod.yaml").write_text(yaml.safe_dump(config))
    sock = tmp / "velod.sock"
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp / "run"),
           "XDG_STATE_HOME": str(tmp / "xdg-state"), "XDG_CONFIG_HOME": str(tmp / "xdg")}
    env.pop("NOTIFY_SOCKET", None)
    with open(tmp / "velod.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "velod", "--config", str(tmp / "velod.yaml"),
                                 "--socket", str(sock)], stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with Client.connect(str(sock), timeout=2) as client:
                    client.call("system.ping")
                break
            except DaemonUnreachable:
                if time.monotonic() > deadline or proc.poll() is not None:
                    log_text = (tmp / 'velod.log').read_text()
                    raise RuntimeError(f"velod did not start: {log_text}") from None
                time.sleep(0.1)
        time.sleep(3)  # let start-up work finish
        process = psutil.Process(proc.pid)
        before, t0 = process.cpu_times(), time.monotonic()
        time.sleep(window)
        after, t1 = process.cpu_times(), time.monotonic()
    finally:
        proc.terminate()
        proc.wait(10)
    cpu = (after.user - before.user) + (after.system - before.system)
    return {"hardware_enabled": hardware_enabled, "window_s": round(t1 - t0, 1),
            "cpu_s": round(cpu, 3), "pct_of_one_core": round(cpu / (t1 - t0) * 100, 4)}


def bench_daemon(window: float) -> dict[str, Any]:
    disabled = daemon_cpu(False, window)
    enabled = daemon_cpu(True, window)
    added = enabled["pct_of_one_core"] - disabled["pct_of_one_core"]
    return {"interval_s": HardwareConfig().interval, "disabled": disabled, "enabled": enabled,
            "monitor_adds_pct_of_one_core": round(added, 4),
            "resolution_pct": round(0.01 / window * 100, 4),  # one clock tick over the window
            "target_pct": 0.2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=300)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--skip-daemon", action="store_true")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "machine": {"cpus": psutil.cpu_count(), "arch": platform.machine(),
                    "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "snapshot": bench_snapshot(args.snapshots),
    }
    if not args.skip_daemon:
        result["daemon"] = bench_daemon(args.window)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
