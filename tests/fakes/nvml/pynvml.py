"""A fake ``pynvml`` (nvidia-ml-py) driven by a JSON table, for machines without an NVIDIA GPU.

Put ``tests/fakes/nvml`` first on ``PYTHONPATH`` and name the table with the environment
variable ``FAKE_NVML_TABLE``; unit tests may instead import this module and call
:func:`fake_load_table` with a path. The table is re-read at every ``nvmlInit`` and whenever
the file changes (mtime, size or inode), so a test can change the GPUs under a running daemon.
No table (unset variable, missing file) behaves like a machine without the NVIDIA driver:
``nvmlInit`` raises ``NVMLError_LibraryNotFound``, as the real module does.

Behaviour follows nvidia-ml-py 13.x: the same names, signatures, error codes and
``NVMLError_*`` subclasses (``NVMLError(3)`` is an ``NVMLError_NotSupported``); calls
before ``nvmlInit`` (or after the last ``nvmlShutdown``) raise ``NVMLError_Uninitialized``;
``nvmlDeviceGetName`` returns ``str`` but ``nvmlDeviceGetUUID`` returns ``bytes`` (the real
module lacks ``convertStrBytes`` there); memory info has ``.total/.free/.used``; power is in
milliwatts; ``nvmlEventSetWait`` raises ``NVMLError_Timeout`` when no event is pending; a
handle whose GPU has left the table raises ``NVMLError_GpuIsLost``.

Table format (JSON; every key optional)::

    {
      "init_error": "DriverNotLoaded",        # nvmlInit raises NVMLError_<this>
      "driver_version": "550.54.14",
      "cuda_driver_version": 12040,           # int, like the real call
      "raise": {"nvmlSystemGetCudaDriverVersion_v2": "NotSupported"},   # system calls
      "hang_seconds": {"nvmlDeviceGetCount": 30},                       # system calls
      "gpus": [{
        "name": "NVIDIA GeForce RTX 4090",
        "uuid": "GPU-...",                     # default derived from the index
        "memory_total": 25757220864,           # bytes
        "memory_used": 1073741824,             # default: the processes' memory
        "memory_reserved": 0,                  # driver-reserved; v1 "used" includes it
        "utilization_gpu": 12, "utilization_memory": 3,   # percent
        "temperature": 41,                     # °C
        "power_usage": 35000,                  # mW
        "power_limit": 450000,                 # mW (enforced limit)
        "compute_capability": [8, 9],
        "pcie_gen": 4, "pcie_width": 16,
        "processes": [{"pid": 1234, "used_memory": 536870912}],
        "raise": {"nvmlDeviceGetPowerUsage": "NotSupported",
                  "nvmlDeviceGetTemperature": "NoPermission"},
        "hang_seconds": {"nvmlDeviceGetMemoryInfo": 30},
        "lost": false,                         # true: every call raises NVMLError_GpuIsLost
        "supported_events": ["XidCriticalError"],   # default; [] = events not supported
        "xid_events": [79]                     # delivered once per table version
      }]
    }

``raise`` and ``hang_seconds`` are keyed by the NVML function name; error names are the
suffix of the ``NVMLError_*`` class (``NotSupported``, ``NoPermission``, ``GpuIsLost``,
``Unknown`` ...). ``tests/fakes/fake_gpus.py`` writes such tables atomically.
"""

from __future__ import annotations

import json
import os
import string
import threading
import time
from typing import Any

# --------------------------------------------------------------------------- constants

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_VGPU_ECC_NOT_SUPPORTED = 22
NVML_ERROR_INSUFFICIENT_RESOURCES = 23
NVML_ERROR_FREQ_NOT_SUPPORTED = 24
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_DEPRECATED = 26
NVML_ERROR_NOT_READY = 27
NVML_ERROR_GPU_NOT_FOUND = 28
NVML_ERROR_INVALID_STATE = 29
NVML_ERROR_RESET_TYPE_NOT_SUPPORTED = 30
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
nvmlMemory_v2 = 0x02000028

nvmlEventTypeSingleBitEccError = 0x0000000000000001
nvmlEventTypeDoubleBitEccError = 0x0000000000000002
nvmlEventTypePState = 0x0000000000000004
nvmlEventTypeXidCriticalError = 0x0000000000000008
nvmlEventTypeClock = 0x0000000000000010
nvmlEventTypeNone = 0x0000000000000000
nvmlEventTypeAll = (nvmlEventTypeNone | nvmlEventTypeSingleBitEccError
                    | nvmlEventTypeDoubleBitEccError | nvmlEventTypePState
                    | nvmlEventTypeClock | nvmlEventTypeXidCriticalError)

# --------------------------------------------------------------------------- errors


class NVMLError(Exception):
    """Same shape as the real class: ``NVMLError(code)`` builds the matching subclass."""

    _valClassMapping: dict[int, type] = {}  # noqa: RUF012 - mirrors the real module
    _errcode_to_string = {  # noqa: RUF012
        NVML_ERROR_UNINITIALIZED: "Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED: "Not Supported",
        NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
        NVML_ERROR_ALREADY_INITIALIZED: "Already Initialized",
        NVML_ERROR_NOT_FOUND: "Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE: "Insufficient Size",
        NVML_ERROR_INSUFFICIENT_POWER: "Insufficient External Power",
        NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
        NVML_ERROR_TIMEOUT: "Timeout",
        NVML_ERROR_IRQ_ISSUE: "Interrupt Request Issue",
        NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
        NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
        NVML_ERROR_CORRUPTED_INFOROM: "Corrupted infoROM",
        NVML_ERROR_GPU_IS_LOST: "GPU is lost",
        NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
        NVML_ERROR_OPERATING_SYSTEM: "The operating system has blocked the request.",
        NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
        NVML_ERROR_MEMORY: "Insufficient Memory",
        NVML_ERROR_UNKNOWN: "Unknown Error",
    }

    def __new__(cls, value: int):
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __str__(self) -> str:
        return self._errcode_to_string.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other: object) -> bool:
        return self.value == getattr(other, "value", None)

    __hash__ = Exception.__hash__


def _make_error_classes() -> None:
    namespace = globals()  # not sys.modules: tests may load private copies of this file
    for err_name in [n for n in list(namespace) if n.startswith("NVML_ERROR_")]:
        suffix = string.capwords(err_name.replace("NVML_ERROR_", ""), "_").replace("_", "")
        value = namespace[err_name]

        def new(cls, *args, _value=value):
            return NVMLError.__new__(cls, _value)

        cls = type("NVMLError_" + suffix, (NVMLError,), {"__new__": new})
        cls.__module__ = __name__
        namespace[cls.__name__] = cls
        NVMLError._valClassMapping[value] = cls


_make_error_classes()


def nvmlExceptionClass(nvmlErrorCode: int) -> type:
    if nvmlErrorCode not in NVMLError._valClassMapping:
        raise ValueError(f"nvmlErrorCode {nvmlErrorCode} is not valid")
    return NVMLError._valClassMapping[nvmlErrorCode]


def _error(name: str) -> NVMLError:
    cls = globals().get("NVMLError_" + name)
    if cls is None:
        raise ValueError(f"fake NVML table: unknown error name {name!r}")
    return cls()


# --------------------------------------------------------------------------- table state


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.path: str | None = None
        self.stamp: tuple[int, int, int] | None = None
        self.table: dict[str, Any] = {}
        self.refcount = 0
        self.pending_events: list[tuple[int, int]] = []
        self.event_sets: list[_EventSet] = []


_state = _State()


def fake_load_table(path: str | os.PathLike[str] | None = None) -> None:
    """Use the table at ``path`` (default ``$FAKE_NVML_TABLE``) from now on."""
    with _state.lock:
        _state.path = os.fspath(path) if path is not None else os.environ.get("FAKE_NVML_TABLE")
        _state.stamp = None
        _reload(force=True)


def _reload(force: bool = False) -> None:
    path = _state.path
    if path is None:
        _state.table, _state.stamp = {}, None
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _state.table, _state.stamp = {}, None
        return
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    if not force and stamp == _state.stamp:
        return
    with open(path, encoding="utf-8") as f:
        _state.table = json.load(f)
    _state.stamp = stamp
    _state.pending_events = [
        (index, int(xid))
        for index, gpu in enumerate(_state.table.get("gpus", []))
        for xid in gpu.get("xid_events", [])
    ]


def _system(fn: str) -> dict[str, Any]:
    """Checks every call makes: initialised, table fresh, injected error or hang."""
    with _state.lock:
        if _state.refcount <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        _reload()
        table = _state.table
    _inject(table, fn)
    return table


def _inject(spec: dict[str, Any], fn: str) -> None:
    hang = spec.get("hang_seconds", {}).get(fn)
    if hang:
        time.sleep(float(hang))
    error = spec.get("raise", {}).get(fn)
    if error:
        raise _error(error)


class c_nvmlDevice_t:  # the real type's name
    """A device handle; like the real pointer it stays valid only while its GPU exists."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<fake nvmlDevice {self.index}>"


def _gpu(handle: c_nvmlDevice_t, fn: str) -> dict[str, Any]:
    table = _system(fn)
    gpus = table.get("gpus", [])
    if not isinstance(handle, c_nvmlDevice_t):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    if handle.index >= len(gpus) or gpus[handle.index].get("lost"):
        raise NVMLError(NVML_ERROR_GPU_IS_LOST)
    gpu = gpus[handle.index]
    _inject(gpu, fn)
    return gpu


class nvmlFriendlyObject:
    """Attribute bag, like the real module's converted structs."""

    def __init__(self, dictionary: dict[str, Any]) -> None:
        for key, value in dictionary.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return str(self.__dict__)


# --------------------------------------------------------------------------- library


def nvmlInitWithFlags(flags: int) -> None:
    with _state.lock:
        if _state.path is None:
            _state.path = os.environ.get("FAKE_NVML_TABLE")
        _reload(force=True)
        if not _state.path or not os.path.exists(_state.path):
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
        error = _state.table.get("init_error")
        if error:
            raise _error(error)
        _state.refcount += 1


def nvmlInit() -> None:
    nvmlInitWithFlags(0)


def nvmlShutdown() -> None:
    with _state.lock:
        if _state.refcount <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        _state.refcount -= 1


def nvmlErrorString(result: int) -> str:
    return NVMLError._errcode_to_string.get(result, "Unknown Error")


def nvmlSystemGetDriverVersion() -> str:
    return str(_system("nvmlSystemGetDriverVersion").get("driver_version", "550.54.14"))


def nvmlSystemGetNVMLVersion() -> str:
    return "12." + nvmlSystemGetDriverVersion()


def nvmlSystemGetCudaDriverVersion() -> int:
    return int(_system("nvmlSystemGetCudaDriverVersion").get("cuda_driver_version", 12040))


def nvmlSystemGetCudaDriverVersion_v2() -> int:
    return int(_system("nvmlSystemGetCudaDriverVersion_v2").get("cuda_driver_version", 12040))


def nvmlDeviceGetCount() -> int:
    return len(_system("nvmlDeviceGetCount").get("gpus", []))


def nvmlDeviceGetHandleByIndex(index: int) -> c_nvmlDevice_t:
    gpus = _system("nvmlDeviceGetHandleByIndex").get("gpus", [])
    if not 0 <= index < len(gpus):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return c_nvmlDevice_t(index)


def nvmlDeviceGetIndex(handle: c_nvmlDevice_t) -> int:
    _gpu(handle, "nvmlDeviceGetIndex")
    return handle.index


def nvmlDeviceGetName(handle: c_nvmlDevice_t) -> str:
    return str(_gpu(handle, "nvmlDeviceGetName").get("name", "NVIDIA Fake GPU"))


def nvmlDeviceGetUUID(handle: c_nvmlDevice_t) -> bytes:
    gpu = _gpu(handle, "nvmlDeviceGetUUID")
    default = f"GPU-00000000-0000-0000-0000-{handle.index:012d}"
    return str(gpu.get("uuid", default)).encode()


def _memory(gpu: dict[str, Any]) -> tuple[int, int, int]:
    """(total, used, reserved) with the v2 meaning of used: reserved memory left out."""
    total = int(gpu.get("memory_total", 8 * 1024**3))
    used = gpu.get("memory_used")
    if used is None:
        used = sum(int(p.get("used_memory") or 0) for p in gpu.get("processes", []))
    return total, int(used), int(gpu.get("memory_reserved", 0))


def nvmlDeviceGetMemoryInfo(handle: c_nvmlDevice_t, version: int | None = None):
    if not version:  # v1: the driver's reserved memory counts as used
        total, used, reserved = _memory(_gpu(handle, "nvmlDeviceGetMemoryInfo"))
        return nvmlFriendlyObject({"total": total, "free": total - used - reserved,
                                   "used": used + reserved})
    total, used, reserved = _memory(_gpu(handle, "nvmlDeviceGetMemoryInfo_v2"))
    if version != nvmlMemory_v2:
        raise NVMLError(NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
    return nvmlFriendlyObject({"version": version, "total": total, "reserved": reserved,
                               "free": total - reserved - used, "used": used})


def nvmlDeviceGetUtilizationRates(handle: c_nvmlDevice_t):
    gpu = _gpu(handle, "nvmlDeviceGetUtilizationRates")
    return nvmlFriendlyObject({"gpu": int(gpu.get("utilization_gpu", 0)),
                               "memory": int(gpu.get("utilization_memory", 0))})


def nvmlDeviceGetTemperature(handle: c_nvmlDevice_t, sensor: int) -> int:
    gpu = _gpu(handle, "nvmlDeviceGetTemperature")
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return int(gpu.get("temperature", 40))


def nvmlDeviceGetPowerUsage(handle: c_nvmlDevice_t) -> int:
    return int(_gpu(handle, "nvmlDeviceGetPowerUsage").get("power_usage", 30000))


def nvmlDeviceGetEnforcedPowerLimit(handle: c_nvmlDevice_t) -> int:
    return int(_gpu(handle, "nvmlDeviceGetEnforcedPowerLimit").get("power_limit", 300000))


def nvmlDeviceGetCudaComputeCapability(handle: c_nvmlDevice_t) -> tuple[int, int]:
    major, minor = _gpu(handle, "nvmlDeviceGetCudaComputeCapability").get(
        "compute_capability", [8, 9])
    return (int(major), int(minor))


def nvmlDeviceGetCurrPcieLinkGeneration(handle: c_nvmlDevice_t) -> int:
    return int(_gpu(handle, "nvmlDeviceGetCurrPcieLinkGeneration").get("pcie_gen", 4))


def nvmlDeviceGetCurrPcieLinkWidth(handle: c_nvmlDevice_t) -> int:
    return int(_gpu(handle, "nvmlDeviceGetCurrPcieLinkWidth").get("pcie_width", 16))


def _processes(handle: c_nvmlDevice_t, fn: str) -> list[nvmlFriendlyObject]:
    gpu = _gpu(handle, fn)
    return [nvmlFriendlyObject({"pid": int(p["pid"]), "usedGpuMemory": p.get("used_memory"),
                                "gpuInstanceId": 0xFFFFFFFF, "computeInstanceId": 0xFFFFFFFF})
            for p in gpu.get("processes", [])]


def nvmlDeviceGetComputeRunningProcesses_v3(handle: c_nvmlDevice_t) -> list:
    return _processes(handle, "nvmlDeviceGetComputeRunningProcesses_v3")


def nvmlDeviceGetComputeRunningProcesses_v2(handle: c_nvmlDevice_t) -> list:
    return _processes(handle, "nvmlDeviceGetComputeRunningProcesses_v2")


def nvmlDeviceGetComputeRunningProcesses(handle: c_nvmlDevice_t) -> list:
    return _processes(handle, "nvmlDeviceGetComputeRunningProcesses")


# --------------------------------------------------------------------------- events


class _EventSet:
    def __init__(self) -> None:
        self.devices: dict[int, int] = {}  # index -> registered event type mask
        self.freed = False


def nvmlEventSetCreate() -> _EventSet:
    _system("nvmlEventSetCreate")
    event_set = _EventSet()
    with _state.lock:
        _state.event_sets.append(event_set)
    return event_set


def nvmlDeviceGetSupportedEventTypes(handle: c_nvmlDevice_t) -> int:
    gpu = _gpu(handle, "nvmlDeviceGetSupportedEventTypes")
    mask = 0
    for name in gpu.get("supported_events", ["XidCriticalError"]):
        mask |= globals()["nvmlEventType" + name]
    return mask


def nvmlDeviceRegisterEvents(handle: c_nvmlDevice_t, eventTypes: int, eventSet: _EventSet) -> None:
    supported = nvmlDeviceGetSupportedEventTypes(handle)
    _gpu(handle, "nvmlDeviceRegisterEvents")
    if eventTypes & ~supported:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    eventSet.devices[handle.index] = eventSet.devices.get(handle.index, 0) | eventTypes


def nvmlEventSetWait_v2(eventSet: _EventSet, timeoutms: int):
    _system("nvmlEventSetWait_v2")
    with _state.lock:
        for i, (index, xid) in enumerate(_state.pending_events):
            if eventSet.devices.get(index, 0) & nvmlEventTypeXidCriticalError:
                del _state.pending_events[i]
                return nvmlFriendlyObject({
                    "device": c_nvmlDevice_t(index), "eventType": nvmlEventTypeXidCriticalError,
                    "eventData": xid, "gpuInstanceId": 0xFFFFFFFF,
                    "computeInstanceId": 0xFFFFFFFF})
    time.sleep(timeoutms / 1000)
    raise NVMLError(NVML_ERROR_TIMEOUT)


def nvmlEventSetWait(eventSet: _EventSet, timeoutms: int):
    return nvmlEventSetWait_v2(eventSet, timeoutms)


def nvmlEventSetFree(eventSet: _EventSet) -> None:
    _system("nvmlEventSetFree")
    eventSet.freed = True
