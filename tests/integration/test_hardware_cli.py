"""``velodctl hw`` against the real daemon: this machine's figures, then fake NVIDIA GPUs."""

from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.fakes.fake_gpus import GiB, gpu, nvml_env, write_gpu_table
from tests.integration.conftest import velodctl_command

FAST = {"hardware": {"interval": "200ms"}}


def has_gpu_here() -> bool:
    amd = any((p / "device" / "vendor").read_text().strip() == "0x1002"
              for p in Path("/sys/class/drm").glob("card[0-9]*")
              if (p / "device" / "vendor").exists())
    return Path("/dev/nvidiactl").exists() or amd


def test_hw_json_matches_psutil_and_explains_why_no_gpu(velod_factory: Any) -> None:
    d = velod_factory()
    result = json.loads(d.ctl("hw", "--json").stdout)
    snap = result["snapshot"]
    assert snap["memory"]["total"] == psutil.virtual_memory().total
    assert snap["memory"]["swap_total"] == psutil.swap_memory().total
    assert abs(snap["memory"]["available"] - psutil.virtual_memory().available) < 1024**3
    assert snap["cpu"]["physical_cores"] == psutil.cpu_count(logical=False)
    assert snap["cpu"]["threads"] == psutil.cpu_count(logical=True)
    assert result["sources"]["host"]["state"] == "ok"
    if has_gpu_here():
        pytest.skip("this machine has a GPU; the no-GPU explanation cannot be checked")
    assert snap["gpus"] == []
    assert "not found" in snap["gpu_notes"]["nvidia"] or "not loaded" in \
        snap["gpu_notes"]["nvidia"]
    text = d.ctl("hw").stdout
    assert "No GPU found" in text
    assert snap["gpu_notes"]["nvidia"] in text
    assert "Memory" in text and "CPU" in text


def test_hw_reports_a_driver_that_is_not_loaded(velod_factory: Any, tmp_path: Path) -> None:
    table = write_gpu_table(tmp_path / "nvml.json", [gpu()], init_error="DriverNotLoaded")
    d = velod_factory({"hardware": {"sysfs_root": str(tmp_path / "no-sys")}},
                      env=nvml_env(table))
    text = d.ctl("hw").stdout
    assert "No GPU found" in text
    assert "nvidia: NVIDIA driver not loaded" in text
    status = d.ctl("status").stdout
    assert "driver not loaded" in status


def collect(client: Any, topics: list[str]) -> queue.Queue[dict[str, Any]]:
    events: queue.Queue[dict[str, Any]] = queue.Queue()

    def run() -> None:
        try:
            for event in client.subscribe(topics):
                events.put(event)
        except Exception:  # the connection closes when the test ends
            pass

    threading.Thread(target=run, daemon=True).start()
    return events


def wait_for(events: queue.Queue[dict[str, Any]], ok: Any, timeout: float = 10) -> list[dict]:
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            seen.append(events.get(timeout=max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            break
        if ok(seen):
            return seen
    raise AssertionError(f"expected events did not arrive; saw {seen}")


def test_fake_gpus_are_reported_and_changes_are_published(velod_factory: Any,
                                                          tmp_path: Path) -> None:
    table = write_gpu_table(tmp_path / "nvml.json", [
        gpu("NVIDIA GeForce RTX 4090", memory_total=24 * GiB, memory_used=2 * GiB,
            utilization_gpu=37, temperature=55),
        gpu("NVIDIA RTX A6000", memory_total=48 * GiB, memory_used=0,
            raise_={"nvmlDeviceGetTemperature": "NotSupported"}),
    ])
    d = velod_factory(FAST, env=nvml_env(table))
    result = json.loads(d.ctl("hw", "--json").stdout)
    gpus = result["snapshot"]["gpus"]
    assert [(g["name"], g["memory_total"], g["memory_used"]) for g in gpus] == [
        ("NVIDIA GeForce RTX 4090", 24 * GiB, 2 * GiB), ("NVIDIA RTX A6000", 48 * GiB, 0)]
    assert gpus[1]["temperature"] is None
    text = d.ctl("hw").stdout.splitlines()
    line0 = next(line for line in text if line.startswith("GPU 0"))
    assert "NVIDIA GeForce RTX 4090" in line0 and "2.0 GiB / 24.0 GiB" in line0
    assert "37%" in line0 and "55°C" in line0
    assert "No GPU found" not in "\n".join(text)

    events = collect(d.client(), ["hardware.*"])
    wait_for(events, lambda seen: any(e["topic"] == "hardware.snapshot" for e in seen))
    # Another process takes 10 GiB on GPU 0 and the A6000 vanishes.
    write_gpu_table(table, [gpu("NVIDIA GeForce RTX 4090", memory_total=24 * GiB,
                                memory_used=12 * GiB, utilization_gpu=90, temperature=70,
                                processes=[{"pid": 999999, "used_memory": 10 * GiB}])])

    def changes(seen: list[dict]) -> list[tuple[str, int | None]]:
        return [(c["kind"], c["gpu"]) for e in seen if e["topic"] == "hardware.changed"
                for c in e["data"]["changes"]]

    seen = wait_for(events, lambda s: ("gpu_removed", 1) in changes(s))
    # (A poll that straddles the table swap may add a transient gpu_error for GPU 1.)
    assert {("vram_free", 0), ("gpu_process_started", 0), ("gpu_removed", 1)} <= \
        set(changes(seen))
    vram = next(c for e in seen if e["topic"] == "hardware.changed"
                for c in e["data"]["changes"] if c["kind"] == "vram_free")
    assert (vram["old"], vram["new"]) == (22 * GiB, 12 * GiB)
    assert "GPU 0" in vram["message"]
    history = d.call("hardware.history", {"limit": 5})
    assert 1 <= len(history["samples"]) <= 5


def test_hw_watch_prints_blocks_until_ctrl_c_and_exits_0(velod_factory: Any,
                                                          tmp_path: Path) -> None:
    table = write_gpu_table(tmp_path / "nvml.json", [gpu("NVIDIA L4", memory_total=24 * GiB)])
    d = velod_factory(FAST, env=nvml_env(table))
    proc = subprocess.Popen([*velodctl_command(), "--socket", str(d.socket), "hw", "--watch",
                             "--interval", "0.2"], stdout=subprocess.PIPE, text=True,
                            env=d.env)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    blocks = [b for b in out.split("\n\n") if b.strip()]
    assert len(blocks) >= 3  # not a terminal: plain repeated blocks, no escape codes
    assert "\x1b[" not in out
    assert all("GPU 0" in b and "NVIDIA L4" in b for b in blocks)


def test_hw_watch_on_a_terminal_redraws_in_place(velod_factory: Any, tmp_path: Path) -> None:
    table = write_gpu_table(tmp_path / "nvml.json", [gpu("NVIDIA L4", memory_total=24 * GiB)])
    d = velod_factory(FAST, env=nvml_env(table))
    master, slave = os.openpty()
    proc = subprocess.Popen([*velodctl_command(), "--socket", str(d.socket), "hw", "--watch",
                             "--interval", "0.2"], stdout=slave, env=d.env)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 10
    while out.count(b"\x1b[H\x1b[2J") < 3 and time.monotonic() < deadline:
        if select.select([master], [], [], 0.5)[0]:
            out += os.read(master, 65536)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    os.close(master)
    frames = [f for f in out.split(b"\x1b[H\x1b[2J") if f.strip()]
    assert len(frames) >= 3
    assert all(b"NVIDIA L4" in f for f in frames)
