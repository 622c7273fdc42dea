"""What building PyCUDA needs, checked before pip tries: a PEP 517 backend around setuptools.

PyCUDA compiles C++ against the CUDA toolkit (``nvcc``, ``cuda.h``) and links with the
driver library (``libcuda.so``, or the toolkit's ``stubs/libcuda.so``). Without them its
build fails minutes in, with a compiler error. This backend runs the same checks first and
stops ``pip install '.[cuda]'`` with a list of what is missing and how to get it.
``VELOD_SKIP_CUDA_CHECK=1`` skips the check (for a toolkit in a place not looked at here).

Run as a script (``python cuda_check.py``) it prints the report and exits 1 when something
is missing.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

STUB_DIRS = ("lib64/stubs", "lib/stubs", "targets/x86_64-linux/lib/stubs",
             "targets/sbsa-linux/lib/stubs", "lib64", "lib")
SYSTEM_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                   "/usr/lib", "/usr/local/lib", "/usr/local/nvidia/lib64", "/usr/lib/wsl/lib")


def cuda_root(env: dict[str, str], which: object = shutil.which) -> Path | None:
    """The CUDA toolkit's directory, found the way PyCUDA's build finds it."""
    for key in ("CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"):
        if env.get(key):
            return Path(env[key])
    nvcc = which("nvcc", path=env.get("PATH", os.defpath))  # type: ignore[operator]
    if nvcc:
        real = Path(nvcc).resolve()
        wrapper = Path(nvcc)
        # a wrapper script on PATH (exec /usr/local/cuda-X/bin/nvcc) is not the toolkit
        for candidate in (real.parent.parent, wrapper.parent.parent, Path("/usr/local/cuda")):
            if (candidate / "include" / "cuda.h").is_file():
                return candidate
        return real.parent.parent
    default = Path("/usr/local/cuda")
    return default if default.is_dir() else None


def missing(env: dict[str, str] | None = None, which: object = shutil.which,
            python_include: str | None = None) -> list[str]:
    """One line per thing that building PyCUDA needs and this machine lacks."""
    env = dict(os.environ if env is None else env)
    path = env.get("PATH", os.defpath)
    root = cuda_root(env, which)
    lacks = []
    on_path = which("nvcc", path=path)  # type: ignore[operator]
    if root is None or not ((root / "bin" / "nvcc").exists() or on_path):
        lacks.append("nvcc, the CUDA compiler: not on PATH, not in $CUDA_HOME/bin or "
                     "/usr/local/cuda/bin (install the CUDA toolkit, or set CUDA_HOME)")
    if root is None or not (root / "include" / "cuda.h").is_file():
        where = f"{root}/include" if root else "the CUDA toolkit's include directory"
        lacks.append(f"cuda.h, the CUDA driver API header: not in {where}")
    lib_dirs = [root / d for d in STUB_DIRS] if root else []
    lib_dirs += [Path(d) for d in env.get("LD_LIBRARY_PATH", "").split(":") if d]
    lib_dirs += [Path(d) for d in SYSTEM_LIB_DIRS]
    if not any((d / "libcuda.so").exists() for d in lib_dirs):
        driver = next((d / "libcuda.so.1" for d in lib_dirs if (d / "libcuda.so.1").exists()),
                      None)
        hint = (f"the driver's {driver} is there, but the linker needs an unversioned "
                f"libcuda.so: link one to it in {driver.parent}, or install the toolkit's "
                "stubs" if driver else
                "install the NVIDIA driver, or the CUDA toolkit's stubs (lib64/stubs)")
        lacks.append(f"libcuda.so, the NVIDIA driver library PyCUDA links with: {hint}")
    if not (which("c++", path=path) or which("g++", path=path)):  # type: ignore[operator]
        lacks.append("a C++ compiler (c++ or g++): install build-essential or gcc-c++")
    include = python_include or sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        lacks.append(f"Python.h: not in {include} (install python3-dev)")
    return lacks


def report(lacks: list[str]) -> str:
    lines = ["velod[cuda] builds PyCUDA, which needs the CUDA toolkit; this machine lacks:"]
    lines += [f"  - {item}" for item in lacks]
    lines += ["velod runs without CUDA on its exact NumPy path: pip install .",
              "To build anyway: VELOD_SKIP_CUDA_CHECK=1 pip install '.[cuda]'"]
    return "\n".join(lines)


def check() -> None:
    """Stop the build with the report when something PyCUDA needs is missing."""
    if os.environ.get("VELOD_SKIP_CUDA_CHECK") == "1":
        return
    lacks = missing()
    if lacks:
        print(report(lacks), file=sys.stderr)
        raise SystemExit(1)


def _checked(hook: str) -> Callable[..., object]:
    """setuptools' ``hook``, run only once the check passed."""

    def run(*args: object, **kwargs: object) -> object:
        check()
        from setuptools import build_meta  # the build environment has it; a script may not

        return getattr(build_meta, hook)(*args, **kwargs)

    run.__name__ = hook
    return run


# The hooks pip calls (PEP 517 and 660); the first one pip calls stops a build that cannot work.
get_requires_for_build_wheel = _checked("get_requires_for_build_wheel")
prepare_metadata_for_build_wheel = _checked("prepare_metadata_for_build_wheel")
build_wheel = _checked("build_wheel")
get_requires_for_build_editable = _checked("get_requires_for_build_editable")
prepare_metadata_for_build_editable = _checked("prepare_metadata_for_build_editable")
build_editable = _checked("build_editable")
get_requires_for_build_sdist = _checked("get_requires_for_build_sdist")
build_sdist = _checked("build_sdist")


if __name__ == "__main__":
    found = missing()
    print(report(found) if found else f"CUDA toolkit found at {cuda_root(dict(os.environ))}; "
          "PyCUDA can be built")
    sys.exit(1 if found else 0)
