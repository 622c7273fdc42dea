"""Which differences between two snapshots matter: pure functions, no I/O.

A change is published as ``hardware.changed``. Noise (temperature, utilization, VRAM or
RAM wobbling below the thresholds) yields nothing. The caller compares each new snapshot
with the snapshot at which it last reported a change, so slow drift adds up until it counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from velod.hardware.snapshot import Gpu, GpuProcess, Snapshot
from velod.units import format_size

# Critical Xid codes worth naming (NVIDIA's "Xid Errors" catalogue); others print as numbers.
XID_MEANINGS = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup after a previous error",
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping event",
    64: "ECC page retirement or row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}


@dataclass(frozen=True)
class Thresholds:
    """When a move counts. A threshold of 0 switches that criterion off."""

    vram_bytes: int = 512 * 1024**2
    vram_percent: float = 10.0  # of the GPU's total memory
    ram_available: int = 2 * 1024**3

    @classmethod
    def from_config(cls, hardware: Any) -> Thresholds:
        """From a ``HardwareConfig``."""
        return cls(hardware.vram_change_threshold, hardware.vram_change_percent,
                   hardware.ram_available_threshold)

    def vram_step(self, total: int | None) -> float | None:
        """Smallest free-VRAM move that counts on a GPU of ``total`` bytes (None: never)."""
        steps = [float(self.vram_bytes)] if self.vram_bytes > 0 else []
        if self.vram_percent > 0 and total:
            steps.append(total * self.vram_percent / 100)
        return min(steps) if steps else None


@dataclass(frozen=True)
class Change:
    """One meaningful change: what (``kind``), on which GPU, old and new value, in words."""

    kind: str
    gpu: int | None
    old: Any
    new: Any
    message: str
    vendor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "gpu": self.gpu, "vendor": self.vendor, "old": self.old,
                "new": self.new, "message": self.message}


def detect_changes(old: Snapshot | None, new: Snapshot, limits: Thresholds) -> list[Change]:
    """The changes that matter from ``old`` to ``new``; none for the first snapshot."""
    if old is None:
        return []
    changes: list[Change] = []
    before = {(g.vendor, g.index): g for g in old.gpus}
    after = {(g.vendor, g.index): g for g in new.gpus}
    for key in sorted(before.keys() | after.keys()):
        was, now = before.get(key), after.get(key)
        if was is not None and now is not None and _replaced(was, now):
            changes += [_removed(was), _added(now)]
        elif was is None and now is not None:
            changes.append(_added(now))
        elif now is None and was is not None:
            changes.append(_removed(was))
        elif was is not None and now is not None:
            changes += _gpu_changes(was, now, limits)
    ram = _ram_change(old.memory.available, new.memory.available, limits.ram_available)
    return changes + ([ram] if ram else [])


def xid_changes(xids: list[tuple[int | None, int]], snapshot: Snapshot) -> list[Change]:
    """``gpu_xid`` changes for critical Xid errors reported by NVML's event set."""
    names = {g.index: g.name for g in snapshot.gpus if g.vendor == "nvidia"}
    out = []
    for index, xid in xids:
        meaning = XID_MEANINGS.get(xid, "critical error")
        where = f"GPU {index}" + (f" ({names[index]})" if names.get(index) else "") \
            if index is not None else "an NVIDIA GPU"
        out.append(Change("gpu_xid", index, None, xid,
                          f"{where} reported Xid {xid}: {meaning}", "nvidia"))
    return out


def _replaced(was: Gpu, now: Gpu) -> bool:
    """A different board sits at the same index (both UUIDs known and unequal)."""
    return bool(was.uuid and now.uuid and was.uuid != now.uuid)


def _summary(gpu: Gpu) -> dict[str, Any]:
    return {"name": gpu.name, "uuid": gpu.uuid, "memory_total": gpu.memory_total}


def _label(gpu: Gpu) -> str:
    return f"GPU {gpu.index}" + (f" ({gpu.name})" if gpu.name else "")


def _added(gpu: Gpu) -> Change:
    size = f", {format_size(gpu.memory_total)}" if gpu.memory_total else ""
    return Change("gpu_added", gpu.index, None, _summary(gpu),
                  f"{_label(gpu)} appeared{size}", gpu.vendor)


def _removed(gpu: Gpu) -> Change:
    return Change("gpu_removed", gpu.index, _summary(gpu), None, f"{_label(gpu)} vanished",
                  gpu.vendor)


def _gpu_changes(was: Gpu, now: Gpu, limits: Thresholds) -> list[Change]:
    changes = []
    if was.error != now.error:
        message = (f"{_label(now)} reports an error: {now.error}" if now.error
                   else f"{_label(now)} answers again")
        changes.append(Change("gpu_error", now.index, was.error, now.error, message, now.vendor))
    step = limits.vram_step(now.memory_total or was.memory_total)
    if was.memory_free is not None and now.memory_free is not None and step is not None \
            and abs(now.memory_free - was.memory_free) > step:
        delta = now.memory_free - was.memory_free
        sign = "+" if delta > 0 else "-"
        changes.append(Change(
            "vram_free", now.index, was.memory_free, now.memory_free,
            f"{_label(now)} free VRAM {format_size(was.memory_free)} → "
            f"{format_size(now.memory_free)} ({sign}{format_size(abs(delta))})", now.vendor))
    changes += _process_changes(was, now)
    return changes


def _process_changes(was: Gpu, now: Gpu) -> list[Change]:
    if now.error:  # a GPU that stopped answering lists no processes; that is not news
        return []
    old = {p.pid: p for p in was.processes}
    new = {p.pid: p for p in now.processes}
    changes = []
    for pid in sorted(new.keys() - old.keys()):
        proc = new[pid]
        if proc.used_memory == 0:
            continue
        changes.append(Change("gpu_process_started", now.index, None, _proc(proc),
                              f"{_label(now)}: {_who(proc)} took "
                              f"{format_size(proc.used_memory)}", now.vendor))
    for pid in sorted(old.keys() - new.keys()):
        proc = old[pid]
        changes.append(Change("gpu_process_exited", now.index, _proc(proc), None,
                              f"{_label(now)}: {_who(proc)} released its memory", now.vendor))
    return changes


def _proc(proc: GpuProcess) -> dict[str, Any]:
    return {"pid": proc.pid, "name": proc.name, "used_memory": proc.used_memory}


def _who(proc: GpuProcess) -> str:
    return f"process {proc.pid}" + (f" ({proc.name})" if proc.name else "")


def _ram_change(was: int, now: int, threshold: int) -> Change | None:
    if threshold <= 0 or (was < threshold) == (now < threshold):
        return None
    direction = "fell below" if now < threshold else "rose above"
    return Change("ram_available", None, was, now,
                  f"available RAM {direction} {format_size(threshold)}: {format_size(now)}")
