"""Plain-data hardware snapshots, serialisable to msgpack and JSON (``to_dict``/``from_dict``).

Byte counts are ints, percentages floats 0-100, temperatures °C, power watts. A field
a source cannot read is ``None``: never an exception, never a made-up zero.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str | None
    used_memory: int | None


@dataclass(frozen=True)
class Gpu:
    index: int
    vendor: str  # "nvidia" | "amd"
    name: str | None
    uuid: str | None = None
    memory_total: int | None = None
    memory_used: int | None = None
    memory_free: int | None = None
    utilization_gpu: float | None = None
    utilization_memory: float | None = None
    temperature: float | None = None
    power_draw: float | None = None
    power_limit: float | None = None
    compute_capability: tuple[int, int] | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    processes: tuple[GpuProcess, ...] = ()
    error: str | None = None  # set when the GPU answered only in part (e.g. "GPU is lost")


@dataclass(frozen=True)
class Cpu:
    model: str | None
    physical_cores: int | None
    threads: int | None
    freq_current_mhz: float | None = None
    freq_max_mhz: float | None = None
    flags: tuple[str, ...] = ()  # only those that matter: avx2, avx512f, avx512_bf16, amx_*
    utilization: float | None = None  # % of all threads busy since the previous poll


@dataclass(frozen=True)
class Memory:
    total: int
    available: int
    swap_total: int = 0
    swap_used: int = 0


@dataclass(frozen=True)
class OsInfo:
    system: str
    kernel: str
    arch: str
    distro: str | None = None


@dataclass(frozen=True)
class Snapshot:
    time: float
    gpus: tuple[Gpu, ...]
    cpu: Cpu
    memory: Memory
    os: OsInfo
    # Why a vendor has no GPUs listed, e.g. {"nvidia": "NVML: driver not loaded"}.
    gpu_notes: dict[str, str] = field(default_factory=dict)

    @property
    def vram_total(self) -> int:
        return sum(g.memory_total or 0 for g in self.gpus)

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Snapshot:
        return _from_plain(cls, data)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _from_plain(tp: Any, data: Any) -> Any:
    if data is None:
        return None
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        return tp(**{k: _from_plain(hints[k], v) for k, v in data.items() if k in names})
    if origin in (typing.Union, __import__("types").UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_plain(inner[0], data)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_plain(args[0], v) for v in data)
        return tuple(_from_plain(a, v) for a, v in zip(args, data, strict=True))
    return data
