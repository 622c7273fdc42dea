#!/usr/bin/env bash
# GPU check for velod: install PyCUDA offline, run the GPU tests and the benchmarks.
#
# usage: tools/gpu_check.sh OUTDIR [--install-only]
#        tools/gpu_check.sh --carry-size      (on the development machine: what would travel)
#
# Needs: Linux, an NVIDIA GPU, the CUDA toolkit (nvcc + headers, libcublas), a C++ compiler,
# python3 with numpy, pyyaml, psutil, pytest and setuptools. No network: PyCUDA is built from
# the source archive in .gpu/ at the repository root; it, gguf and their pure-Python needs come
# from the wheels beside it. Filling .gpu/ (on a machine with network, Python 3.12 targets):
#   pip download --no-deps --no-binary pycuda -d .gpu pycuda
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .gpu \
#       pytools platformdirs mako markupsafe siphash24 typing_extensions gguf
# (about 2.2 MB; `tools/gpu_check.sh --carry-size` checks what travels against 64 MiB).
# Everything it writes goes to OUTDIR:
#   install.log             PyCUDA build and the wheels
#   env.txt                 GPU, driver, CUDA, python versions
#   pytest_gpu.log          pytest tests/gpu -v (kernels, model ops, cuBLAS, graphs, runner)
#   gpu_model.json/.log     bench/gpu_model.py: greedy CUDA vs CPU, Llama-3-8B-shaped load,
#                           prefill TFLOP/s, decode at batch 1/16/64 against the roofline
#   attention.json/.log     bench/attention.py (when time is left)
#   engine.json/.log        bench/engine.py --gpu (when time is left)
#   summary.txt             one line per step with its exit status, then the key figures
# Installs go to .gpu/site (on PYTHONPATH for the steps), not into the machine's Python.
# Time: the device tool allows 600 s per command, so the whole script runs under one budget
# ($VELOD_GPU_BUDGET_S, default 560 s): each step gets its own limit or what is left of the
# budget, whichever is less, and the lower-priority benchmarks run only if enough is left.
# Expected on an H200 (estimates: the new steps have not run on a GPU yet): PyCUDA build
# ~40 s, GPU tests ~2 min, bench/gpu_model.py ~3-4 min (writing the 16 GB model ~1 min),
# attention and engine benchmarks ~1 min together.
# The real Gemma 3 270M (253 MB) cannot travel within 64 MiB; where $VELOD_GEMMA_GGUF names it
# on the machine, the greedy check uses it, else a random model of its shapes built there.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

carry_size() {  # bytes that travel: tracked and untracked-not-ignored files, plus .gpu/
    cd "$ROOT" || return 1
    local tree gpu
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null \
        | awk 'END {print $1}')
    gpu=$(find .gpu -maxdepth 1 -type f -printf '%s\n' 2>/dev/null | awk '{s+=$1} END {print s+0}')
    echo "working tree: $tree bytes; .gpu/ (carried): $gpu bytes; limit: $((64 * 1024 * 1024))"
    (( tree + gpu <= 64 * 1024 * 1024 ))
}
if [[ "${1:-}" == "--carry-size" ]]; then
    carry_size && echo "fits" || { echo "TOO LARGE to travel"; exit 1; }
    exit 0
fi

OUT=${1:?usage: tools/gpu_check.sh OUTDIR [--install-only] | --carry-size}
INSTALL_ONLY=${2:-}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${VELOD_GPU_BUDGET_S:-560}
# Everything installed goes to .gpu/site (git-ignored), never into the machine's Python: no
# permission or externally-managed-environment trouble, and nothing left behind.
SITE="$ROOT/.gpu/site"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PIP_OFFLINE=(-m pip install --no-index --find-links "$ROOT/.gpu" --target "$SITE")
JOBS=$(nproc 2>/dev/null || echo 4)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

note() { echo "[gpu_check $(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

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
    # Build tools, only if the machine lacks them.
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

step() {  # step NAME LOGFILE LIMIT_S CMD...: runs with min(LIMIT_S, what the budget leaves)
    local name=$1 log=$2 limit=$3 rc start budget
    shift 3
    budget=$(( $(left) - 5 ))
    (( budget < limit )) && limit=$budget
    if (( limit < 20 )); then
        note "SKIP $name: the time budget is spent"
        return 1
    fi
    start=$(date +%s)
    note "start $name (limit ${limit}s)"
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    note "$name rc=$rc in $(( $(date +%s) - start ))s (log: $(basename "$log"))"
    return $rc
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null) $(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l) files changed"
    echo "python: $("$PY" -V 2>&1)  numpy: $("$PY" -c 'import numpy; print(numpy.__version__)' 2>&1)"
    echo "nvcc: $( (command -v nvcc >/dev/null && nvcc --version || /usr/local/cuda/bin/nvcc --version) 2>&1 | tail -n 1)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
        --format=csv 2>&1
} >"$OUT/env.txt"

note "start install (budget ${BUDGET}s)"
install_pycuda >"$OUT/install.log" 2>&1 || { note "FAIL PyCUDA install (see install.log)"; exit 1; }
# gguf (velod reads models with it) without its needs, which the machine has (numpy, pyyaml,
# requests, tqdm); --target would otherwise try to install them again from .gpu/.
"$PY" -c "import gguf" 2>/dev/null \
    || "$PY" "${PIP_OFFLINE[@]}" --no-deps "$ROOT"/.gpu/gguf-*.whl >>"$OUT/install.log" 2>&1 \
    || { note "FAIL gguf not installable from .gpu/"; exit 1; }
note "install done"
"$PY" -c "import pytest" 2>/dev/null || { note "FAIL pytest missing"; exit 1; }
"$PY" -c "import pynvml" 2>/dev/null || note "nvidia-ml-py missing: the NVML test will skip"
[[ "$INSTALL_ONLY" == "--install-only" ]] && exit 0

cd "$ROOT"
export VELOD_KERNEL_CACHE="$OUT/kernel-cache"   # fresh compile cache; timings exclude it
overall=0
step cuda_probe "$OUT/cuda_probe.log" 60 "$PY" -c "
import sys
from velod.kernels import cuda_unavailable_reason
from velod.kernels.cublas import load_library
from velod.kernels.graphs import load_driver
reason = cuda_unavailable_reason()
print(reason or 'CUDA usable through PyCUDA')
load_library(); load_driver()
print('libcublas and the driver graph API load through ctypes')
sys.exit(1 if reason else 0)" || { overall=1; cat "$OUT/cuda_probe.log" | tee -a "$SUMMARY"; }
# Every GPU test under tests/gpu (other issues add theirs there). A test that hangs fails after
# 120 s instead of eating the budget. With pytest-xdist, two worker processes: faster, and a
# worker that crashes (a fault in native code) is reported and replaced.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 2)
step pytest_gpu "$OUT/pytest_gpu.log" 240 "$PY" -m pytest tests/gpu -v -rs -p no:cacheprovider \
    -o timeout=120 "${XDIST[@]}" || overall=1
GREEDY=()
[[ -n "${VELOD_GEMMA_GGUF:-}" && -f "${VELOD_GEMMA_GGUF}" ]] && GREEDY=(--greedy-model "$VELOD_GEMMA_GGUF")
step bench_gpu_model "$OUT/gpu_model.log" 330 "$PY" bench/gpu_model.py --out "$OUT/gpu_model.json" \
    --work "$ROOT/.gpu/work" "${GREEDY[@]}" || overall=1
rm -rf "$ROOT/.gpu/work"  # the 16 GB model, if a limit cut the benchmark short
if (( $(left) > 75 )); then
    step bench_attention "$OUT/attention.log" 60 "$PY" bench/attention.py --backend cuda \
        --out "$OUT/attention.json" || overall=1
fi
if (( $(left) > 55 )) && [[ -f bench/engine.py ]]; then
    step bench_engine "$OUT/engine.log" 45 \
        bash -c "\"$PY\" bench/engine.py --gpu --budget-s 25 > \"$OUT/engine.json\"" || overall=1
fi
tail -n 3 "$OUT/pytest_gpu.log" | tee -a "$SUMMARY"
"$PY" - "$OUT/gpu_model.json" <<'PY' 2>&1 | tee -a "$SUMMARY"
import json
import sys

try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    sys.exit(f"gpu_model.json: {exc}")
g = r.get("greedy", {})
print(f"greedy: passed={g.get('passed')} identical={g.get('identical_prompts')}/"
      f"{g.get('prompts')} real_model={g.get('real_model')} {g.get('error', '')}")
m = r.get("llama8b", {})
if "error" in m:
    print("llama8b:", m["error"])
load, pre = m.get("load", {}), m.get("prefill", {})
print(f"load: {load.get('seconds')} s, peak/resident {load.get('peak_over_resident')}")
print(f"prefill: {pre.get('tflops')} TFLOP/s = {pre.get('fraction_of_peak')} of peak")
for d in m.get("decode", []):
    print(f"decode b{d['batch']}: {d['step_ms']} ms (graph {d['graph_device_ms']} ms, host "
          f"{d['runner_host_share']}), {d['step_over_roofline']}x roofline, "
          f"{d['fraction_of_roofline_tokens_per_s']} of roofline tok/s")
PY
note "done overall=$overall"
exit $overall
