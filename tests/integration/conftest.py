"""Fixtures that start the real velod process and talk to it with the real client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from velod.control.client import Client, DaemonUnreachable

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


def velod_command() -> list[str]:
    exe = BIN / "velod"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "velod"]


def velodctl_command() -> list[str]:
    exe = BIN / "velodctl"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "velod.control.cli"]


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class RunningDaemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    config_path: Path
    state_dir: Path
    log_path: Path
    env: dict[str, str]
    clients: list[Client] = field(default_factory=list)

    def ctl(self, *args: str, check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run the real velodctl against this daemon."""
        cmd = [*velodctl_command(), "--socket", str(self.socket), *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                env={**self.env, **(env or {})})
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n"
                                 f"stdout: {result.stdout}\nstderr: {result.stderr}\n"
                                 f"daemon log:\n{self.log_text()[-4000:]}")
        return result

    def client(self, timeout: float = 30.0) -> Client:
        client = Client.connect(str(self.socket), timeout=timeout)
        self.clients.append(client)
        return client

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with Client.connect(str(self.socket)) as client:
            return client.call(method, params)

    def write_config(self, config: dict[str, Any] | str) -> None:
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        self.config_path.write_text(text)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        for client in self.clients:
            client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.05,
             what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def watch_a_reload(daemon: RunningDaemon, *patterns: str) -> str:
    """Run ``velodctl watch --json PATTERNS``, reload, check the first line printed is the
    reload's event and that Ctrl-C ends the watch with 0; returns what it wrote on stderr."""
    proc = subprocess.Popen([*velodctl_command(), "--socket", str(daemon.socket), "watch",
                             "--json", *patterns], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.8)  # subscribed by then
        daemon.call("config.reload")
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert json.loads(line)["topic"] == "config.reloaded"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    return proc.stderr.read()  # type: ignore[union-attr]


def wait_until_ready(daemon: RunningDaemon, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"velod exited with {daemon.proc.returncode} during start:\n"
                                 f"{daemon.log_text()}")
        try:
            with Client.connect(str(daemon.socket), timeout=2) as client:
                client.call("system.ping")
                return
        except DaemonUnreachable:
            time.sleep(0.05)
    raise AssertionError(f"velod did not answer within {timeout}s:\n{daemon.log_text()}")


def base_config(tmp: Path) -> dict[str, Any]:
    """Isolated defaults: private state dir, an Ollama address nothing listens on."""
    return {
        "state_dir": str(tmp / "state"),
        "ollama": {"url": "http://127.0.0.1:9", "systemd_dir": str(tmp / "systemd"),
                   "request_timeout": "2s"},
    }


@pytest.fixture
def velod_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``velod_factory(config={}, env={}, args=[], wait=True)`` starts a real velod."""
    started: list[RunningDaemon] = []

    def start(config: dict[str, Any] | str | None = None, env: dict[str, str] | None = None,
              args: list[str] | None = None, wait: bool = True,
              socket: Path | None = None) -> RunningDaemon:
        # Unix socket paths are limited to 107 bytes: keep the directory short.
        tmp = Path(tmp_path_factory.mktemp("velod"))
        config_path = tmp / "velod.yaml"
        if isinstance(config, str):
            config_path.write_text(config)
        else:
            config_path.write_text(yaml.safe_dump(deep_merge(base_config(tmp), config or {})))
        sock = socket or tmp / "velod.sock"
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET",
                                                                        "WATCHDOG_", "LISTEN_"))},
            "XDG_RUNTIME_DIR": str(tmp / "run"), "XDG_STATE_HOME": str(tmp / "xdg-state"),
            "XDG_CONFIG_HOME": str(tmp / "xdg-config"), "XDG_CACHE_HOME": str(tmp / "cache"),
            "PYTHONUNBUFFERED": "1", **(env or {}),
        }
        log_path = tmp / "velod.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*velod_command(), "--config", str(config_path), "--socket", str(sock),
                 *(args or [])], stdout=log, stderr=subprocess.STDOUT, env=full_env,
                cwd=str(REPO), start_new_session=True)
        daemon = RunningDaemon(proc, sock, config_path, tmp / "state", log_path, full_env)
        started.append(daemon)
        if wait:
            wait_until_ready(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def velod(velod_factory: Any) -> RunningDaemon:
    """One running daemon with the test defaults."""
    return velod_factory()
