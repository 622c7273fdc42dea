"""On an NVIDIA machine: velod's NVML snapshot agrees with nvidia-smi taken in the same run.

nvidia-smi is used here only as the reference; velod itself never parses its output.
Skips cleanly without nvidia-ml-py, nvidia-smi or a working NVIDIA driver.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

MiB = 1024**2

pytest.importorskip("pynvml", reason="nvidia-ml-py (pynvml) is not installed")
SMI = shutil.which("nvidia-smi")
pytestmark = pytest.mark.skipif(SMI is None, reason="nvidia-smi not found: no NVIDIA driver")


def query_smi() -> list[dict[str, object]]:
    out = subprocess.run(
        [SMI, "--query-gpu=uuid,name,memory.total,memory.used", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, timeout=30, check=True).stdout
    rows = []
    for line in out.strip().splitlines():
        uuid, name, total, used = (field.strip() for field in line.split(","))
        rows.append({"uuid": uuid, "name": name, "total_mib": int(total), "used_mib": int(used)})
    return rows


def test_nvml_snapshot_agrees_with_nvidia_smi() -> None:
    from velod.hardware.nvml import NvmlSource

    source = NvmlSource()
    try:
        before = source.read()
        if not before.gpus:
            pytest.skip(f"NVML sees no GPU: {before.note}")
        smi = query_smi()
        after = source.read()
    finally:
        source.close()
    assert len(before.gpus) == len(smi), (before.gpus, smi)
    for gpu, gpu_after, ref in zip(before.gpus, after.gpus, smi, strict=True):
        assert gpu.error is None, gpu.error
        assert gpu.uuid == ref["uuid"]
        assert gpu.name == ref["name"]
        assert abs(gpu.memory_total // MiB - ref["total_mib"]) <= 1, (gpu.memory_total, ref)
        # Memory in use may move between the three reads; allow a small tolerance.
        tolerance = max(256, ref["total_mib"] // 50)
        low = min(gpu.memory_used, gpu_after.memory_used) // MiB - tolerance
        high = max(gpu.memory_used, gpu_after.memory_used) // MiB + tolerance
        assert low <= ref["used_mib"] <= high, (gpu.memory_used // MiB, ref)
        assert gpu.memory_free is not None and gpu.memory_free > 0
        assert gpu.compute_capability is not None and gpu.compute_capability[0] >= 3
