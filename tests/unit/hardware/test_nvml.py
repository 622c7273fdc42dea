"""NVML source against the fake pynvml (and the real one, which finds no driver here)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from types import ModuleType

import psutil
import pytest

from tests.fakes.fake_gpus import GiB, MiB, gpu, load_fake_pynvml, write_gpu_table
from velod.hardware.nvml import ABSENT_RETRY_S, NvmlSource, nvml_query


@pytest.fixture
def table(tmp_path: Path) -> Path:
    return tmp_path / "nvml.json"


def fake(table: Path, gpus: list[dict], **top) -> ModuleType:
    write_gpu_table(table, gpus, **top)
    return load_fake_pynvml(table)


def test_query_turns_not_supported_and_no_permission_into_none(table: Path) -> None:
    nvml = fake(table, [gpu()])
    for error in (nvml.NVMLError_NotSupported, nvml.NVMLError_NoPermission):
        def fails(error=error):
            raise error()
        assert nvml_query(nvml, fails) is None
    assert nvml_query(nvml, lambda x: x + 1, 41) == 42


def test_query_lets_a_lost_gpu_through(table: Path) -> None:
    nvml = fake(table, [gpu()])

    def lost():
        raise nvml.NVMLError(nvml.NVML_ERROR_GPU_IS_LOST)

    with pytest.raises(nvml.NVMLError_GpuIsLost):
        nvml_query(nvml, lost)


def test_reads_every_field_in_snapshot_units(table: Path) -> None:
    me = os.getpid()
    nvml = fake(table, [gpu("NVIDIA GeForce RTX 4090", memory_total=24 * GiB,
                            memory_used=5 * GiB, uuid="GPU-abc", utilization_gpu=37,
                            utilization_memory=12, temperature=66, power_usage=123456,
                            power_limit=450000, compute_capability=[8, 9], pcie_gen=4,
                            pcie_width=16, processes=[{"pid": me, "used_memory": 3 * GiB}])],
                driver_version="550.54.14", cuda_driver_version=12040)
    reading = NvmlSource(nvml).read()
    assert reading.note is None and reading.xids == []
    (g,) = reading.gpus
    assert (g.index, g.vendor, g.name, g.uuid) == (0, "nvidia", "NVIDIA GeForce RTX 4090",
                                                   "GPU-abc")
    assert (g.memory_total, g.memory_used, g.memory_free) == (24 * GiB, 5 * GiB, 19 * GiB)
    assert (g.utilization_gpu, g.utilization_memory, g.temperature) == (37.0, 12.0, 66.0)
    assert (g.power_draw, g.power_limit) == (123.456, 450.0)  # milliwatts → watts
    assert g.compute_capability == (8, 9)
    assert (g.pcie_gen, g.pcie_width) == (4, 16)
    assert (g.driver_version, g.cuda_driver_version) == ("550.54.14", "12.4")
    (p,) = g.processes
    assert (p.pid, p.used_memory) == (me, 3 * GiB)
    assert p.name == psutil.Process(me).name()


def test_unsupported_and_forbidden_fields_are_none_and_the_rest_is_read(table: Path) -> None:
    nvml = fake(table, [gpu(raise_={"nvmlDeviceGetPowerUsage": "NotSupported",
                                    "nvmlDeviceGetEnforcedPowerLimit": "NotSupported",
                                    "nvmlDeviceGetTemperature": "NoPermission",
                                    "nvmlDeviceGetComputeRunningProcesses": "NoPermission",
                                    "nvmlDeviceGetCurrPcieLinkGeneration": "NotSupported"})],
                **{"raise": {"nvmlSystemGetCudaDriverVersion_v2": "NotSupported"}})
    (g,) = NvmlSource(nvml).read().gpus
    assert g.power_draw is g.power_limit is g.temperature is g.pcie_gen is None
    assert g.cuda_driver_version is None
    assert g.processes == ()
    assert g.error is None
    assert g.memory_total == 24 * GiB and g.pcie_width == 16


def test_several_gpus_one_lost_becomes_a_row_that_says_so(table: Path) -> None:
    nvml = fake(table, [gpu("A"), gpu("B", lost=True), gpu("C")])
    gpus = NvmlSource(nvml).read().gpus
    assert [g.name for g in gpus] == ["A", None, "C"]
    assert gpus[1].error == "NVML: GPU is lost"
    assert gpus[0].error is gpus[2].error is None


def test_a_gpu_lost_part_way_keeps_what_was_read(table: Path) -> None:
    nvml = fake(table, [gpu("A", raise_={"nvmlDeviceGetUtilizationRates": "GpuIsLost"})])
    (g,) = NvmlSource(nvml).read().gpus
    assert g.name == "A" and g.memory_total == 24 * GiB
    assert g.utilization_gpu is None and g.error == "NVML: GPU is lost"


@pytest.mark.parametrize(("init_error", "words"), [
    ("DriverNotLoaded", "driver not loaded"),
    ("NoPermission", "no permission"),
    ("Unknown", "initialisation failed: Unknown Error"),
])
def test_init_failure_means_no_nvidia_gpus_with_the_reason(table: Path, init_error: str,
                                                           words: str) -> None:
    nvml = fake(table, [gpu()], init_error=init_error)
    reading = NvmlSource(nvml).read()
    assert reading.gpus == []
    assert words in reading.note


def test_the_real_pynvml_without_a_driver_says_the_library_is_missing() -> None:
    pynvml = pytest.importorskip("pynvml")
    if Path("/dev/nvidiactl").exists():
        pytest.skip("this machine has an NVIDIA driver")
    source = NvmlSource(pynvml)
    reading = source.read()
    assert reading.gpus == []
    assert "libnvidia-ml.so.1" in reading.note
    source.close()


def test_missing_driver_is_retried_only_after_a_while(table: Path) -> None:
    nvml = fake(table, [gpu()], init_error="DriverNotLoaded")
    now = [1000.0]
    source = NvmlSource(nvml, clock=lambda: now[0])
    assert source.read().gpus == []
    write_gpu_table(table, [gpu()])  # the driver gets loaded
    now[0] += ABSENT_RETRY_S / 2
    assert source.read().gpus == []
    now[0] += ABSENT_RETRY_S
    assert len(source.read().gpus) == 1


def test_gpu_disappearing_from_the_table_is_seen_by_the_running_source(table: Path) -> None:
    nvml = fake(table, [gpu("A"), gpu("B")])
    source = NvmlSource(nvml)
    assert len(source.read().gpus) == 2
    write_gpu_table(table, [gpu("A", processes=[{"pid": 1, "used_memory": 6 * GiB}])])
    (g,) = source.read().gpus
    assert g.memory_used == 6 * GiB


def test_nvml_is_initialised_once_and_shut_down_by_close(table: Path) -> None:
    nvml = fake(table, [gpu()])
    source = NvmlSource(nvml)
    for _ in range(3):
        source.read()
    assert nvml._state.refcount == 1
    source.close()
    assert nvml._state.refcount == 0
    with pytest.raises(nvml.NVMLError_Uninitialized):
        nvml.nvmlDeviceGetCount()
    source.close()  # twice is harmless


def test_a_failing_system_call_raises_and_the_next_read_starts_afresh(table: Path) -> None:
    nvml = fake(table, [gpu()], **{"raise": {"nvmlDeviceGetCount": "Unknown"}})
    source = NvmlSource(nvml)
    with pytest.raises(nvml.NVMLError_Unknown):
        source.read()
    assert nvml._state.refcount == 0
    write_gpu_table(table, [gpu()])
    assert len(source.read().gpus) == 1


def test_critical_xid_errors_are_reported_once(table: Path) -> None:
    nvml = fake(table, [gpu("A"), gpu("B", xid_events=[79, 48])])
    source = NvmlSource(nvml)
    assert source.read().xids == [(1, 79), (1, 48)]
    assert source.read().xids == []


def test_gpus_without_event_support_are_read_without_xids(table: Path) -> None:
    nvml = fake(table, [gpu(supported_events=[], xid_events=[79])])
    reading = NvmlSource(nvml).read()
    assert len(reading.gpus) == 1 and reading.xids == []


# ----------------------------------------------------------------- the fake follows the real


def _real() -> ModuleType:
    return pytest.importorskip("pynvml")


USED_FUNCTIONS = [
    "nvmlInit", "nvmlShutdown", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetIndex", "nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetCudaComputeCapability",
    "nvmlDeviceGetCurrPcieLinkGeneration", "nvmlDeviceGetCurrPcieLinkWidth",
    "nvmlSystemGetDriverVersion", "nvmlSystemGetCudaDriverVersion",
    "nvmlSystemGetCudaDriverVersion_v2", "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetComputeRunningProcesses_v3", "nvmlEventSetCreate", "nvmlEventSetWait",
    "nvmlEventSetFree", "nvmlDeviceRegisterEvents", "nvmlDeviceGetSupportedEventTypes",
]


@pytest.mark.parametrize("name", USED_FUNCTIONS)
def test_fake_functions_have_the_real_signatures(name: str, table: Path) -> None:
    real, ours = _real(), fake(table, [])
    real_params = list(inspect.signature(getattr(real, name)).parameters)
    assert list(inspect.signature(getattr(ours, name)).parameters) == real_params


def test_fake_error_codes_and_classes_match_the_real_module(table: Path) -> None:
    real, ours = _real(), fake(table, [])
    codes = [n for n in dir(real) if n.startswith("NVML_ERROR_")]
    assert codes and all(getattr(ours, n) == getattr(real, n) for n in codes)
    for name in codes:
        value = getattr(real, name)
        assert type(ours.NVMLError(value)).__name__ == type(real.NVMLError(value)).__name__
        assert str(ours.NVMLError(value)) == str(real.NVMLError(value)) or \
            value not in real.NVMLError._errcode_to_string
    assert ours.NVML_TEMPERATURE_GPU == real.NVML_TEMPERATURE_GPU
    assert ours.nvmlMemory_v2 == real.nvmlMemory_v2
    assert ours.nvmlEventTypeXidCriticalError == real.nvmlEventTypeXidCriticalError


def test_fake_without_a_table_fails_init_like_the_real_module_without_a_driver() -> None:
    ours = load_fake_pynvml(None)
    with pytest.raises(ours.NVMLError_LibraryNotFound):
        ours.nvmlInit()


def test_fake_memory_info_and_uuid_have_the_real_shapes(table: Path) -> None:
    nvml = fake(table, [gpu(memory_total=8 * GiB, memory_used=512 * MiB)])
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    info = nvml.nvmlDeviceGetMemoryInfo(handle)
    assert (info.total, info.used, info.free) == (8 * GiB, 512 * MiB, 8 * GiB - 512 * MiB)
    assert isinstance(nvml.nvmlDeviceGetUUID(handle), bytes)  # as nvidia-ml-py 13 returns
    assert isinstance(nvml.nvmlDeviceGetName(handle), str)
    with pytest.raises(nvml.NVMLError_Timeout):
        nvml.nvmlEventSetWait(nvml.nvmlEventSetCreate(), 0)
    nvml.nvmlShutdown()


def test_used_memory_leaves_out_driver_reserved_memory_like_nvidia_smi(table: Path) -> None:
    nvml = fake(table, [gpu(memory_total=80 * GiB, memory_used=10 * GiB,
                            memory_reserved=512 * MiB)])
    (g,) = NvmlSource(nvml).read().gpus
    assert (g.memory_used, g.memory_free) == (10 * GiB, 70 * GiB - 512 * MiB)


def test_drivers_without_memory_info_v2_fall_back_to_v1(table: Path) -> None:
    nvml = fake(table, [gpu(memory_total=80 * GiB, memory_used=10 * GiB,
                            memory_reserved=512 * MiB,
                            raise_={"nvmlDeviceGetMemoryInfo_v2": "FunctionNotFound"})])
    (g,) = NvmlSource(nvml).read().gpus
    assert (g.memory_used, g.memory_free) == (10 * GiB + 512 * MiB, 70 * GiB - 512 * MiB)
