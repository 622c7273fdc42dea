"""The text of ``velodctl hw`` from a ``hardware.get`` result."""

from __future__ import annotations

from typing import Any

from velod.hardware.cli import render

GiB = 1024**3


def result(gpus: list[dict[str, Any]], notes: dict[str, str] | None = None,
           sources: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"snapshot": {
        "gpus": gpus, "gpu_notes": notes or {},
        "cpu": {"model": "AMD EPYC 9654", "physical_cores": 96, "threads": 192,
                "freq_current_mhz": 2400.0, "flags": ["avx2", "avx512f"], "utilization": 3.0},
        "memory": {"total": 64 * GiB, "available": 48 * GiB, "swap_total": 8 * GiB,
                   "swap_used": GiB},
        "os": {"system": "Linux", "kernel": "6.1.0", "arch": "x86_64", "distro": "Debian 12"}},
        "sources": sources or {}}


def test_one_line_per_gpu_then_cpu_and_memory() -> None:
    text = render(result([
        {"index": 0, "vendor": "nvidia", "name": "NVIDIA H100 80GB HBM3", "memory_used": 3 * GiB,
         "memory_total": 80 * GiB, "utilization_gpu": 37.0, "temperature": 61.0,
         "power_draw": 187.4},
        {"index": 1, "vendor": "nvidia", "name": None, "error": "NVML: GPU is lost"},
    ]))
    lines = text.splitlines()
    assert lines[0].split() == ["GPU", "0", "NVIDIA", "H100", "80GB", "HBM3", "3.0", "GiB", "/",
                                "80.0", "GiB", "37%", "61°C", "187", "W"]
    assert lines[1].startswith("GPU 1") and "error: NVML: GPU is lost" in lines[1]
    assert lines[2] == ("CPU    AMD EPYC 9654, 96 cores / 192 threads, 2.40 GHz, 3% busy, "
                        "avx2 avx512f")
    assert lines[3] == "Memory 48.0 GiB available of 64.0 GiB, swap 1.0 GiB / 8.0 GiB"
    assert "No GPU" not in text


def test_without_gpus_it_says_why() -> None:
    text = render(result([], {"nvidia": "NVIDIA driver not loaded", "amd": "no AMD GPU"}))
    assert "No GPU found:\n  amd: no AMD GPU\n  nvidia: NVIDIA driver not loaded" in text


def test_a_failing_source_is_a_warning_line() -> None:
    text = render(result([], sources={"nvidia": {"state": "failing", "hung": True,
                                                 "error": "no answer within 10s",
                                                 "retry_in": 20.0}}))
    assert ("warning: nvidia source failing: no answer within 10s (call still hung); "
            "retrying in 20s") in text
