"""Start a real velod for a benchmark, in a temporary directory, and stop it afterwards."""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from velod.control.client import Client, DaemonUnreachable  # noqa: E402

BIN = Path(sys.executable).parent


def timed_ms(fn: Callable[[], Any], repeat: int, digits: int = 2) -> dict[str, float]:
    """Best and median wall time of ``fn`` over ``repeat`` runs after one warm-up, in ms."""
    fn()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1000)
    return {"best_ms": round(min(runs), digits),
            "median_ms": round(statistics.median(runs), digits)}


def emit(doc: dict[str, Any], out: Path | None, indent: int = 2) -> None:
    """Prints a benchmark's JSON document, and writes it to ``out`` (``--out``) when given."""
    text = json.dumps(doc, indent=indent)
    print(text)
    if out:
        out.write_text(text + "\n")


def machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


class BenchDaemon:
    """``with BenchDaemon(config) as d:`` runs velod with an isolated socket and state dir."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="velod-bench-"))
        self.config_path = self.tmp / "velod.yaml"
        self.socket = self.tmp / "velod.sock"
        base = {"state_dir": str(self.tmp / "state"),
                "ollama": {"url": "http://127.0.0.1:9", "systemd_dir": str(self.tmp / "sd")}}
        for key, value in (config or {}).items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        self.config_path.write_text(yaml.safe_dump(base))
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BenchDaemon:
        exe = BIN / "velod"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "velod"]
        self.proc = subprocess.Popen(
            [*cmd, "--config", str(self.config_path), "--socket", str(self.socket),
             "--log-level", "warning"], stderr=open(self.tmp / "log", "wb"),
            env={**os.environ, "XDG_CACHE_HOME": str(self.tmp / "cache")})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with Client.connect(str(self.socket), timeout=2) as client:
                    client.call("system.ping")
                    return self
            except DaemonUnreachable:
                time.sleep(0.05)
        raise RuntimeError(f"velod did not start: {(self.tmp / 'log').read_text()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)

    def client(self) -> Client:
        return Client.connect(str(self.socket))

