"""`pip install '.[cuda]'` checks for what PyCUDA's build needs before building it, and names
what is missing (packaging/cuda-check is the [cuda] extra's first and only requirement)."""

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "packaging" / "cuda-check"

spec = importlib.util.spec_from_file_location("cuda_check", SHIM / "cuda_check.py")
cuda_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda_check)


def toolkit(tmp_path: Path, *, nvcc=True, header=True, stub=True) -> Path:
    root = tmp_path / "cuda"
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "lib64" / "stubs").mkdir(parents=True)
    if nvcc:
        (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
        (root / "bin" / "nvcc").chmod(0o755)
    if header:
        (root / "include" / "cuda.h").write_text("/* CUDA driver API */\n")
    if stub:
        (root / "lib64" / "stubs" / "libcuda.so").write_text("")
    return root


def compilers(tmp_path: Path, *names: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


def lacks(tmp_path: Path, root: Path | None, path: str) -> list[str]:
    env = {"PATH": path, **({"CUDA_HOME": str(root)} if root else {})}
    include = tmp_path / "py"
    include.mkdir(exist_ok=True)
    (include / "Python.h").write_text("")
    return cuda_check.missing(env, python_include=str(include))


def test_a_complete_toolkit_passes(tmp_path):
    assert lacks(tmp_path, toolkit(tmp_path), compilers(tmp_path, "c++")) == []


@pytest.mark.parametrize(("part", "named"), [("nvcc", "nvcc, the CUDA compiler"),
                                             ("header", "cuda.h"), ("stub", "libcuda.so")])
def test_each_missing_piece_is_named(tmp_path, part, named):
    root = toolkit(tmp_path, **{part: False})
    found = lacks(tmp_path, root, compilers(tmp_path, "g++"))
    if part == "stub" and any(Path(d, "libcuda.so").exists() for d in cuda_check.SYSTEM_LIB_DIRS):
        pytest.skip("this machine has a system libcuda.so")
    assert len(found) == 1 and found[0].startswith(named), found


def test_no_compiler_is_named_too(tmp_path):
    found = lacks(tmp_path, toolkit(tmp_path), compilers(tmp_path))
    assert found == ["a C++ compiler (c++ or g++): install build-essential or gcc-c++"]


def test_a_driver_without_an_unversioned_library_gets_a_precise_hint(tmp_path):
    root = toolkit(tmp_path, stub=False)
    driver = tmp_path / "driver"
    driver.mkdir()
    (driver / "libcuda.so.1").write_text("")
    env = {"PATH": compilers(tmp_path, "c++"), "CUDA_HOME": str(root),
           "LD_LIBRARY_PATH": str(driver)}
    if any(Path(d, "libcuda.so").exists() for d in cuda_check.SYSTEM_LIB_DIRS):
        pytest.skip("this machine has a system libcuda.so")
    (found,) = cuda_check.missing(env, python_include=sysconfig_include())
    assert f"the driver's {driver / 'libcuda.so.1'} is there" in found


def sysconfig_include() -> str:
    import sysconfig

    return sysconfig.get_paths()["include"]


def test_pip_stops_at_the_first_build_hook_with_the_report(tmp_path):
    # The hook pip calls first, in a clean process, on a machine with nothing CUDA at all.
    env = {"PATH": compilers(tmp_path, "c++"), "CUDA_HOME": str(tmp_path / "no-cuda"),
           "PYTHONPATH": str(SHIM)}
    result = subprocess.run([sys.executable, "-c", "import cuda_check; "
                             "cuda_check.get_requires_for_build_wheel()"],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "velod[cuda] builds PyCUDA, which needs the CUDA toolkit" in result.stderr
    assert "nvcc, the CUDA compiler" in result.stderr and "cuda.h" in result.stderr
    assert "Traceback" not in result.stderr
    skipped = subprocess.run([sys.executable, "-c", "import cuda_check; cuda_check.check()"],
                             capture_output=True, text=True, cwd=tmp_path,
                             env={**env, "VELOD_SKIP_CUDA_CHECK": "1"})
    assert skipped.returncode == 0


def test_the_cuda_extra_is_the_check_and_the_check_brings_pycuda():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["cuda"] == ["velod-cuda @ file:packaging/cuda-check"]
    shim = tomllib.loads((SHIM / "pyproject.toml").read_text())
    assert shim["project"]["name"] == "velod-cuda"
    assert shim["project"]["dependencies"] == ["pycuda>=2024.1"]
    assert shim["build-system"]["build-backend"] == "cuda_check"
    assert os.path.exists(SHIM / (shim["build-system"]["build-backend"] + ".py"))
