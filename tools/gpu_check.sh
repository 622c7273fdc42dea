#!/usr/bin/env bash
# GPU check for velod: install PyCUDA offline, run the GPU tests and the benchmarks.
#
# usage: tools/gpu_check.sh OUTDIR [--install-only]
#
# Needs: Linux, an NVIDIA GPU, the CUDA toolkit (nvcc + headers), a C++ compiler, python3
# with numpy and setuptools (torch optional). No network: PyCUDA is built from the source
# archive in .gpu/ at the repository root, its dependencies come from the wheels beside it.
# Filling .gpu/ (on a machine with network; the pycuda sdist is fetched as a file because
# `pip download` would try to configure it):
#   curl -LO https://files.pythonhosted.org/.../pycuda-2026.1.tar.gz      (PyPI file URL)
#   for v in 3.11 3.12 3.13; do pip download -d .gpu --only-binary=:all: --python-version $v \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#       pytools platformdirs mako markupsafe siphash24 typing_extensions; done
#   pip download -d .gpu --only-binary=:all: --no-deps setuptools wheel nvidia-ml-py
#   pip download -d .gpu --only-binary=:all: --python-version 3.12 pytest
# Everything it writes goes to OUTDIR:
#   install.log           PyCUDA build and install
#   env.txt               GPU, driver, CUDA, python versions
#   pytest_gpu.log        pytest tests/gpu -v
#   attention.json/.log   bench/attention.py
#   engine.json/.log      bench/engine.py --gpu (only when that file exists)
#   summary.txt           one line per step with its exit status
# Installs go to .gpu/site (on PYTHONPATH for the steps), not into the machine's Python.
# Time: 2 min 36 s on a 16-core H200 machine on 2026-11-27 (PyCUDA build 37 s, GPU tests 49 s,
# attention benchmark 34 s, engine benchmark 27 s); with a PyCUDA already built in .gpu/site,
# under 2 minutes. Each step has its own limit (200, 150 and 150 s), so a hang cannot pass 9
# minutes.
set -uo pipefail

OUT=${1:?usage: tools/gpu_check.sh OUTDIR [--install-only]}
INSTALL_ONLY=${2:-}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
# Everything installed goes to .gpu/site (git-ignored), never into the machine's Python: no
# permission or externally-managed-environment trouble, and nothing left behind.
SITE="$ROOT/.gpu/site"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
PIP_OFFLINE=(-m pip install --no-index --find-links "$ROOT/.gpu" --target "$SITE")
JOBS=$(nproc 2>/dev/null || echo 4)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

note() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$SUMMARY"; }

find_cuda_root() {
    local nvcc
    for candidate in "${CUDA_ROOT:-}" "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
        if [[ -n "$candidate" && -f "$candidate/include/cuda.h" ]]; then
            echo "$candidate"; return 0
        fi
    done
    nvcc=$(command -v nvcc || true)
    [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]] && nvcc=/usr/local/cuda/bin/nvcc
    if [[ -n "$nvcc" ]]; then
        candidate=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
        if [[ -f "$candidate/include/cuda.h" ]]; then echo "$candidate"; return 0; fi
    fi
    for candidate in /usr/local/cuda /usr/local/cuda-*; do
        if [[ -f "$candidate/include/cuda.h" ]]; then echo "$candidate"; return 0; fi
    done
    return 1
}

# Directory holding a libcuda.so to link against: the toolkit's stub, or a link to the
# driver's libcuda.so.1 (driver packages often ship no unversioned libcuda.so).
# $LIBCUDA names a libcuda.so file explicitly.
libcuda_dir() {
    local cuda_root=$1 dir lib
    for dir in "$cuda_root/lib64/stubs" "$cuda_root/targets/x86_64-linux/lib/stubs" \
               "$cuda_root/lib/stubs"; do
        [[ -z "${LIBCUDA:-}" && -f "$dir/libcuda.so" ]] && { echo "$dir"; return 0; }
    done
    # The driver's library: the loader cache, the library path (containers often mount the
    # driver under /usr/local/nvidia and point LD_LIBRARY_PATH there), the usual places.
    lib=${LIBCUDA:-$( (ldconfig -p 2>/dev/null | awk '/libcuda\.so(\.1)? /{print $NF}'
        IFS=: read -ra dirs <<<"${LD_LIBRARY_PATH:-}"
        for d in "${dirs[@]}" /usr/local/nvidia/lib64 /usr/local/nvidia/lib \
                 /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib/wsl/lib; do
            [[ -n "$d" ]] && ls "$d"/libcuda.so* 2>/dev/null
        done) | head -n 1)}
    [[ -n "$lib" && -e "$lib" ]] || return 1
    dir=$(mktemp -d)
    ln -s "$(readlink -f "$lib")" "$dir/libcuda.so"
    echo "$dir"
}

install_pycuda() {
    if "$PY" -c "import pycuda.driver" 2>/dev/null; then
        note "pycuda already importable: $("$PY" -c 'import pycuda; print(pycuda.VERSION_TEXT)')"
        return 0
    fi
    rm -rf "$SITE"  # a stale or foreign build (other Python, no driver) is rebuilt
    local cuda_root src archive libdir
    cuda_root=$(find_cuda_root) || { note "FAIL no CUDA toolkit (cuda.h) found"; return 1; }
    libdir=$(libcuda_dir "$cuda_root") || { note "FAIL no libcuda.so (driver) found"; return 1; }
    archive=$(ls "$ROOT"/.gpu/pycuda-*.tar.gz 2>/dev/null | sort -V | tail -n 1)
    [[ -n "$archive" ]] || { note "FAIL no .gpu/pycuda-*.tar.gz beside the checkout"; return 1; }
    note "building $(basename "$archive") against $cuda_root, libcuda in $libdir, $JOBS jobs"
    # Build tools, only if the machine lacks them (the wheels are in .gpu/ too).
    "$PY" -c "import setuptools, wheel" 2>/dev/null || "$PY" "${PIP_OFFLINE[@]}" setuptools wheel
    src=$(mktemp -d)
    tar xzf "$archive" -C "$src" && src=$(echo "$src"/pycuda-*)
    # configure.py writes siteconf.py (so setup.py skips its 10-second countdown); curand off
    # because velod never uses it and some toolkits ship without it. The stub libcuda in
    # lib64/stubs is enough to link; the driver's libcuda.so.1 is used at run time.
    (cd "$src" && "$PY" configure.py --cuda-root="$cuda_root" --no-cuda-enable-curand \
        --cuda-inc-dir="$cuda_root/include" --cudadrv-lib-dir="$libdir,$cuda_root/lib64") || return 1
    # setuptools compiles one extension's files one at a time; prebuild them in parallel so
    # that pip's own build finds the extension up to date (pip builds the directory in place).
    (cd "$src" && "$PY" - "$JOBS" <<'PY') || note "parallel prebuild failed; pip builds serially"
import runpy
import sys
from concurrent.futures import ThreadPoolExecutor

import setuptools  # noqa: F401  (provides distutils)
from distutils import ccompiler

jobs = int(sys.argv[1])


def compile_parallel(self, sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                     extra_preargs=None, extra_postargs=None, depends=None):
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)

    def one(obj):
        src, ext = build[obj]
        self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, objects))
    return objects


ccompiler.CCompiler.compile = compile_parallel
sys.argv = ["setup.py", "build_ext"]
runpy.run_path("setup.py", run_name="__main__")
PY
    # One resolve: pycuda plus pytools, platformdirs, mako, markupsafe, siphash24, ...
    PATH="$cuda_root/bin:$PATH" "$PY" "${PIP_OFFLINE[@]}" -v --no-build-isolation "$src" \
        || return 1
    rm -rf "$src"
    "$PY" -c "import pycuda; print('pycuda', pycuda.VERSION_TEXT)"
}

step() {  # step NAME LOGFILE TIMEOUT_S CMD...
    local name=$1 log=$2 limit=$3 rc start
    shift 3
    start=$(date +%s)
    note "start $name"
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$log" 2>&1
    rc=$?
    note "$name rc=$rc in $(( $(date +%s) - start ))s (log: $(basename "$log"))"
    return $rc
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "python: $("$PY" -V 2>&1)  numpy: $("$PY" -c 'import numpy; print(numpy.__version__)' 2>&1)"
    echo "torch: $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1 | tail -n 1)"
    echo "nvcc: $( (command -v nvcc >/dev/null && nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>&1 | tail -n 1)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv 2>&1
} >"$OUT/env.txt"

note "start install"
install_pycuda >"$OUT/install.log" 2>&1 || { note "FAIL PyCUDA install (see install.log)"; exit 1; }
note "install done"
"$PY" -c "import pytest" 2>/dev/null \
    || "$PY" "${PIP_OFFLINE[@]}" pytest >>"$OUT/install.log" 2>&1 \
    || { note "FAIL pytest missing and not installable from .gpu/"; exit 1; }
# NVML bindings for the hardware GPU test; optional (that test skips without them).
"$PY" -c "import pynvml" 2>/dev/null \
    || "$PY" "${PIP_OFFLINE[@]}" nvidia-ml-py >>"$OUT/install.log" 2>&1 \
    || note "nvidia-ml-py not installed: the NVML test will skip"
[[ "$INSTALL_ONLY" == "--install-only" ]] && exit 0

cd "$ROOT"
export VELOD_KERNEL_CACHE="$OUT/kernel-cache"   # fresh compile cache; timings exclude it
overall=0
step cuda_probe "$OUT/cuda_probe.log" 60 "$PY" -c "
import sys
from velod.kernels import cuda_unavailable_reason
reason = cuda_unavailable_reason()
print(reason or 'CUDA usable through PyCUDA')
sys.exit(1 if reason else 0)" || { overall=1; cat "$OUT/cuda_probe.log" | tee -a "$SUMMARY"; }
# Every GPU test under tests/gpu (other issues add theirs there).
# A test that hangs (a kernel that never ends) fails after 90 s instead of eating the budget.
# With pytest-xdist, two worker processes: faster, and a worker that crashes (a fault in
# native code) is reported and replaced instead of ending the run.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 2)
step pytest_gpu "$OUT/pytest_gpu.log" 200 "$PY" -m pytest tests/gpu -v -rs -p no:cacheprovider \
    -o timeout=90 "${XDIST[@]}" || overall=1
step bench_attention "$OUT/attention.log" 150 "$PY" bench/attention.py --backend cuda \
    --out "$OUT/attention.json" || overall=1
if [[ -f bench/engine.py ]]; then
    step bench_engine "$OUT/engine.log" 150 \
        bash -c "\"$PY\" bench/engine.py --gpu --budget-s 25 > \"$OUT/engine.json\"" \
        || overall=1
else
    note "skip bench_engine: bench/engine.py not present"
fi
tail -n 3 "$OUT/pytest_gpu.log" | tee -a "$SUMMARY"
note "done overall=$overall"
exit $overall
