"""CPU, memory and OS through psutil and /proc: the part of a snapshot every machine has.

What cannot change while the daemon runs (CPU model, cores, SIMD flags, OS) is read once;
each poll only asks psutil for the figures that move.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import psutil

from velod.hardware.snapshot import Cpu, Memory, OsInfo

# Instruction-set extensions that decide which inference kernels a CPU can run.
SIMD_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx_vnni",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
    "asimd", "asimdhp", "asimddp", "sve", "sve2", "i8mm", "bf16",  # Arm ("Features" line)
)


def parse_cpuinfo(text: str) -> tuple[str | None, tuple[str, ...]]:
    """(model name, inference-relevant SIMD flags) from the text of /proc/cpuinfo."""
    model = None
    present: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            present.update(value.split())
    return model, tuple(f for f in SIMD_FLAGS if f in present)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per field ("SwapTotal:  8388604 kB" → 8589930496)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def parse_os_release(text: str) -> str | None:
    """PRETTY_NAME from /etc/os-release, unquoted."""
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"').strip("'") or None
    return None


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


@dataclass
class HostReading:
    cpu: Cpu
    memory: Memory
    os: OsInfo


class HostSource:
    """psutil-backed reader; ``proc_root``/``etc_root`` let tests point at fixture files."""

    name = "host"

    def __init__(self, proc_root: str = "/proc", etc_root: str = "/etc") -> None:
        self._proc_root = proc_root
        self._etc_root = etc_root
        self._static: tuple[Cpu, OsInfo] | None = None
        psutil.cpu_percent(interval=None)  # primes the counter: the first poll then has a value

    def _static_info(self) -> tuple[Cpu, OsInfo]:
        if self._static is None:
            model, flags = parse_cpuinfo(_read(f"{self._proc_root}/cpuinfo"))
            uname = platform.uname()
            distro = parse_os_release(_read(f"{self._etc_root}/os-release"))
            cpu = Cpu(model=model or uname.processor or None,
                      physical_cores=psutil.cpu_count(logical=False),
                      threads=psutil.cpu_count(logical=True), flags=flags)
            self._static = cpu, OsInfo(system=uname.system, kernel=uname.release,
                                       arch=uname.machine, distro=distro)
        return self._static

    def read(self) -> HostReading:
        cpu, os_info = self._static_info()
        freq = _cpu_freq()
        vm = psutil.virtual_memory()
        swap_total, swap_used = self._swap()
        cpu = Cpu(model=cpu.model, physical_cores=cpu.physical_cores, threads=cpu.threads,
                  freq_current_mhz=_positive(freq.current) if freq else None,
                  freq_max_mhz=_positive(freq.max) if freq else None,
                  flags=cpu.flags, utilization=psutil.cpu_percent(interval=None))
        memory = Memory(total=vm.total, available=vm.available,
                        swap_total=swap_total, swap_used=swap_used)
        return HostReading(cpu, memory, os_info)

    def _swap(self) -> tuple[int, int]:
        """Swap (total, used) from /proc/meminfo: the same figures as psutil.swap_memory(),
        which also reads /proc/vmstat for counters we do not need (it doubles the cost)."""
        fields = parse_meminfo(_read(f"{self._proc_root}/meminfo"))
        if "SwapTotal" in fields and "SwapFree" in fields:
            return fields["SwapTotal"], fields["SwapTotal"] - fields["SwapFree"]
        swap = psutil.swap_memory()
        return swap.total, swap.used

    def close(self) -> None:
        pass


def _cpu_freq():  # -> psutil scpufreq | None
    try:
        return psutil.cpu_freq()
    except (OSError, NotImplementedError, AttributeError):
        return None


def _positive(mhz: float | None) -> float | None:
    """psutil reports 0.0 where the kernel exposes no frequency: that is unknown, not 0 MHz."""
    return float(mhz) if mhz else None
