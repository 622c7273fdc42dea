"""GPU test plumbing: a shared CUDA backend, and clean skips where CUDA cannot run.

Tests that take the ``cuda_backend`` fixture or carry the ``gpu`` marker are skipped, with the
reason printed in the header and in ``-rs``, when PyCUDA, the driver, a device or nvcc is
missing. Other tests here (NVML, ...) decide for themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from velod.kernels import cuda_unavailable_reason

CUDA_REASON = cuda_unavailable_reason()
SKIP_CUDA = pytest.mark.skip(reason=f"needs CUDA through PyCUDA: {CUDA_REASON}")


def pytest_report_header(config) -> str:
    if CUDA_REASON is None:
        return "velod GPU tests: CUDA available through PyCUDA"
    return f"velod GPU tests: CUDA kernel tests will be SKIPPED: {CUDA_REASON}"


def pytest_collection_modifyitems(config, items) -> None:
    if CUDA_REASON is None:
        return
    here = Path(__file__).parent
    for item in items:
        if here not in Path(item.path).parents:
            continue
        if "cuda_backend" in getattr(item, "fixturenames", ()) or item.get_closest_marker("gpu"):
            item.add_marker(SKIP_CUDA)


@pytest.fixture(scope="session")
def cuda_backend(tmp_path_factory):
    """One CudaBackend for the session; kernels compile into $VELOD_KERNEL_CACHE or a temp dir."""
    if CUDA_REASON is not None:
        pytest.skip(f"needs CUDA through PyCUDA: {CUDA_REASON}")
    from velod.kernels import get_backend

    cache = os.environ.get("VELOD_KERNEL_CACHE")
    # The process's one backend for device 0: the engine tests' build_engine gets it too.
    backend = get_backend("cuda", cache_dir=Path(cache) if cache
                          else tmp_path_factory.mktemp("cubin"))
    print(f"\nCUDA device: {backend.device_name} ({backend.arch}, {backend.num_sms} SMs)")
    backend.precompile()  # every kernel module of the three dtypes, nvcc runs in parallel
    return backend
