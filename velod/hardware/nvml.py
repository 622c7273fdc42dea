"""NVIDIA GPUs through NVML (the ``pynvml`` module of nvidia-ml-py).

Every NVML call goes through :func:`nvml_query`, which turns the errors that mean "this GPU
cannot tell you that" into ``None``; errors that mean the GPU itself is gone propagate and
turn into a row with ``error`` set. NVML is initialised once (lazily, in the monitor's worker
thread) and shut down by :meth:`NvmlSource.close`. All methods block: call them off the loop.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

from velod.hardware.snapshot import Gpu, GpuProcess

T = TypeVar("T")

# Errors that concern one field of one GPU: the field becomes None.
_FIELD_ERRORS = frozenset({
    "NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_NO_PERMISSION", "NVML_ERROR_FUNCTION_NOT_FOUND",
    "NVML_ERROR_NOT_FOUND", "NVML_ERROR_INVALID_ARGUMENT", "NVML_ERROR_NO_DATA",
    "NVML_ERROR_ARGUMENT_VERSION_MISMATCH", "NVML_ERROR_DEPRECATED", "NVML_ERROR_NOT_READY",
    "NVML_ERROR_INSUFFICIENT_SIZE",
})
# nvmlInit failures that mean "this machine has no usable NVIDIA driver": not a fault.
_ABSENT_REASONS = {
    "NVML_ERROR_LIBRARY_NOT_FOUND": "NVML library (libnvidia-ml.so.1) not found: "
                                    "no NVIDIA driver installed",
    "NVML_ERROR_DRIVER_NOT_LOADED": "NVIDIA driver not loaded (is the nvidia kernel "
                                    "module loaded?)",
    "NVML_ERROR_NO_PERMISSION": "no permission to open the NVIDIA devices (/dev/nvidia*)",
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": "NVML library and kernel driver versions differ "
                                          "(reboot or reload the nvidia module)",
}
ABSENT_RETRY_S = 60.0  # how often to try nvmlInit again while the driver is absent
_XID_POLL_LIMIT = 64  # events drained per poll, so a storm cannot hold the worker


class NvmlUnavailable(Exception):
    """NVML cannot be used on this machine; the message says why (shown by ``velodctl hw``)."""


def nvml_query(nvml: ModuleType, fn: Callable[..., T], *args: Any) -> T | None:
    """``fn(*args)``, or None when NVML says the GPU does not support or permit it.

    Other NVML errors (GPU lost, driver gone, uninitialised) propagate to the caller.
    """
    try:
        return fn(*args)
    except nvml.NVMLError as exc:
        if _error_name(nvml, exc) in _FIELD_ERRORS:
            return None
        raise
    except getattr(nvml, "NVMLLibraryMismatchError", ()):
        return None


_code_names: dict[int, dict[int, str]] = {}


def _error_name(nvml: ModuleType, exc: Exception) -> str:
    """``NVML_ERROR_NOT_SUPPORTED``-style name of an NVMLError's code."""
    names = _code_names.get(id(nvml))
    if names is None:
        names = {getattr(nvml, n): n for n in dir(nvml) if n.startswith("NVML_ERROR_")}
        _code_names[id(nvml)] = names
    return names.get(getattr(exc, "value", None), "NVML_ERROR_UNKNOWN")


def _text(value: str | bytes | None) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _cuda_version(value: int | None) -> str | None:
    return None if value is None else f"{value // 1000}.{value % 1000 // 10}"


def _process_name(pid: int) -> str | None:
    try:
        import psutil  # here, so that NVML alone is enough for tests/gpu
    except ImportError:
        return None
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, OSError):
        return None


@dataclass
class NvmlReading:
    """What one poll of NVML found: GPUs, why there are none, critical Xid errors."""

    gpus: list[Gpu] = field(default_factory=list)
    note: str | None = None
    xids: list[tuple[int | None, int]] = field(default_factory=list)  # (gpu index, Xid)


class NvmlSource:
    """Reads NVIDIA GPUs; ``module`` replaces ``import pynvml`` (tests inject a fake)."""

    name = "nvidia"

    def __init__(self, module: ModuleType | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._module = module
        self._nvml: ModuleType | None = None
        self._clock = clock
        self._lock = threading.Lock()
        self._absent: str | None = None
        self._absent_since = 0.0
        self._event_set: Any = None
        self._registered: set[int] = set()

    # ------------------------------------------------------------------ lifecycle

    def _open(self) -> ModuleType:
        if self._nvml is not None:
            return self._nvml
        if self._absent and self._clock() - self._absent_since < ABSENT_RETRY_S:
            raise NvmlUnavailable(self._absent)
        try:
            nvml = self._module or importlib.import_module("pynvml")
        except ImportError:
            self._mark_absent("the pynvml module (nvidia-ml-py) is not installed")
            raise NvmlUnavailable(self._absent) from None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            name = _error_name(nvml, exc)
            self._mark_absent(_ABSENT_REASONS.get(name, f"NVML initialisation failed: {exc}"))
            raise NvmlUnavailable(self._absent) from None
        self._nvml, self._absent = nvml, None
        self._event_set = nvml_query(nvml, nvml.nvmlEventSetCreate)
        self._registered.clear()
        return nvml

    def _mark_absent(self, reason: str) -> None:
        self._absent, self._absent_since = reason, self._clock()

    def close(self, wait: float = 2.0) -> None:
        """Free the event set and shut NVML down (once per successful init).

        A read hung in the driver holds the lock; after ``wait`` seconds NVML is left as is.
        """
        if not self._lock.acquire(timeout=wait):
            return
        try:
            self._shutdown()
        finally:
            self._lock.release()

    def _shutdown(self) -> None:
        nvml, event_set = self._nvml, self._event_set
        self._nvml, self._event_set = None, None
        if nvml is None:
            return
        try:
            if event_set is not None:
                nvml_query(nvml, nvml.nvmlEventSetFree, event_set)
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass

    # ------------------------------------------------------------------ reading

    def read(self) -> NvmlReading:
        """One poll. Never raises for a missing driver; raises if NVML itself fails."""
        with self._lock:
            try:
                nvml = self._open()
            except NvmlUnavailable as exc:
                return NvmlReading(note=str(exc))
            try:
                count = nvml.nvmlDeviceGetCount()
                driver = _text(nvml_query(nvml, nvml.nvmlSystemGetDriverVersion))
                cuda_fn = getattr(nvml, "nvmlSystemGetCudaDriverVersion_v2", None) or \
                    nvml.nvmlSystemGetCudaDriverVersion
                cuda = _cuda_version(nvml_query(nvml, cuda_fn))
            except nvml.NVMLError:
                self._shutdown()  # start afresh with nvmlInit on the next try
                raise
            gpus = [self._read_gpu(nvml, i, driver, cuda) for i in range(count)]
            note = None if gpus else "NVML found no NVIDIA GPU"
            return NvmlReading(gpus, note, self._drain_xids(nvml))

    def _read_gpu(self, nvml: ModuleType, index: int, driver: str | None,
                  cuda: str | None) -> Gpu:
        fields: dict[str, Any] = {"driver_version": driver, "cuda_driver_version": cuda}
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            self._register_events(nvml, handle, index)
            fields["name"] = _text(nvml_query(nvml, nvml.nvmlDeviceGetName, handle))
            fields["uuid"] = _text(nvml_query(nvml, nvml.nvmlDeviceGetUUID, handle))
            fields.update(_memory(nvml, handle))
            fields.update(_utilization(nvml, handle))
            fields["temperature"] = _float(nvml_query(
                nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU))
            fields["power_draw"] = _watts(nvml_query(nvml, nvml.nvmlDeviceGetPowerUsage, handle))
            fields["power_limit"] = _watts(nvml_query(
                nvml, nvml.nvmlDeviceGetEnforcedPowerLimit, handle))
            cc = nvml_query(nvml, nvml.nvmlDeviceGetCudaComputeCapability, handle)
            fields["compute_capability"] = tuple(cc) if cc else None
            fields["pcie_gen"] = nvml_query(nvml, nvml.nvmlDeviceGetCurrPcieLinkGeneration, handle)
            fields["pcie_width"] = nvml_query(nvml, nvml.nvmlDeviceGetCurrPcieLinkWidth, handle)
            fields["processes"] = _processes(nvml, handle)
        except nvml.NVMLError as exc:
            # The GPU stopped answering part-way: keep what was read, say why.
            fields["error"] = f"NVML: {exc}"
        return Gpu(index=index, vendor="nvidia", **{"name": None, **fields})

    def _register_events(self, nvml: ModuleType, handle: Any, index: int) -> None:
        if self._event_set is None or index in self._registered:
            return
        self._registered.add(index)  # once per GPU, whether or not it supports events
        xid = nvml.nvmlEventTypeXidCriticalError
        supported = nvml_query(nvml, nvml.nvmlDeviceGetSupportedEventTypes, handle) or 0
        if supported & xid:
            nvml_query(nvml, nvml.nvmlDeviceRegisterEvents, handle, xid, self._event_set)

    def _drain_xids(self, nvml: ModuleType) -> list[tuple[int | None, int]]:
        """Critical Xid errors since the last poll, without waiting (timeout 0)."""
        if self._event_set is None or not self._registered:
            return []
        found = []
        for _ in range(_XID_POLL_LIMIT):
            try:
                data = nvml.nvmlEventSetWait(self._event_set, 0)
            except nvml.NVMLError:  # NVML_ERROR_TIMEOUT: nothing pending (or events broke)
                break
            if data.eventType & nvml.nvmlEventTypeXidCriticalError:
                try:
                    index = nvml_query(nvml, nvml.nvmlDeviceGetIndex, data.device)
                except nvml.NVMLError:
                    index = None
                found.append((index, int(data.eventData)))
        return found


def _memory(nvml: ModuleType, handle: Any) -> dict[str, int | None]:
    """Total/used/free; v2 where the driver has it, so "used" leaves out the memory the
    driver reserves for itself, as nvidia-smi does (v1 counts it as used)."""
    info = None
    if hasattr(nvml, "nvmlMemory_v2"):
        info = nvml_query(nvml, nvml.nvmlDeviceGetMemoryInfo, handle, nvml.nvmlMemory_v2)
    if info is None:
        info = nvml_query(nvml, nvml.nvmlDeviceGetMemoryInfo, handle)
    if info is None:
        return {}
    return {"memory_total": int(info.total), "memory_used": int(info.used),
            "memory_free": int(info.free)}


def _utilization(nvml: ModuleType, handle: Any) -> dict[str, float | None]:
    rates = nvml_query(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
    if rates is None:
        return {}
    return {"utilization_gpu": float(rates.gpu), "utilization_memory": float(rates.memory)}


def _processes(nvml: ModuleType, handle: Any) -> tuple[GpuProcess, ...]:
    procs = nvml_query(nvml, nvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
    return tuple(
        GpuProcess(pid=int(p.pid), name=_process_name(int(p.pid)),
                   used_memory=int(p.usedGpuMemory) if p.usedGpuMemory is not None else None)
        for p in procs
    )


def _float(value: int | float | None) -> float | None:
    return None if value is None else float(value)


def _watts(milliwatts: int | None) -> float | None:
    return None if milliwatts is None else milliwatts / 1000.0
