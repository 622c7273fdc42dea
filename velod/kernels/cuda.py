"""CUDA path: compile paged_attention.cu with nvcc, cache the cubin, launch through PyCUDA.

Compilation needs only nvcc (no PyCUDA, no device), so it is tested on any development machine;
loading and launching need PyCUDA and a device. The cubin for one architecture is cached on
disk under a key made of the source hash, the architecture, the options and the nvcc version,
so a restart loads it without compiling.

Arrays on the device are ``pycuda.gpuarray.GPUArray``; the launch wrappers also accept NumPy
arrays for the small index arguments (block tables, lengths, slots, pairs) and the query, and
upload them.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from velod.kernels.layout import (
    DTYPE_NAMES,
    KERNEL_THREADS,
    SUPPORTED_BLOCK_SIZES,
    SUPPORTED_HEAD_DIMS,
    AttentionArgumentError,
    check_attention_args,
    check_block_pairs,
    check_cache_write_args,
    check_context_lens,
    check_prefill_args,
    check_slots,
    plan_attention_launch,
    plan_prefill_launch,
)

SOURCE = Path(__file__).with_name("paged_attention.cu")
PREFILL_SOURCE = Path(__file__).with_name("prefill_attention.cu")
MODEL_OPS_SOURCE = Path(__file__).with_name("model_ops.cu")
NVCC_OPTIONS = ("-O3", "-std=c++17")
COMPILE_TIMEOUT_S = 600.0


class KernelCompileError(RuntimeError):
    """nvcc is missing or rejected the kernel source."""


def find_nvcc() -> str | None:
    """Path of nvcc: $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, then /usr/local/cuda/bin."""
    for env in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        root = os.environ.get(env)
        if root and os.access(Path(root, "bin", "nvcc"), os.X_OK):
            return str(Path(root, "bin", "nvcc"))
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return str(fallback) if os.access(fallback, os.X_OK) else None


@lru_cache(maxsize=8)
def nvcc_version(nvcc: str) -> str:
    """The last line of ``nvcc --version`` (the build string)."""
    result = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60,
                            check=True)
    return result.stdout.strip().splitlines()[-1]


def default_cache_dir() -> Path:
    """$VELOD_KERNEL_CACHE, else $XDG_CACHE_HOME/velod/kernels, else ~/.cache/velod/kernels."""
    explicit = os.environ.get("VELOD_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "velod" / "kernels"


def nvcc_command(nvcc: str, arch: str, source: Path, output: Path,
                 options: Sequence[str] = ()) -> list[str]:
    """The nvcc command line that builds one cubin."""
    return [nvcc, "-cubin", f"-arch={arch}", *NVCC_OPTIONS, *options, "-o", str(output),
            str(source)]


_LOCAL_INCLUDE = re.compile(rb'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"', re.M)


def source_bytes(source: Path) -> bytes:
    """``source`` and every header it includes with quotes (recursively, each once): what a
    cubin is built from, so that editing a shared header changes the cache key."""
    seen: list[Path] = []
    parts: list[bytes] = []

    def visit(path: Path) -> None:
        path = path.resolve()
        if path in seen:
            return
        seen.append(path)
        text = path.read_bytes()
        parts.append(text)
        for name in _LOCAL_INCLUDE.findall(text):
            visit(path.parent / name.decode())

    visit(source)
    return b"\0".join(parts)


def cache_key(source: bytes, arch: str, options: Sequence[str], compiler: str) -> str:
    """Hex digest naming a cubin: source, architecture, options and compiler version."""
    digest = hashlib.sha256(source)
    for part in (arch, *NVCC_OPTIONS, *options, compiler):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:24]


def compile_cubin(arch: str, options: Sequence[str] = (), *, cache_dir: Path | None = None,
                  nvcc: str | None = None, source: Path = SOURCE) -> Path:
    """Path of the cubin for ``arch`` (e.g. ``sm_90``), compiling it once per cache key."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise KernelCompileError(
            "nvcc not found: install the CUDA toolkit or set CUDA_HOME to its directory")
    key = cache_key(source_bytes(source), arch, options, nvcc_version(nvcc))
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = directory / f"{source.stem}-{arch}-{key}.cubin"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        partial = Path(scratch) / target.name
        command = nvcc_command(nvcc, arch, source, partial, options)
        try:
            result = subprocess.run(command, capture_output=True, text=True,
                                    timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise KernelCompileError(f"nvcc took over {COMPILE_TIMEOUT_S:.0f}s") from exc
        if result.returncode != 0:
            raise KernelCompileError(
                f"nvcc failed ({result.returncode}) for {arch}: {result.stderr.strip()[-4000:]}")
        os.replace(partial, target)  # atomic: a concurrent loader sees all or nothing
    return target


def attention_kernel_name(dtype: np.dtype, head_dim: int, block_size: int) -> str:
    return f"velod_paged_attention_{DTYPE_NAMES[np.dtype(dtype).name]}_d{head_dim}_b{block_size}"


def prefill_kernel_name(dtype: np.dtype, head_dim: int) -> str:
    return f"velod_prefill_attention_{DTYPE_NAMES[np.dtype(dtype).name]}_d{head_dim}"


def _index_name(dtype: np.dtype) -> str:
    return "i32" if np.dtype(dtype) == np.int32 else "i64"


def _host(array) -> np.ndarray:
    """A NumPy copy of a host or device array (for the small index arrays)."""
    return array.get() if hasattr(array, "get") else np.asarray(array)


class _Activation:
    """``with`` block that pushes a context unless this thread already has it pushed."""

    def __init__(self, context, context_class) -> None:
        self._context = context
        self._pop = context_class.pop
        self._depth = threading.local()

    def __enter__(self) -> None:
        depth = getattr(self._depth, "n", 0)
        if depth == 0:
            self._context.push()
        self._depth.n = depth + 1

    def __exit__(self, *exc) -> None:
        self._depth.n -= 1
        if self._depth.n == 0:
            self._pop()


class CudaBackend:
    """Paged attention, cache writes and block copies on one CUDA device through PyCUDA."""

    name = "cuda"
    on_device = True

    def __init__(self, device: int = 0, cache_dir: Path | None = None) -> None:
        import pycuda.driver as drv  # lazy: velod works without PyCUDA
        import pycuda.gpuarray as gpuarray

        self._drv = drv
        self._gpuarray = gpuarray
        drv.init()
        self.device = drv.Device(device)
        self.device_name = self.device.name()
        major, minor = self.device.compute_capability()
        self.arch = f"sm_{major}{minor}"
        self.tensor_cores = major >= 8  # the module's fp16/bf16 kernels use mma.sync
        self.num_sms = self.device.get_attribute(drv.device_attribute.MULTIPROCESSOR_COUNT)
        self._context = self.device.retain_primary_context()
        self._activation = _Activation(self._context, drv.Context)
        self._cache_dir = cache_dir
        self._lock = threading.Lock()
        self._modules: dict[tuple[str, ...], object] = {}    # (source, *options)
        self._functions: dict[tuple[str, ...], object] = {}  # (source, *options, name)
        self._workspace: dict[str, object] = {}
        self._keepalive: tuple = ()
        self._launches: dict[tuple, tuple] = {}  # attention calls, by argument shapes
        self._writes: dict[tuple, tuple] = {}    # cache writes, likewise
        self._staging: dict[str, object] = {}

    # ---- context, memory -------------------------------------------------------------------

    def active(self) -> _Activation:
        """Makes the device's primary context current in this thread for a ``with`` block.

        Nested blocks in one thread push nothing more (a push and pop costs a few
        microseconds, and every launch wrapper enters one).
        """
        return self._activation

    def free_memory(self) -> int:
        """Free bytes of device memory now."""
        with self.active():
            free, _total = self._drv.mem_get_info()
        return int(free)

    def clock(self) -> DeviceClock:
        return DeviceClock(self._drv)

    def to_device(self, array: np.ndarray):
        with self.active():
            return self._gpuarray.to_gpu(np.ascontiguousarray(array))

    def stage(self, name: str, array: np.ndarray):
        """``array`` copied into the reusable device buffer ``name``, as a device array.

        For the engine's per-step index arrays: no allocation per step (cuMemAlloc and the
        synchronizing cuMemFree cost tens of microseconds each). The buffer is overwritten by
        the next ``stage`` of the same name, so work queued on the previous contents must be
        finished (the engine synchronizes at the end of every step; the copy itself waits
        for queued work too). PyCUDA's DeviceMemoryPool is not used: a pooled block freed
        while no context is current aborts the process.
        """
        array = np.ascontiguousarray(array)
        with self.active():
            buffer = self._staging.get(name)
            if buffer is None or buffer.size < array.nbytes:
                buffer = self._gpuarray.empty(max(2 * array.nbytes, 4096), np.uint8)
                self._staging[name] = buffer
            if array.nbytes:
                self._drv.memcpy_htod(buffer.gpudata, array)
            return self._gpuarray.GPUArray(array.shape, array.dtype, gpudata=buffer.gpudata,
                                           base=buffer)

    def trim(self) -> None:
        """Frees the reusable device buffers (partition scratch, staging, the last launch's
        temporaries); they grow back on the next call. Only while no work is queued: the
        engine calls it when it releases its pool."""
        with self.active():
            self._workspace.clear()
            self._staging.clear()
            self._keepalive = ()

    def to_host(self, array) -> np.ndarray:
        if isinstance(array, np.ndarray):
            return array
        with self.active():
            return array.get()

    def empty(self, shape: tuple[int, ...], dtype) -> object:
        with self.active():
            return self._gpuarray.empty(shape, dtype)

    def synchronize(self) -> None:
        with self.active():
            self._drv.Context.synchronize()

    def _device(self, array):
        """A device array for ``array`` (uploads NumPy input; caller holds the context)."""
        if isinstance(array, np.ndarray):
            return self._gpuarray.to_gpu(np.ascontiguousarray(array))
        if not array.flags.c_contiguous:
            raise AttentionArgumentError("device arrays must be C-contiguous")
        return array

    # ---- modules ---------------------------------------------------------------------------

    def precompile(self, dtypes: Sequence[str] = ("f32", "f16", "bf16"), *,
                   sources: Sequence[Path] = (SOURCE, PREFILL_SOURCE, MODEL_OPS_SOURCE)
                   ) -> list[Path]:
        """Builds (or finds cached) the cubins of these sources for these cache dtypes (one
        module per source and dtype, as the kernels load them), nvcc runs in parallel."""
        from concurrent.futures import ThreadPoolExecutor

        def build(job: tuple[Path, str]) -> Path:
            source, name = job
            return compile_cubin(self.arch, (f"-DVELOD_ONLY_{name.upper()}",),
                                 cache_dir=self._cache_dir, source=source)

        jobs = [(source, name) for source in sources for name in dtypes]
        with ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            return list(pool.map(build, jobs))

    def function(self, source: Path, name: str, options: Sequence[str] = ()):
        """Kernel ``name`` of the CUDA C file ``source``, compiled for this device with
        ``options`` (the cubin cached on disk, see compile_cubin) and loaded once."""
        key = (str(source), *options)
        with self._lock:
            function = self._functions.get((*key, name))
            if function is not None:
                return function
            module = self._modules.get(key)
            if module is None:
                cubin = compile_cubin(self.arch, options, cache_dir=self._cache_dir,
                                      source=source)
                with self.active():
                    module = self._drv.module_from_file(str(cubin))
                self._modules[key] = module
            function = module.get_function(name)
            self._functions[(*key, name)] = function
            return function

    def _function(self, name: str, dtype_name: str):
        """Kernel ``name`` of paged_attention.cu's module for one cache dtype.

        Each dtype gets its own module (a third of the first compile); the cache-write and
        block-copy kernels are in every module.
        """
        return self.function(SOURCE, name, (f"-DVELOD_ONLY_{dtype_name.upper()}",))

    def _scratch(self, name: str, count: int):
        """A float32 device buffer of at least ``count`` elements, grown on demand."""
        buffer = self._workspace.get(name)
        if buffer is None or buffer.size < count:
            buffer = self._gpuarray.empty(max(count, 1), np.float32)
            self._workspace[name] = buffer
        return buffer

    # ---- kernels ---------------------------------------------------------------------------

    def paged_attention(self, query, key_cache, value_cache, block_tables, context_lens,
                        scale: float, *, partition_size: int | None = None, out=None,
                        stream=None, max_context: int | None = None,
                        window: int | None = None, workspace=None):
        """Decode attention output ``[num_seqs, num_heads, head_dim]`` as a device array.

        ``partition_size`` overrides the automatic choice (tests use it to hit partition
        boundaries); the call returns when the work is queued on ``stream``. The longest
        context sizes the grid: it is read from ``context_lens`` (a NumPy array is uploaded)
        unless ``max_context`` (which must be >= every length) is given with device-resident
        ``context_lens``, which keeps the call free of host-device copies and synchronization.
        ``window``: a sliding window of that many tokens (blocks before it are never read).
        ``workspace``: a float32 device array for the partitions' partial results (at least
        ``attention_workspace_size`` elements) instead of the backend's own, which grows and
        moves; a captured CUDA graph needs addresses that stay put.
        """
        if window is not None and window < 1:
            raise AttentionArgumentError(f"window must be >= 1 token, got {window}")
        with self.active():
            return self._paged_attention(query, key_cache, value_cache, block_tables,
                                         context_lens, scale, partition_size, out, stream,
                                         max_context, window or 0, workspace)

    def _paged_attention(self, query, key_cache, value_cache, block_tables, context_lens,
                         scale, partition_size, out, stream, max_context, window, workspace):
        on_device = not isinstance(context_lens, np.ndarray)
        lens_host = None
        if not (on_device and max_context is not None):
            lens_host = _host(context_lens)
            max_context = None
        # Every layer of an engine step makes the same call on other arrays: the checks and
        # the launch plan are done once per distinct shape and reused.
        key = (tuple(query.shape), tuple(key_cache.shape), tuple(value_cache.shape),
               tuple(block_tables.shape), tuple(context_lens.shape), query.dtype,
               key_cache.dtype, value_cache.dtype, block_tables.dtype, context_lens.dtype,
               max_context, partition_size)
        launch = self._launches.get(key)
        if launch is None or lens_host is not None:
            launch = self._plan_attention(query, key_cache, value_cache, block_tables,
                                          context_lens if lens_host is None else lens_host,
                                          partition_size, max_context)
            if lens_host is None:
                if len(self._launches) > 4096:
                    self._launches.clear()
                self._launches[key] = launch
        shape, dtype, plan, kernel, merge = launch
        if shape.num_seqs == 0:
            return out if out is not None else self.empty(tuple(query.shape), dtype)
        if out is not None and (tuple(out.shape) != tuple(query.shape) or out.dtype != dtype):
            raise AttentionArgumentError(
                f"out must be {tuple(query.shape)} {dtype.name}, got {tuple(out.shape)} "
                f"{np.dtype(out.dtype).name}")
        q = self._device(query)
        k, v = self._device(key_cache), self._device(value_cache)
        tables = self._device(block_tables)
        lens = self._device(context_lens if on_device else lens_host)
        if out is None:
            out = self._gpuarray.empty(tuple(query.shape), dtype)
        pointers = (int(q.gpudata), int(k.gpudata), int(v.gpudata), int(out.gpudata))
        if (pointers[0] | pointers[1] | pointers[2] | pointers[3]) & 15:
            raise AttentionArgumentError(
                "query, key_cache, value_cache and out must start on 16-byte boundaries")
        # Uploaded temporaries must outlive the queued launch.
        self._keepalive = (q, tables, lens)
        part_out = part_max = part_sum = 0
        if plan.max_parts > 1:
            rows = shape.num_seqs * shape.num_heads * plan.max_parts
            if workspace is None:
                part_out = int(self._scratch("part_out", rows * shape.head_dim).gpudata)
                part_max = int(self._scratch("part_max", rows).gpudata)
                part_sum = int(self._scratch("part_sum", rows).gpudata)
            else:
                if workspace.dtype != np.float32 or workspace.size < rows * (shape.head_dim + 2):
                    raise AttentionArgumentError(
                        f"workspace must hold {rows * (shape.head_dim + 2)} float32 values")
                part_out = int(workspace.gpudata)
                part_max = part_out + 4 * rows * shape.head_dim
                part_sum = part_max + 4 * rows
        kernel.prepared_async_call(
            plan.grid, (plan.threads, 1, 1), stream, pointers[3], part_out, part_max, part_sum,
            pointers[0], pointers[1], pointers[2], int(tables.gpudata), int(lens.gpudata),
            np.float32(scale * math.log2(math.e)), shape.num_heads, shape.num_kv_heads,
            plan.heads_per_block, shape.max_blocks_per_seq, plan.partition_size,
            plan.max_parts, window, shared_size=plan.smem_bytes)
        if plan.max_parts > 1:
            merge.prepared_async_call(
                (shape.num_heads, shape.num_seqs), (plan.threads, 1, 1), stream, pointers[3],
                part_out, part_max, part_sum, int(lens.gpudata), shape.num_heads,
                shape.head_dim, plan.partition_size, plan.max_parts, window)
        return out

    def attention_workspace_size(self, num_seqs: int, num_heads: int, head_dim: int,
                                 max_parts: int) -> int:
        """float32 elements a ``workspace`` needs for a call with these sizes and at most
        ``max_parts`` partitions (see ``plan_attention_launch``)."""
        return num_seqs * num_heads * max_parts * (head_dim + 2)

    def _plan_attention(self, query, key_cache, value_cache, block_tables, context_lens,
                        partition_size, max_context):
        """Checks a call's arguments; returns (shape, dtype, plan, kernel, merge kernel)."""
        if max_context is not None:
            shape = check_attention_args(query, key_cache, value_cache, block_tables,
                                         context_lens)
            probe = np.array([max_context], np.int32)
            check_context_lens(probe, replace(shape, num_seqs=1))
        else:
            shape = check_attention_args(query, key_cache, value_cache, block_tables,
                                         context_lens)
            check_context_lens(context_lens, shape)
            max_context = int(context_lens.max()) if context_lens.size else 0
        dtype = np.dtype(key_cache.dtype)
        if shape.head_dim not in SUPPORTED_HEAD_DIMS:
            raise AttentionArgumentError(
                f"head_dim {shape.head_dim} has no CUDA kernel; supported: {SUPPORTED_HEAD_DIMS}")
        if shape.block_size not in SUPPORTED_BLOCK_SIZES:
            raise AttentionArgumentError(
                f"block_size {shape.block_size} has no CUDA kernel; "
                f"supported: {SUPPORTED_BLOCK_SIZES}")
        plan = plan_attention_launch(shape, dtype.itemsize, max_context, self.num_sms,
                                     partition_size, tensor_cores=self.tensor_cores)
        dtype_option = DTYPE_NAMES[dtype.name]
        kernel = self._function(
            attention_kernel_name(dtype, shape.head_dim, shape.block_size), dtype_option)
        if not hasattr(kernel, "arg_format"):
            kernel.prepare([np.uintp] * 9 + [np.float32] + [np.int32] * 7)
        merge = self._function(f"velod_merge_partitions_{dtype_option}", dtype_option)
        if not hasattr(merge, "arg_format"):
            merge.prepare([np.uintp] * 5 + [np.int32] * 5)
        return shape, dtype, plan, kernel, merge

    def paged_prefill_attention(self, query, key_cache, value_cache, block_tables,
                                query_start_loc, context_lens, scale: float, *,
                                window: int | None = None, out=None, stream=None,
                                max_query_len: int | None = None):
        """Causal attention of packed prompt chunks, ``[num_tokens, num_heads, head_dim]``,
        as a device array (arguments as ``reference.paged_prefill_attention``).

        NumPy ``query_start_loc`` and ``context_lens`` are validated and uploaded. Device
        arrays are used as they are, with ``max_query_len`` (>= every sequence's row count)
        sizing the grid: the engine validates a step's indices once on the host.
        """
        if window is not None and window < 1:
            raise AttentionArgumentError(f"window must be >= 1 token, got {window}")
        with self.active():
            return self._prefill(query, key_cache, value_cache, block_tables, query_start_loc,
                                 context_lens, scale, window or 0, out, stream, max_query_len)

    def _prefill(self, query, key_cache, value_cache, block_tables, query_start_loc,
                 context_lens, scale, window, out, stream, max_query_len):
        host = isinstance(query_start_loc, np.ndarray) or max_query_len is None
        if host:
            starts, lens = _host(query_start_loc), _host(context_lens)
            shape = check_prefill_args(query, key_cache, value_cache, block_tables, starts,
                                       lens)
            max_query_len = int(np.diff(starts).max()) if len(starts) > 1 else 0
        else:
            stand_in = np.empty((len(context_lens), *query.shape[1:]), query.dtype)
            shape = check_attention_args(stand_in, key_cache, value_cache, block_tables,
                                         context_lens)
        dtype = np.dtype(key_cache.dtype)
        if shape.head_dim not in SUPPORTED_HEAD_DIMS:
            raise AttentionArgumentError(
                f"head_dim {shape.head_dim} has no CUDA kernel; supported: {SUPPORTED_HEAD_DIMS}")
        if out is None:
            out = self._gpuarray.empty(tuple(query.shape), dtype)
        elif tuple(out.shape) != tuple(query.shape) or out.dtype != dtype:
            raise AttentionArgumentError(
                f"out must be {tuple(query.shape)} {dtype.name}, got {tuple(out.shape)} "
                f"{np.dtype(out.dtype).name}")
        if shape.num_seqs == 0 or max_query_len == 0:
            return out
        plan = plan_prefill_launch(shape, dtype.itemsize, max_query_len,
                                   tensor_cores=self.tensor_cores)
        name = DTYPE_NAMES[dtype.name]
        kernel = self.function(PREFILL_SOURCE, prefill_kernel_name(dtype, shape.head_dim),
                               (f"-DVELOD_ONLY_{name.upper()}",))
        if not hasattr(kernel, "arg_format"):
            kernel.prepare([np.uintp] * 7 + [np.float32] + [np.int32] * 5)
        q, k, v = self._device(query), self._device(key_cache), self._device(value_cache)
        tables = self._device(block_tables)
        starts_dev = self._device(starts if host else query_start_loc)
        lens_dev = self._device(lens if host else context_lens)
        self._keepalive = (q, tables, starts_dev, lens_dev)
        kernel.prepared_async_call(
            plan.grid, (plan.threads, 1, 1), stream, int(out.gpudata), int(q.gpudata),
            int(k.gpudata), int(v.gpudata), int(tables.gpudata), int(starts_dev.gpudata),
            int(lens_dev.gpudata), np.float32(scale * math.log2(math.e)), shape.num_heads,
            shape.num_kv_heads, shape.max_blocks_per_seq, shape.block_size, window,
            shared_size=plan.smem_bytes)
        return out

    def write_cache(self, key, value, key_cache, value_cache, slot_mapping, *, stream=None):
        """Scatters K and V rows into their cache slots (negative slots are skipped).

        A NumPy ``slot_mapping`` is validated (range, no slot twice) and uploaded. A device
        array is used as it is, with no copy or synchronization: the engine uploads a step's
        slots once for all layers. The kernel skips any slot outside the cache, so an
        unvalidated mapping can never write past it.
        """
        with self.active():
            self._write_cache(key, value, key_cache, value_cache, slot_mapping, stream)

    def _write_cache(self, key, value, key_cache, value_cache, slot_mapping, stream):
        host_slots = isinstance(slot_mapping, np.ndarray)
        shape_key = (tuple(key.shape), tuple(value.shape), tuple(key_cache.shape),
                     tuple(value_cache.shape), tuple(slot_mapping.shape), key.dtype,
                     value.dtype, key_cache.dtype, slot_mapping.dtype)
        launch = self._writes.get(shape_key)
        if launch is None:
            check_cache_write_args(key, value, key_cache, value_cache, slot_mapping)
            num_blocks, block_size = key_cache.shape[:2]
            row_bytes = int(np.prod(key_cache.shape[2:])) * np.dtype(key_cache.dtype).itemsize
            kernel = self._function(f"velod_write_cache_{_index_name(slot_mapping.dtype)}",
                                    DTYPE_NAMES[np.dtype(key_cache.dtype).name])
            if not hasattr(kernel, "arg_format"):
                kernel.prepare([np.uintp] * 5 + [np.int64] * 4)
            launch = (kernel, row_bytes, num_blocks * block_size)
            if len(self._writes) > 4096:
                self._writes.clear()
            self._writes[shape_key] = launch
        kernel, row_bytes, num_slots = launch
        if host_slots:
            check_slots(slot_mapping, num_slots)
        tokens = int(slot_mapping.shape[0])
        if tokens == 0:
            return
        k, v = self._device(key), self._device(value)
        slots = self._device(slot_mapping)
        self._keepalive = (k, v, slots)
        kernel.prepared_async_call(
            (tokens, 2), (KERNEL_THREADS, 1, 1), stream,
            int(self._device(key_cache).gpudata), int(self._device(value_cache).gpudata),
            int(k.gpudata), int(v.gpudata), int(slots.gpudata), row_bytes, row_bytes,
            row_bytes, num_slots)

    def copy_blocks(self, key_cache, value_cache, block_pairs, *, stream=None):
        """Copies whole blocks source -> destination for each row of ``block_pairs``."""
        with self.active():
            self._copy_blocks(key_cache, value_cache, block_pairs, stream)

    def _copy_blocks(self, key_cache, value_cache, block_pairs, stream):
        pairs_host = np.ascontiguousarray(_host(block_pairs))
        check_block_pairs(pairs_host, key_cache.shape[0])
        if pairs_host.size == 0:
            return
        block_bytes = int(np.prod(key_cache.shape[1:])) * np.dtype(key_cache.dtype).itemsize
        with self.active():
            pairs = self._device(pairs_host)
            self._keepalive = (pairs,)
            kernel = self._function(f"velod_copy_blocks_{_index_name(pairs_host.dtype)}",
                                    DTYPE_NAMES[np.dtype(key_cache.dtype).name])
            if not hasattr(kernel, "arg_format"):
                kernel.prepare([np.uintp] * 3 + [np.int64])
            kernel.prepared_async_call(
                (pairs_host.shape[0], 2), (KERNEL_THREADS, 1, 1), stream,
                int(self._device(key_cache).gpudata), int(self._device(value_cache).gpudata),
                int(pairs.gpudata), block_bytes)


class DeviceClock:
    """CUDA events around kernel phases: their sum is the device time of a step.

    Events are created once and reused step after step (creating two per phase per layer
    would itself add to the host time being measured).
    """

    def __init__(self, drv: Any) -> None:
        self._drv = drv
        self._pairs: list[tuple[Any, Any]] = []
        self._free: list[Any] = []

    def _event(self) -> Any:
        return self._free.pop() if self._free else self._drv.Event()

    def start(self) -> Any:
        event = self._event()
        event.record()
        return event

    def stop(self, start: Any) -> None:
        end = self._event()
        end.record()
        self._pairs.append((start, end))

    def total(self) -> float:
        if self._pairs:
            self._pairs[-1][1].synchronize()
        seconds = sum(start.time_till(end) for start, end in self._pairs) / 1000.0
        for pair in self._pairs:
            self._free.extend(pair)
        self._pairs.clear()
        return seconds
