"""Build a fake ``/sys`` tree with amdgpu cards (``class/drm/cardN/device``) for tests.

Files hold what the amdgpu driver writes: bytes for VRAM, percent for busy, millidegrees
for temperature and microwatts for power, one value per file with a trailing newline.
"""

from __future__ import annotations

from pathlib import Path

GiB = 1024**3


def _write(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


def add_card(root: Path, card: int, *, vendor: str = "0x1002", device_id: str = "0x744c",
             vram_total: int | None = 24 * GiB, vram_used: int | None = GiB,
             busy_percent: int | None = 7, mem_busy_percent: int | None = 2,
             temp_millideg: int | None = 45000, power_average_uw: int | None = 35_000_000,
             power_input_uw: int | None = None, power_cap_uw: int | None = 300_000_000,
             product_name: str | None = None, unique_id: str | None = None,
             link_speed: str | None = "16.0 GT/s PCIe", link_width: int | None = 16,
             connectors: tuple[str, ...] = ("DP-1", "HDMI-A-1")) -> Path:
    """Add ``cardN`` (and its connector entries) under ``root/class/drm``; returns device/."""
    drm = root / "class" / "drm"
    device = drm / f"card{card}" / "device"
    files = {
        "vendor": vendor, "device": device_id, "mem_info_vram_total": vram_total,
        "mem_info_vram_used": vram_used, "gpu_busy_percent": busy_percent,
        "mem_busy_percent": mem_busy_percent, "product_name": product_name,
        "unique_id": unique_id, "current_link_speed": link_speed,
        "current_link_width": link_width,
        "hwmon/hwmon3/temp1_input": temp_millideg,
        "hwmon/hwmon3/power1_average": power_average_uw,
        "hwmon/hwmon3/power1_input": power_input_uw,
        "hwmon/hwmon3/power1_cap": power_cap_uw,
    }
    for name, value in files.items():
        if value is not None:
            _write(device / name, value)
    for connector in connectors:  # cardN-DP-1 entries are outputs, not GPUs
        _write(drm / f"card{card}-{connector}" / "status", "disconnected")
    return device


def add_amdgpu_module(root: Path, version: str = "6.7.0") -> None:
    _write(root / "module" / "amdgpu" / "version", version)
