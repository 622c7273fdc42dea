"""End to end: ``velodctl bench`` and the closed loop (verify, explore) through the real
daemon, against the fake Ollama whose speed follows its settings (``GenerationTiming``:
CPU spill ~10x slower per share, flash attention and a q8_0 cache faster unless told
otherwise, seeded noise), run by the fake systemctl on one fake 24 GiB GPU.
"""

from __future__ import annotations

import itertools
import json
import signal
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import velodctl_command
from tests.integration.test_tuner_e2e import (
    SPILLING,
    UNIT,
    Machine,
    decisions,
    fake_machine,
    wait_for,
)

MODEL = "llama3.1:8b"
TOKEN_DELAY = 0.002
NOISE = 0.02
FAST = {"interval": "200ms", "settle": "200ms", "restart_when_idle_for": "200ms",
        "verify_tokens": 16, "verify_repeat": 3, "verify_timeout": "20s"}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Callable[..., Machine]]:
    """``world(user_dropin, **ollama_env)``: a fake machine whose Ollama is started."""
    made: list[Machine] = []

    def make(user_dropin: str | None = None, **ollama_env: str) -> Machine:
        m = fake_machine(tmp_path, user_dropin, {
            "FAKE_OLLAMA_TOKEN_DELAY": str(TOKEN_DELAY), "FAKE_OLLAMA_NOISE": str(NOISE),
            "FAKE_OLLAMA_SEED": "7", "FAKE_OLLAMA_PRELOAD": MODEL, **ollama_env})
        assert m.systemctl("start", UNIT).returncode == 0
        wait_for(m.ollama_up, what="the fake Ollama to answer")
        made.append(m)
        return m

    yield make
    for m in made:
        m.systemctl("stop", UNIT)


def config(m: Machine, mode: str = "observe", **tuner: Any) -> dict[str, Any]:
    return {"state_dir": str(m.tmp / "velod-state"), "hardware": {"interval": "200ms"},
            "ollama": {"url": m.url, "systemd_dir": str(m.systemd_dir),
                       "systemctl": "systemctl", "request_timeout": "2s"},
            "tuner": {"mode": mode, **{**FAST, **tuner}}}


def fake_state(m: Machine) -> dict[str, Any]:
    return m.ollama("/_fake/state")


def fake_control(m: Machine, **body: Any) -> None:
    req = urllib.request.Request(m.url + "/_fake/control", method="POST",
                                 data=json.dumps(body).encode())
    urllib.request.urlopen(req, timeout=2).close()


def bench(d: Any, *args: str, check: bool = True) -> tuple[int, dict[str, Any], str]:
    out = d.ctl("--json", "bench", *args, check=check, timeout=120)
    return out.returncode, json.loads(out.stdout) if out.stdout.strip() else {}, out.stderr


def entries(d: Any, decision: str) -> list[dict[str, Any]]:
    return [e for e in d.call("tuner.history", {"limit": 500})["entries"]
            if e["decision"] == decision]


# --------------------------------------------------------------------------- benchmark


def test_benchmark_figures_are_what_the_fake_produced(world: Any, velod_factory: Any) -> None:
    m = world()
    d = velod_factory(config(m), env=m.env)
    before = len(fake_state(m)["generations"])
    progress: list[dict[str, Any]] = []
    stream = d.client().subscribe(["bench.progress"])

    def listen() -> None:
        for event in stream:
            progress.append(event["data"])
            if event["data"]["phase"] == "finished":
                return

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    rc, result, _ = bench(d, "--model", MODEL, "--prompt", "chat", "--gen", "12",
                          "--concurrency", "1,2", "--repeat", "3")
    assert rc == 0 and result["complete"] and result["error"] is None
    made = fake_state(m)["generations"][before:]
    assert len(made) == 1 + 3 * 1 + 3 * 2  # warm-up, then 3 repeats of each level
    listener.join(10)
    assert progress[0]["phase"] == "warm-up" and progress[-1]["phase"] == "finished"
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    assert progress[-1]["done"] == progress[-1]["total"] == len(made)

    # Per repeat, the mean of the requests' eval_count / eval_duration; median over repeats.
    def tps(g: dict[str, Any]) -> float:
        return g["eval_count"] / (g["eval_duration"] / 1e9)

    runs = [[made[1]], [made[2]], [made[3]], made[4:6], made[6:8], made[8:10]]
    expected = [statistics.mean(tps(g) for g in run) for run in runs]
    one, two = result["cases"]
    assert (one["concurrency"], two["concurrency"]) == (1, 2)
    assert one["metrics"]["gen_tps"]["median"] == pytest.approx(statistics.median(expected[:3]))
    assert two["metrics"]["gen_tps"]["median"] == pytest.approx(statistics.median(expected[3:]))
    assert one["metrics"]["gen_tps"]["spread"] == pytest.approx(
        (max(expected[:3]) - min(expected[:3])) / 2)
    prompt = made[1]["prompt_eval_count"] / (made[1]["prompt_eval_duration"] / 1e9)
    assert one["runs"][0]["prompt_tps"] == pytest.approx(prompt)
    # ... and those are the fake's configured speed (flash attention 1.25x, f16), +- noise.
    speed = fake_state(m)["speed"][MODEL]
    assert one["metrics"]["gen_tps"]["median"] == pytest.approx(speed / TOKEN_DELAY,
                                                                rel=NOISE * 1.01)
    # Client-side figures: a first token arrives before the answer ends.
    for case in result["cases"]:
        ttft, total = case["metrics"]["ttft_s"], case["metrics"]["total_s"]
        assert 0 < ttft["median"] < total["median"]
        assert case["metrics"]["aggregate_tps"]["median"] > 0
    assert two["metrics"]["aggregate_tps"]["median"] > one["metrics"]["aggregate_tps"]["median"]

    # Recorded with the model digest, Ollama's version and the settings in force; saved.
    tags = {t["name"]: t for t in m.ollama("/api/tags")["models"]}
    assert result["model"]["digest"] == tags[MODEL]["digest"]
    assert result["server"]["version"] == m.ollama("/api/version")["version"]
    assert (result["server"]["name"], result["server"]["kind"]) == ("ollama", "ollama")
    assert result["loaded"]["gpu_percent"] == 100
    assert Path(result["path"]).is_file()
    shown = json.loads(d.ctl("--json", "bench", "show", result["id"]).stdout)
    assert shown["cases"] == result["cases"]
    assert result["id"] in d.ctl("bench", "list").stdout
    text = d.ctl("bench", "show", result["id"][:15]).stdout
    assert "GEN TOK/S" in text and MODEL in text

    # A second run compares with the first: per metric A, B, ratio, noise or not.
    rc, second, _ = bench(d, "--model", MODEL, "--prompt", "chat", "--gen", "12",
                          "--concurrency", "1,2", "--repeat", "3")
    cmp = json.loads(d.ctl("--json", "bench", "compare", result["id"], second["id"]).stdout)
    row = next(r for r in cmp["rows"] if r["metric"] == "gen_tps" and r["concurrency"] == 1)
    assert row["ratio"] == pytest.approx(second["cases"][0]["metrics"]["gen_tps"]["median"]
                                         / one["metrics"]["gen_tps"]["median"])
    assert row["significant"] is False  # same settings: the difference is noise
    assert "B/A" in d.ctl("bench", "compare", result["id"], second["id"]).stdout


def test_benchmark_errors_are_clear(world: Any, velod_factory: Any) -> None:
    m = world()
    d = velod_factory(config(m), env=m.env)
    out = d.ctl("bench", "--model", "mistral:7b", "--gen", "4", check=False)
    assert out.returncode == 1
    assert "no model 'mistral:7b'" in out.stderr and MODEL in out.stderr  # lists installed

    # Without --model: the most-used model (the one loaded and used here); by default
    # the three fixed prompts, the document summary the longest.
    rc, result, _ = bench(d, "--gen", "4", "--repeat", "1")
    assert rc == 0 and result["model"]["name"] == MODEL
    assert [c["prompt"] for c in result["cases"]] == ["chat", "summary", "code"]
    counts = {c["prompt"]: c["samples"][0][0]["prompt_count"] for c in result["cases"]}
    assert counts["summary"] > 5 * counts["chat"]

    # Ollama dies mid-benchmark: partial results are kept, with a clear error.
    fake_control(m, die_after_tokens=4 + 2 * 4 + 2)  # warm-up, two repeats, then mid-answer
    rc, partial, err = bench(d, "--model", MODEL, "--prompt", "chat", "--gen", "4",
                             "--repeat", "5", check=False)
    assert rc == 1 and not partial["complete"]
    assert "stopped answering" in partial["error"] and "partial results kept" in err
    assert partial["cases"][0]["repeats"] == 2
    listing = json.loads(d.ctl("--json", "bench", "list").stdout)["results"]
    assert listing[0]["id"] == partial["id"] and listing[0]["complete"] is False

    out = d.ctl("bench", "--model", MODEL, check=False)  # and now it is down
    assert out.returncode == 1 and "not reachable" in out.stderr
    assert d.alive()


def test_benchmark_that_times_out_keeps_partial_results(world: Any, velod_factory: Any
                                                        ) -> None:
    m = world(FAKE_OLLAMA_TOKEN_DELAY="0.02")
    d = velod_factory(config(m), env=m.env)
    rc, result, err = bench(d, "--model", MODEL, "--prompt", "code", "--gen", "10",
                            "--repeat", "20", "--timeout", "1.5", check=False)
    assert rc == 1 and "did not finish within 1.5s" in err
    assert 1 <= result["cases"][0]["repeats"] < 20
    assert d.ctl("bench", "show", result["id"]).returncode == 0


# --------------------------------------------------------------------------- closed loop


def test_verify_keeps_a_change_that_makes_ollama_faster(world: Any, velod_factory: Any
                                                       ) -> None:
    m = world(SPILLING)  # the user's settings spill to the CPU: slow
    d = velod_factory(config(m, "apply", verify=True, min_restart_interval="1h"), env=m.env)
    (kept,) = wait_for(lambda: entries(d, "verified"), timeout=40, what="a verified change")
    before, after = kept["before"]["gen_tps"]["median"], kept["after"]["gen_tps"]["median"]
    assert after > 2 * before, kept["message"]
    assert kept["message"].startswith("kept:") and "faster" in kept["message"]
    assert m.velod_dropin.exists() and m.restarts() == 1
    assert "rolled-back" not in decisions(d)


def test_verify_rolls_back_a_change_that_makes_ollama_slower(world: Any, velod_factory: Any
                                                             ) -> None:
    # On this GPU flash attention hurts; the planner turns it on, the benchmark says no.
    m = world('[Service]\nEnvironment="OLLAMA_FLASH_ATTENTION=false"\n',
              FAKE_OLLAMA_FLASH_SPEEDUP="0.6")
    d = velod_factory(config(m, "apply", verify=True, min_restart_interval="0s"), env=m.env)
    (back,) = wait_for(lambda: entries(d, "rolled-back"), timeout=40, what="a rollback")
    assert "slower" in back["message"]
    assert back["after"]["gen_tps"]["median"] < 0.7 * back["before"]["gen_tps"]["median"]
    assert back["failed"]["OLLAMA_FLASH_ATTENTION"] == "true"
    assert not m.velod_dropin.exists()
    wait_for(m.ollama_up, what="Ollama back on the previous settings")
    assert fake_state(m)["flash_attention"] is False
    time.sleep(1.0)  # not retried by itself
    assert m.restarts() == 2 and len(entries(d, "rolled-back")) == 1


def test_exploration_converges_on_the_fastest_safe_setting(world: Any, velod_factory: Any
                                                          ) -> None:
    m = world()  # the fake: flash attention 1.25x, q8_0 cache 1.1x, context no effect
    interval = 0.6
    d = velod_factory(config(m, "apply", explore=True, settle="0s",
                             min_restart_interval=f"{interval}s"), env=m.env)
    (kept,) = wait_for(lambda: entries(d, "explore-kept"), timeout=60,
                       what="exploration to finish")
    # The kept choice becomes the plan at the tuner's next cycle (woken by the finish).
    wait_for(lambda: d.call("tuner.show")["up_to_date"], timeout=10,
             what="the plan to include the kept choice")
    assert kept["pins"]["OLLAMA_KV_CACHE_TYPE"] == "q8_0"
    assert kept["pins"]["OLLAMA_FLASH_ATTENTION"] == "true"
    text = m.velod_dropin.read_text()
    assert "OLLAMA_KV_CACHE_TYPE=q8_0" in text and "OLLAMA_FLASH_ATTENTION=true" in text
    state = fake_state(m)
    assert state["kv_cache_type"] == "q8_0" and state["flash_attention"] is True
    # The context stays the plan's: a smaller one is no faster here, so it is not kept.
    base_ctx = kept["base"]["OLLAMA_CONTEXT_LENGTH"]
    assert kept["pins"]["OLLAMA_CONTEXT_LENGTH"] == base_ctx
    assert state["context_length"] == int(base_ctx)
    trials = entries(d, "explore-trial")
    assert len(trials) == len(kept["trials"]) >= 4  # the plan, then each candidate
    assert all(not t.get("spills") for t in trials)
    # Never more than one restart per min_restart_interval.
    times = [json.loads(line)["time"] for line in
             Path(m.env["FAKE_SYSTEMCTL_LOG"]).read_text().splitlines()
             if json.loads(line)["argv"][:1] == ["restart"]]
    assert len(times) >= 4
    assert all(b - a >= interval * 0.99 for a, b in itertools.pairwise(times))
    count = m.restarts()
    time.sleep(1.5)  # explored once for this plan: nothing more happens
    assert m.restarts() == count
    assert "q8_0" in d.ctl("tune", "show").stdout

    # The choice holds across a daemon restart: no new exploration, no restart.
    d.stop()
    d2 = velod_factory(config(m, "apply", explore=True, settle="0s",
                              min_restart_interval=f"{interval}s"), env=m.env)
    wait_for(lambda: d2.call("tuner.history", {"limit": 1})["entries"] and
             d2.call("system.status")["components"]["tuner"]["changes"] == 0,
             what="the restarted daemon to plan")
    time.sleep(1.0)
    assert m.restarts() == count and len(entries(d2, "explore-kept")) == 1


# --------------------------------------------------------------------------- issue #12


def test_an_over_long_streamed_line_is_a_clear_error_with_partial_results_kept(
        world: Any, velod_factory: Any) -> None:
    m = world()
    d = velod_factory(config(m), env=m.env)
    # After the warm-up and two repeats, Ollama's final chunks carry a ~23 MB context.
    fake_control(m, context_tokens=3_000_000, after_requests=3)
    rc, result, err = bench(d, "--model", MODEL, "--prompt", "chat", "--gen", "4",
                            "--repeat", "5", check=False)
    assert rc == 1 and "[internal]" not in err
    assert result["error_kind"] == "bad_response" and not result["complete"]
    assert "streamed a line longer than velod reads" in result["error"]
    assert "partial results kept" in err
    assert result["cases"][0]["repeats"] == 2
    assert json.loads(d.ctl("--json", "bench", "show", result["id"]).stdout)["cases"]
    assert d.alive()


def test_ctrl_c_exits_130_and_the_daemon_keeps_the_partial_run_as_interrupted(
        world: Any, velod_factory: Any) -> None:
    m = world(FAKE_OLLAMA_TOKEN_DELAY="0.02")
    d = velod_factory(config(m), env=m.env)
    cmd = [*velodctl_command(), "--socket", str(d.socket), "bench", "--model", MODEL,
           "--prompt", "code", "--gen", "10", "--repeat", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=d.env)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # progress: one line per step, stderr not being a terminal
        lines.append(line)
        if sum("measure" in seen for seen in lines) >= 3:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "velodctl bench show" in err
    assert "Traceback" not in err

    def saved() -> Any:
        results = json.loads(d.ctl("--json", "bench", "list").stdout)["results"]
        return results and results[0]["status"] == "interrupted" and results[0]
    summary = wait_for(saved, what="the interrupted run saved")
    run = json.loads(d.ctl("--json", "bench", "show", summary["id"]).stdout)
    assert run["error_kind"] == "interrupted" and not run["complete"]
    assert 2 <= run["cases"][0]["repeats"] < 20  # what it measured before the Ctrl-C
    assert summary["id"] in err
    assert "interrupted" in d.ctl("bench", "list").stdout
    # The daemon noticed at once: Ollama is not kept busy, a new run may start.
    generations = len(fake_state(m)["generations"])
    time.sleep(0.5)
    assert len(fake_state(m)["generations"]) <= generations + 1
    rc, again, _ = bench(d, "--model", MODEL, "--prompt", "chat", "--gen", "2", "--repeat", "1")
    assert rc == 0 and again["complete"]


def test_compare_calls_nothing_better_or_worse_without_a_measured_spread(
        world: Any, velod_factory: Any) -> None:
    m = world()
    d = velod_factory(config(m), env=m.env)
    ids = [bench(d, "--model", MODEL, "--prompt", "chat", "--gen", "8", "--repeat", "1")[1]["id"]
           for _ in range(2)]
    cmp = json.loads(d.ctl("--json", "bench", "compare", *ids).stdout)
    assert cmp["rows"] and all(r["significant"] is None and r["b_better"] is None
                               and not r["spread_known"] for r in cmp["rows"])
    assert any("spread is unknown" in n for n in cmp["notes"])
    table, _, notes = d.ctl("bench", "compare", *ids).stdout.partition("note:")
    assert "spread unknown" in table and "better" not in table and "worse" not in table
    assert "spread is unknown" in notes


def test_progress_is_one_line_per_step_on_stderr_when_it_is_not_a_terminal(
        world: Any, velod_factory: Any) -> None:
    m = world(SPILLING)
    d = velod_factory(config(m, "observe"), env=m.env)
    run = d.ctl("--json", "bench", "--model", MODEL, "--prompt", "chat", "--gen", "2",
                "--repeat", "2", "--concurrency", "1,2")
    steps = [line for line in run.stderr.splitlines() if line.startswith("bench: ")]
    assert steps == ["bench: 0/7 requests, warm-up chat", "bench: 1/7 requests, measure chat x1",
                     "bench: 2/7 requests, measure chat x1",
                     "bench: 3/7 requests, measure chat x2",
                     "bench: 5/7 requests, measure chat x2", "bench: 7/7 requests, done"]
    assert "\r" not in run.stderr and json.loads(run.stdout)["complete"]  # stdout: JSON only
    wait_for(lambda: d.call("tuner.show")["changes"], what="a plan")
    apply = d.ctl("tune", "apply", "--now")
    assert apply.stdout.startswith("applied")
    assert apply.stderr.splitlines() == [
        f"tune apply: writing {m.velod_dropin}", "tune apply: systemctl daemon-reload",
        f"tune apply: restarting {UNIT}", "tune apply: waiting for Ollama to answer",
        "tune apply: checking what Ollama runs"]


def test_an_endless_ollama_reply_does_not_grow_velod(world: Any, velod_factory: Any) -> None:
    m = world()
    d = velod_factory(config(m), env=m.env)
    # Measured once velod has planned (its modules loaded, its first plan made).
    wait_for(lambda: d.call("tuner.show")["changes"], what="a first plan")
    time.sleep(0.5)
    before = rss(d.proc.pid)
    fake_control(m, mode="huge")  # every answer: a 400 MB JSON string
    status = wait_for(lambda: (t := d.call("system.status")["components"]["tuner"])
                      ["ollama"]["failures"] >= 3 and t, timeout=30, what="three polls")
    assert "longer than velod reads" in status["ollama"]["error"]
    assert rss(d.proc.pid) - before < 30 * 2**20
    fake_control(m, mode="ok")
    wait_for(lambda: d.call("ollama.status")["reachable"], timeout=30, what="recovery")


def rss(pid: int) -> int:
    """Resident memory of a process in bytes, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")

