"""Change detection: a table of old/new snapshots and the events they must (not) produce."""

from __future__ import annotations

import dataclasses

import pytest

from velod.hardware.changes import Thresholds, detect_changes, xid_changes
from velod.hardware.snapshot import Cpu, Gpu, GpuProcess, Memory, OsInfo, Snapshot

GiB = 1024**3
MiB = 1024**2
LIMITS = Thresholds(vram_bytes=512 * MiB, vram_percent=10.0, ram_available=2 * GiB)


def card(index: int = 0, free: int = 20 * GiB, total: int = 24 * GiB, **kw) -> Gpu:
    fields = {"name": "NVIDIA GeForce RTX 4090", "uuid": f"GPU-{index}",
              "memory_total": total, "memory_used": total - free, "memory_free": free,
              "utilization_gpu": 5.0, "temperature": 40.0, **kw}
    return Gpu(index=index, vendor="nvidia", **fields)


def snap(*gpus: Gpu, available: int = 16 * GiB) -> Snapshot:
    return Snapshot(time=1.0, gpus=gpus, cpu=Cpu("cpu", 8, 16),
                    memory=Memory(total=32 * GiB, available=available),
                    os=OsInfo("Linux", "6.1", "x86_64"))


def proc(pid: int, used: int | None = 4 * GiB, name: str | None = "ollama") -> GpuProcess:
    return GpuProcess(pid, name, used)


CASES = [
    # (id, old, new, expected [(kind, gpu, old, new)])
    ("identical", snap(card()), snap(card()), []),
    ("noise: temperature and utilization", snap(card()),
     snap(card(temperature=71.0, utilization_gpu=99.0)), []),
    ("noise: free VRAM moves 100 MiB", snap(card()), snap(card(free=20 * GiB - 100 * MiB)), []),
    ("noise: free VRAM moves exactly the threshold", snap(card()),
     snap(card(free=20 * GiB - 512 * MiB)), []),
    ("free VRAM drops by 1 GiB", snap(card()), snap(card(free=19 * GiB)),
     [("vram_free", 0, 20 * GiB, 19 * GiB)]),
    ("free VRAM rises by 6 GiB", snap(card(free=10 * GiB)), snap(card(free=16 * GiB)),
     [("vram_free", 0, 10 * GiB, 16 * GiB)]),
    ("small GPU: 10% of 4 GiB counts before 512 MiB", snap(card(total=4 * GiB, free=3 * GiB)),
     snap(card(total=4 * GiB, free=3 * GiB - 450 * MiB)),
     [("vram_free", 0, 3 * GiB, 3 * GiB - 450 * MiB)]),
    ("GPU appears", snap(card(0)), snap(card(0), card(1)),
     [("gpu_added", 1, None, {"name": "NVIDIA GeForce RTX 4090", "uuid": "GPU-1",
                              "memory_total": 24 * GiB})]),
    ("GPU vanishes", snap(card(0), card(1)), snap(card(0)),
     [("gpu_removed", 1, {"name": "NVIDIA GeForce RTX 4090", "uuid": "GPU-1",
                          "memory_total": 24 * GiB}, None)]),
    ("another board at the same index", snap(card(0)), snap(card(0, uuid="GPU-other")),
     [("gpu_removed", 0, {"name": "NVIDIA GeForce RTX 4090", "uuid": "GPU-0",
                          "memory_total": 24 * GiB}, None),
      ("gpu_added", 0, None, {"name": "NVIDIA GeForce RTX 4090", "uuid": "GPU-other",
                              "memory_total": 24 * GiB})]),
    ("GPU lost", snap(card()), snap(card(error="NVML: GPU is lost", uuid=None)),
     [("gpu_error", 0, None, "NVML: GPU is lost")]),
    ("GPU answers again", snap(card(error="NVML: GPU is lost")), snap(card()),
     [("gpu_error", 0, "NVML: GPU is lost", None)]),
    ("a new process takes GPU memory", snap(card(processes=(proc(1),))),
     snap(card(processes=(proc(1), proc(2, 256 * MiB, "python")))),
     [("gpu_process_started", 0, None, {"pid": 2, "name": "python", "used_memory": 256 * MiB})]),
    ("a process exits", snap(card(processes=(proc(1), proc(2)))),
     snap(card(processes=(proc(1),))),
     [("gpu_process_exited", 0, {"pid": 2, "name": "ollama", "used_memory": 4 * GiB}, None)]),
    ("a new process with no memory yet is not news", snap(card()),
     snap(card(processes=(proc(3, 0),))), []),
    ("available RAM falls below the threshold", snap(card(), available=3 * GiB),
     snap(card(), available=GiB), [("ram_available", None, 3 * GiB, GiB)]),
    ("available RAM rises above the threshold", snap(card(), available=GiB),
     snap(card(), available=5 * GiB), [("ram_available", None, GiB, 5 * GiB)]),
    ("noise: available RAM moves on one side of the threshold",
     snap(card(), available=10 * GiB), snap(card(), available=4 * GiB), []),
]


@pytest.mark.parametrize(("old", "new", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_changes_between_snapshots(old: Snapshot, new: Snapshot, expected: list) -> None:
    changes = detect_changes(old, new, LIMITS)
    assert [(c.kind, c.gpu, c.old, c.new) for c in changes] == expected
    for change in changes:
        assert change.message
        assert set(change.to_dict()) >= {"kind", "gpu", "old", "new", "message"}


def test_first_snapshot_has_no_changes() -> None:
    assert detect_changes(None, snap(card()), LIMITS) == []


def test_a_zero_threshold_switches_that_criterion_off() -> None:
    only_bytes = Thresholds(vram_bytes=512 * MiB, vram_percent=0, ram_available=0)
    old, new = snap(card(total=4 * GiB, free=3 * GiB), available=3 * GiB), \
        snap(card(total=4 * GiB, free=3 * GiB - 450 * MiB), available=GiB)
    assert detect_changes(old, new, only_bytes) == []
    nothing = Thresholds(vram_bytes=0, vram_percent=0, ram_available=0)
    assert detect_changes(snap(card()), snap(card(free=GiB)), nothing) == []


def test_messages_say_what_changed_in_words() -> None:
    (change,) = detect_changes(snap(card()), snap(card(free=19 * GiB)), LIMITS)
    assert change.message == ("GPU 0 (NVIDIA GeForce RTX 4090) free VRAM 20.0 GiB → "
                              "19.0 GiB (-1.0 GiB)")
    (ram,) = detect_changes(snap(available=3 * GiB), snap(available=GiB), LIMITS)
    assert ram.message == "available RAM fell below 2.0 GiB: 1.0 GiB"


def test_amd_and_nvidia_gpus_with_the_same_index_are_different_gpus() -> None:
    amd = dataclasses.replace(card(0, uuid=None), vendor="amd", name="Radeon")
    changes = detect_changes(snap(card(0)), snap(card(0), amd), LIMITS)
    assert [(c.kind, c.vendor, c.gpu) for c in changes] == [("gpu_added", "amd", 0)]


def test_xid_errors_become_changes_naming_the_gpu_and_the_meaning() -> None:
    changes = xid_changes([(0, 79), (None, 4242)], snap(card()))
    assert [(c.kind, c.gpu, c.new) for c in changes] == [("gpu_xid", 0, 79),
                                                         ("gpu_xid", None, 4242)]
    assert changes[0].message == ("GPU 0 (NVIDIA GeForce RTX 4090) reported Xid 79: "
                                  "GPU has fallen off the bus")
    assert "critical error" in changes[1].message
