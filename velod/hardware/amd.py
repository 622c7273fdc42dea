"""AMD GPUs through the amdgpu driver's sysfs files (``/sys/class/drm/card*/device``).

Files, not ``rocm-smi`` text. The root (normally ``/sys``) is configurable so tests can
point it at a fake tree. A card whose files cannot be read gets ``None`` fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from velod.hardware.snapshot import Gpu

AMD_VENDOR = "0x1002"
_CARD = re.compile(r"^card(\d+)$")
_GT_PER_GEN = {"2.5": 1, "5.0": 2, "8.0": 3, "16.0": 4, "32.0": 5, "64.0": 6}


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _int(path: Path) -> int | None:
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _scaled(path: Path, divisor: float) -> float | None:
    value = _int(path)
    return None if value is None else value / divisor


def pcie_gen(speed: str | None) -> int | None:
    """PCIe generation from amdgpu's ``current_link_speed`` ("16.0 GT/s PCIe" → 4)."""
    if not speed:
        return None
    match = re.match(r"\s*([\d.]+)\s*GT/s", speed)
    if not match:
        return None
    return _GT_PER_GEN.get(f"{float(match.group(1)):.1f}")


@dataclass
class AmdReading:
    gpus: list[Gpu] = field(default_factory=list)
    note: str | None = None


class AmdSource:
    """Lists AMD cards under ``<sysfs_root>/class/drm`` in card order."""

    name = "amd"

    def __init__(self, sysfs_root: str = "/sys") -> None:
        self.sysfs_root = sysfs_root

    def read(self) -> AmdReading:
        drm = Path(self.sysfs_root) / "class" / "drm"
        cards = []
        for entry in drm.glob("card*") if drm.is_dir() else ():
            match = _CARD.match(entry.name)
            if match and _read(entry / "device" / "vendor") == AMD_VENDOR:
                cards.append((int(match.group(1)), entry / "device"))
        driver = _read(Path(self.sysfs_root) / "module" / "amdgpu" / "version")
        gpus = [read_card(index, device, driver)
                for index, (_, device) in enumerate(sorted(cards))]
        note = None if gpus else f"no AMD GPU under {drm}"
        return AmdReading(gpus, note)

    def close(self) -> None:
        pass


def read_card(index: int, device: Path, driver_version: str | None = None) -> Gpu:
    """One amdgpu card directory (``.../cardN/device``) as a snapshot row."""
    total = _int(device / "mem_info_vram_total")
    used = _int(device / "mem_info_vram_used")
    hwmon = next(iter(sorted((device / "hwmon").glob("hwmon*"))), None)
    temperature = power = limit = None
    if hwmon is not None:
        temperature = _scaled(hwmon / "temp1_input", 1000)  # millidegrees
        power = _scaled(hwmon / "power1_average", 1e6)  # microwatts
        if power is None:
            power = _scaled(hwmon / "power1_input", 1e6)
        limit = _scaled(hwmon / "power1_cap", 1e6)
    busy = _int(device / "gpu_busy_percent")
    device_id = _read(device / "device")
    name = _read(device / "product_name") or (f"AMD GPU {device_id}" if device_id else "AMD GPU")
    width = _int(device / "current_link_width")
    return Gpu(
        index=index, vendor="amd", name=name, uuid=_read(device / "unique_id"),
        memory_total=total, memory_used=used,
        memory_free=total - used if total is not None and used is not None else None,
        utilization_gpu=float(busy) if busy is not None else None,
        utilization_memory=_busy(device / "mem_busy_percent"),
        temperature=temperature, power_draw=power, power_limit=limit,
        pcie_gen=pcie_gen(_read(device / "current_link_speed")),
        pcie_width=width or None,
        driver_version=driver_version,
    )


def _busy(path: Path) -> float | None:
    value = _int(path)
    return float(value) if value is not None else None
