"""AMD GPUs from a fake sysfs tree shaped like the amdgpu driver's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes.sysfs import GiB, add_amdgpu_module, add_card
from velod.hardware.amd import AmdSource, pcie_gen


def test_reads_every_figure_of_an_amd_card_in_its_units(tmp_path: Path) -> None:
    add_card(tmp_path, 0, vram_total=16 * GiB, vram_used=3 * GiB, busy_percent=42,
             temp_millideg=61500, power_average_uw=120_500_000, power_cap_uw=250_000_000,
             product_name="AMD Radeon RX 7900 XTX", unique_id="0x1234abcd",
             link_speed="16.0 GT/s PCIe", link_width=16)
    add_amdgpu_module(tmp_path, "6.7.0")
    (gpu,) = AmdSource(str(tmp_path)).read().gpus
    assert gpu.vendor == "amd" and gpu.index == 0
    assert gpu.name == "AMD Radeon RX 7900 XTX" and gpu.uuid == "0x1234abcd"
    assert (gpu.memory_total, gpu.memory_used, gpu.memory_free) == (16 * GiB, 3 * GiB, 13 * GiB)
    assert gpu.utilization_gpu == 42.0 and gpu.utilization_memory == 2.0
    assert gpu.temperature == 61.5
    assert gpu.power_draw == 120.5 and gpu.power_limit == 250.0
    assert (gpu.pcie_gen, gpu.pcie_width) == (4, 16)
    assert gpu.driver_version == "6.7.0"


def test_skips_other_vendors_and_connector_entries(tmp_path: Path) -> None:
    add_card(tmp_path, 0, vendor="0x8086")  # an Intel iGPU
    add_card(tmp_path, 1)
    add_card(tmp_path, 2, vendor="0x10de")  # an NVIDIA card: NVML's business
    reading = AmdSource(str(tmp_path)).read()
    assert [g.index for g in reading.gpus] == [0]
    assert reading.note is None


def test_cards_are_numbered_in_card_order(tmp_path: Path) -> None:
    add_card(tmp_path, 10, product_name="second")
    add_card(tmp_path, 2, product_name="first")
    gpus = AmdSource(str(tmp_path)).read().gpus
    assert [(g.index, g.name) for g in gpus] == [(0, "first"), (1, "second")]


def test_missing_files_become_none_not_errors(tmp_path: Path) -> None:
    add_card(tmp_path, 0, vram_used=None, busy_percent=None, temp_millideg=None,
             power_average_uw=None, power_cap_uw=None, link_speed=None, link_width=None,
             mem_busy_percent=None)
    (gpu,) = AmdSource(str(tmp_path)).read().gpus
    assert gpu.memory_total == 24 * GiB
    assert gpu.memory_used is gpu.memory_free is None
    assert gpu.utilization_gpu is gpu.temperature is gpu.power_draw is gpu.pcie_gen is None
    assert gpu.name == "AMD GPU 0x744c"


def test_power_input_is_used_where_power_average_is_absent(tmp_path: Path) -> None:
    add_card(tmp_path, 0, power_average_uw=None, power_input_uw=80_000_000)
    (gpu,) = AmdSource(str(tmp_path)).read().gpus
    assert gpu.power_draw == 80.0


def test_no_drm_directory_means_no_gpu_with_a_reason(tmp_path: Path) -> None:
    reading = AmdSource(str(tmp_path / "nothing")).read()
    assert reading.gpus == []
    assert "no AMD GPU" in reading.note and "nothing" in reading.note


def test_root_can_change_between_reads(tmp_path: Path) -> None:
    add_card(tmp_path / "a", 0)
    source = AmdSource(str(tmp_path / "b"))
    assert source.read().gpus == []
    source.sysfs_root = str(tmp_path / "a")
    assert len(source.read().gpus) == 1


@pytest.mark.parametrize(("speed", "gen"), [
    ("2.5 GT/s PCIe", 1), ("8.0 GT/s PCIe", 3), ("16.0 GT/s PCIe", 4), ("32.0 GT/s", 5),
    ("Unknown", None), (None, None),
])
def test_pcie_generation_from_link_speed(speed: str | None, gen: int | None) -> None:
    assert pcie_gen(speed) == gen
