"""End to end: the real velod tunes a fake Ollama run by a fake systemctl on fake GPUs.

velod runs with ``tests/fakes/bin`` first on PATH (its ``systemctl`` is the fake), the fake
``pynvml`` (one 24 GiB GPU) and a systemd directory in tmp. The fake Ollama is a separate
process that the fake systemctl (re)starts with the drop-ins' ``Environment=`` lines, and it
sizes loaded models from that environment like Ollama, so ``/api/ps`` shows the result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.fake_gpus import GiB, MiB, gpu, nvml_env, write_gpu_table
from tests.fakes.fake_ollama import free_port
from tests.integration.conftest import wait_for
from velod.control.client import RemoteError

REPO = Path(__file__).resolve().parents[2]
FAKE_BIN = REPO / "tests" / "fakes" / "bin"
FAKE_OLLAMA = REPO / "tests" / "fakes" / "fake_ollama.py"
UNIT = "ollama.service"
# A user's hand-written drop-in that makes llama3.1:8b spill on 24 GiB: 65536 tokens x 4 slots
# of f16 KV cache at 128 KiB per token is 32 GiB before the weights.
SPILLING = '[Service]\nEnvironment="OLLAMA_CONTEXT_LENGTH=65536" "OLLAMA_NUM_PARALLEL=4"\n'
FAST = {"interval": "200ms", "settle": "300ms", "restart_when_idle_for": "200ms"}



@dataclass
class Machine:
    """The fake world: GPUs, a systemd directory, a systemctl and an Ollama service."""

    tmp: Path
    port: int
    env: dict[str, str]
    unit: str = UNIT

    @property
    def systemd_dir(self) -> Path:
        return self.tmp / "systemd"

    @property
    def dropin_dir(self) -> Path:
        return self.systemd_dir / f"{self.unit}.d"

    @property
    def velod_dropin(self) -> Path:
        return self.dropin_dir / "50-velod.conf"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(FAKE_BIN / "systemctl"), *args], env=self.env,
                              capture_output=True, text=True, timeout=30)

    def calls(self) -> list[list[str]]:
        """The systemctl calls that change something (velod's ``show`` only reads)."""
        log = Path(self.env["FAKE_SYSTEMCTL_LOG"])
        if not log.exists():
            return []
        argvs = [json.loads(line)["argv"] for line in log.read_text().splitlines()]
        return [argv for argv in argvs if argv[:1] != ["show"]]

    def restarts(self) -> int:
        return sum(1 for argv in self.calls() if argv[:1] == ["restart"])

    def ollama(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=2) as resp:
            return json.loads(resp.read())

    def ollama_up(self) -> bool:
        try:
            self.ollama("/api/version")
        except OSError:
            return False
        return True

    def fail_next_restart(self, how: str) -> None:
        (Path(self.env["FAKE_SYSTEMCTL_STATE"]) / f"{self.unit}.next-restart").write_text(how)

    def velod_config(self, mode: str, **tuner: Any) -> dict[str, Any]:
        return {"state_dir": str(self.tmp / "velod-state"), "hardware": {"interval": "200ms"},
                "ollama": {"url": self.url, "systemd_dir": str(self.systemd_dir),
                           "systemctl": "systemctl", "request_timeout": "1s"},
                "tuner": {"mode": mode, **{**FAST, **tuner}}}


def fake_machine(tmp_path: Path, user_dropin: str | None, ollama_env: dict[str, str]) -> Machine:
    """One fake 24 GiB GPU, a systemd directory, the fake systemctl on PATH, and a fake
    Ollama registered as ollama.service (not started) with ``ollama_env`` in its unit."""
    table = write_gpu_table(tmp_path / "nvml.json", [gpu(
        "NVIDIA GeForce RTX 4090", memory_total=24 * GiB, memory_used=512 * MiB,
        utilization_gpu=0, compute_capability=[8, 9])])
    state = tmp_path / "systemctl-state"
    state.mkdir()
    env = {**os.environ, **nvml_env(table),
           "PATH": f"{FAKE_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FAKE_SYSTEMCTL_STATE": str(state), "FAKE_SYSTEMCTL_LOG": str(tmp_path / "calls"),
           "FAKE_SYSTEMCTL_SYSTEMD_DIR": str(tmp_path / "systemd")}
    m = Machine(tmp_path, free_port(), env)
    m.dropin_dir.mkdir(parents=True)
    if user_dropin:
        (m.dropin_dir / "10-user.conf").write_text(user_dropin)
    (state / f"{UNIT}.json").write_text(json.dumps({
        "argv": [sys.executable, str(FAKE_OLLAMA), "--port", str(m.port)],
        "env": {"FAKE_NVML_TABLE": str(table), "PATH": "/usr/bin:/bin", **ollama_env},
        "log": str(tmp_path / "ollama.log")}))
    return m


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    # As if a client used the model right after every start, so /api/ps shows it.
    m = fake_machine(tmp_path, SPILLING, {
        "FAKE_OLLAMA_PRELOAD": "llama3.1:8b",
        "FAKE_OLLAMA_STORE": str(tmp_path / "ollama-models.json")})
    yield m
    m.systemctl("stop", UNIT)


def start_ollama(m: Machine) -> None:
    assert m.systemctl("start", UNIT).returncode == 0
    wait_for(m.ollama_up, what="the fake Ollama to answer")
    (loaded,) = m.ollama("/api/ps")["models"]
    assert loaded["size_vram"] < loaded["size"], "the starting configuration must spill"


def blocked(d: Any) -> Any:
    try:
        return d.call("tuner.show")["blocked"]
    except RemoteError as exc:  # no hardware snapshot yet, right after start
        assert exc.code == "unavailable", exc
        return None


def decisions(d: Any) -> list[str]:
    return [e["decision"] for e in d.call("tuner.history", {"limit": 100})["entries"]]


def test_apply_mode_converges_to_a_fitting_configuration_with_one_restart(
        machine: Machine, velod_factory: Any) -> None:
    start_ollama(machine)
    user_file = (machine.dropin_dir / "10-user.conf").read_text()
    user_model = next(m for m in machine.ollama("/api/tags")["models"]
                      if m["name"] == "llama3.1:8b")
    d = velod_factory(machine.velod_config("apply", min_restart_interval="1h",
                                           model_variants=True), env=machine.env)
    wait_for(lambda: "verified" in decisions(d), timeout=30, what="a verified apply")

    (loaded,) = machine.ollama("/api/ps")["models"]
    assert loaded["size_vram"] == loaded["size"], "after tuning the model must fit the GPU"
    text = machine.velod_dropin.read_text()
    assert text.startswith("# Managed by velod")
    assert "OLLAMA_NUM_PARALLEL=" in text and "OLLAMA_CONTEXT_LENGTH=" in text
    assert (machine.dropin_dir / "10-user.conf").read_text() == user_file
    assert machine.calls()[1:] == [["daemon-reload"], ["restart", UNIT]]

    show = d.call("tuner.show")
    assert show["up_to_date"], show["changes"]

    # Model parameters arrive as derived models once the server settings are in place.
    def variants() -> dict[str, Any]:
        return {m["name"]: m for m in machine.ollama("/api/tags")["models"]
                if m["name"].endswith("-velod")}

    wait_for(lambda: "llama3.1:8b-velod" in variants(), what="a model variant")
    assert user_model in machine.ollama("/api/tags")["models"]  # the user's model untouched
    req = urllib.request.Request(machine.url + "/api/show", method="POST",
                                 data=json.dumps({"model": "llama3.1:8b-velod"}).encode())
    with urllib.request.urlopen(req, timeout=2) as resp:
        assert "num_ctx" in json.loads(resp.read())["parameters"]

    time.sleep(1.5)  # several more cycles: nothing else happens
    assert machine.restarts() == 1
    history = decisions(d)
    server_applies = [e for e in d.call("tuner.history", {"limit": 100})["entries"]
                      if e["decision"] == "applied" and e.get("target") != "variant"]
    assert len(server_applies) == 1 and history.index("planned") < history.index("applied")
    assert history.count("applied") == 1 + len(variants())  # each variant created once

    out = d.ctl("tune", "show").stdout
    assert "OLLAMA_NUM_PARALLEL" in out and "nothing to change" in out
    assert "GPU 0" in out  # the memory budget
    status = d.ctl("ollama").stdout
    assert "llama3.1:8b" in status and "100% GPU" in status
    assert "applied" in d.ctl("tune", "history").stdout

    # The history is in the state dir and survives a daemon restart.
    d.stop()
    d2 = velod_factory(machine.velod_config("apply", min_restart_interval="1h"),
                       env=machine.env)
    assert "applied" in decisions(d2)
    time.sleep(1.0)
    assert machine.restarts() == 1


def test_ollama_that_does_not_come_back_is_rolled_back_and_not_retried(
        machine: Machine, velod_factory: Any) -> None:
    start_ollama(machine)
    machine.fail_next_restart("no-come-back")
    d = velod_factory(machine.velod_config("apply", min_restart_interval="0s"),
                      env=machine.env)
    wait_for(lambda: "rolled-back" in decisions(d), timeout=30, what="a rollback")
    wait_for(machine.ollama_up, what="Ollama back on the previous settings")
    assert not machine.velod_dropin.exists()  # there was no velod drop-in before
    (loaded,) = machine.ollama("/api/ps")["models"]
    assert loaded["context_length"] == 65536  # the user's settings again
    time.sleep(2.0)  # rate limit is off: only the rejection keeps velod from looping
    assert machine.restarts() == 2
    assert "applied" not in decisions(d)
    entry = d.call("tuner.history", {"limit": 100})["entries"][-1]
    assert entry["decision"] == "rolled-back" and "did not answer" in entry["message"]
    assert "failed before (rolled-back" in d.ctl("tune", "show").stdout


def test_observe_mode_recommends_and_never_writes(machine: Machine,
                                                  velod_factory: Any) -> None:
    start_ollama(machine)
    d = velod_factory(machine.velod_config("observe"), env=machine.env)
    wait_for(lambda: "planned" in decisions(d), what="a planned decision")
    time.sleep(1.0)
    assert not machine.velod_dropin.exists()
    assert machine.calls() == [["start", UNIT]]
    show = d.call("tuner.show")
    assert not show["up_to_date"]
    assert show["changes"]["OLLAMA_NUM_PARALLEL"][0] == "4"
    assert "Observe mode" in d.ctl("tune", "show").stdout
    plan = d.ctl("tune", "plan", "--profile", "low-memory").stdout
    assert plan.startswith("Plan for this machine (low-memory profile)")
    assert "OLLAMA_CONTEXT_LENGTH" in plan and "GPU 0" in plan
    status = d.ctl("ollama").stdout
    assert "CPU/GPU" in status and "warning" in status


def test_admin_apply_and_rollback_from_velodctl(machine: Machine, velod_factory: Any) -> None:
    start_ollama(machine)
    d = velod_factory(machine.velod_config("observe"), env=machine.env)
    wait_for(lambda: "planned" in decisions(d), what="a planned decision")
    out = d.ctl("tune", "apply").stdout
    assert out.startswith("applied")
    assert machine.velod_dropin.exists() and machine.restarts() == 1
    out = d.ctl("tune", "rollback").stdout
    assert out.startswith("rolled-back")
    assert not machine.velod_dropin.exists() and machine.restarts() == 2
    again = d.ctl("tune", "rollback", check=False)
    assert again.returncode != 0 and "nothing to roll back" in again.stderr + again.stdout
    # What the admin rolled back is not re-applied by velod itself, even after a restart.
    d.stop()
    d2 = velod_factory(machine.velod_config("apply", settle="0s"), env=machine.env)
    wait_for(lambda: blocked(d2), what="the rolled-back plan blocked")
    time.sleep(1.0)
    assert not machine.velod_dropin.exists() and machine.restarts() == 2


def test_ollama_down_is_reported_and_the_daemon_keeps_answering(
        machine: Machine, velod_factory: Any) -> None:
    d = velod_factory(machine.velod_config("apply"), env=machine.env)  # Ollama never started
    result = wait_for(lambda: (r := d.call("ollama.status"))["reachable"] is False and r,
                      what="Ollama reported unreachable")
    assert "cannot connect" in result["error"]
    out = d.ctl("ollama", check=False)
    assert out.returncode == 1 and "not reachable" in out.stdout
    tuner = wait_for(lambda: (t := d.call("system.status")["components"]["tuner"])
                     ["ollama"]["failures"] >= 3 and t, what="back-off")
    assert tuner["ollama"]["retry_in"] is not None
    assert d.ctl("status").returncode == 0
    assert machine.calls() == [], "velod must not try to restart an Ollama it cannot reach"
    plan = json.loads(d.ctl("--json", "tune", "plan", "--vram", "24GiB", "--gpus", "1",
                            "--ram", "64GiB", "--model", "llama3.1:8b").stdout)
    assert plan["what_if"] and "OLLAMA_NUM_PARALLEL" in plan["plan"]["server"]
    assert d.alive()
