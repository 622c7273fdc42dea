"""The CPU emulator of velod's CUDA kernels (``kernel_emulator.cpp``), built once per session.

Each CUDA thread is an OS thread, barriers and warp shuffles are emulated and cp.async copies
land only at wait_group. Buffers are exactly sized and the emulator is built with
AddressSanitizer, so a read outside any array aborts.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from velod.kernels.layout import DTYPE_NAMES

HERE = Path(__file__).parent
EMULATOR_SOURCE = HERE / "kernel_emulator.cpp"
KERNEL_DIR = HERE.parents[2] / "velod" / "kernels"
CUDA_INCLUDE = Path("/usr/local/cuda/include")
CXX = shutil.which("g++")

NEEDS_EMULATOR = pytest.mark.skipif(
    CXX is None or not (CUDA_INCLUDE / "cuda_fp16.h").exists(),
    reason="needs g++ and the CUDA headers (cuda_fp16.h) in /usr/local/cuda/include")


def _sanitizer_flags() -> list[str]:
    probe = subprocess.run([CXX, "-fsanitize=address", "-x", "c++", "-", "-o", "/dev/null"],
                           input="int main(){}", capture_output=True, text=True)
    return ["-fsanitize=address"] if probe.returncode == 0 else []


@pytest.fixture(scope="session")
def emulators(tmp_path_factory) -> dict[str, Path]:
    """One emulator binary per cache dtype, built in parallel (-O0: builds in seconds)."""
    out = tmp_path_factory.mktemp("emulator")
    flags = _sanitizer_flags()
    digest = hashlib.sha256(EMULATOR_SOURCE.read_bytes())
    for source in sorted(KERNEL_DIR.glob("*.cu*")):
        digest.update(source.read_bytes())

    def build(name: str) -> Path:
        binary = out / f"emulator-{name}-{digest.hexdigest()[:12]}"
        command = [CXX, "-std=c++20", "-O0", *flags, f"-DVELOD_ONLY_{name.upper()}",
                   f"-I{CUDA_INCLUDE}", "-o", str(binary), str(EMULATOR_SOURCE), "-lpthread"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        return binary

    names = sorted(DTYPE_NAMES.values())
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(names, pool.map(build, names), strict=True))


def run_emulator(binary: Path, op: str, kernel: str, workdir: Path, params: dict,
                 arrays: dict[str, np.ndarray], timeout: float = 300) -> None:
    """Writes ``params`` and ``arrays`` (as NAME.bin) to ``workdir`` and runs one emulator op."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.txt").write_text("".join(f"{k} {v!r}\n" for k, v in params.items()))
    for name, array in arrays.items():
        np.ascontiguousarray(array).tofile(workdir / f"{name}.bin")
    result = subprocess.run([str(binary), op, kernel, str(workdir)], capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
