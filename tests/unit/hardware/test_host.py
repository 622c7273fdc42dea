"""CPU, memory and OS: the real psutil on this machine, plus parsers on recorded files."""

from __future__ import annotations

import platform
from pathlib import Path

import psutil

from velod.hardware.host import HostSource, parse_cpuinfo, parse_meminfo, parse_os_release

XEON_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni \
avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8 avx_vnni

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx avx2
"""

GRACE_CPUINFO = """\
processor\t: 0
BogoMIPS\t: 2000.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimdhp asimddp sve sve2 i8mm bf16
CPU implementer\t: 0x41
"""


def test_cpuinfo_keeps_only_inference_flags_in_a_stable_order() -> None:
    model, flags = parse_cpuinfo(XEON_CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert flags == ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw",
                     "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                     "amx_int8", "amx_bf16")
    assert "sse2" not in flags and "fpu" not in flags


def test_cpuinfo_of_an_arm_cpu_reads_the_features_line() -> None:
    model, flags = parse_cpuinfo(GRACE_CPUINFO)
    assert model is None
    assert flags == ("asimd", "asimdhp", "asimddp", "sve", "sve2", "i8mm", "bf16")


def test_os_release_pretty_name() -> None:
    text = 'NAME="Debian GNU/Linux"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\n'
    assert parse_os_release(text) == "Debian GNU/Linux 12 (bookworm)"
    assert parse_os_release("ID=arch\n") is None


def test_reading_matches_psutil_on_this_machine() -> None:
    reading = HostSource().read()
    assert reading.memory.total == psutil.virtual_memory().total
    assert reading.memory.swap_total == psutil.swap_memory().total
    assert 0 < reading.memory.available <= reading.memory.total
    assert reading.cpu.threads == psutil.cpu_count(logical=True)
    assert reading.cpu.physical_cores == psutil.cpu_count(logical=False)
    assert reading.os.kernel == platform.release()
    assert reading.os.arch == platform.machine()
    assert reading.os.system == "Linux"
    assert reading.cpu.utilization is not None and 0 <= reading.cpu.utilization <= 100


def test_flags_and_model_come_from_proc_cpuinfo(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(XEON_CPUINFO)
    reading = HostSource(proc_root=str(tmp_path), etc_root=str(tmp_path)).read()
    assert reading.cpu.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert "amx_tile" in reading.cpu.flags
    assert reading.os.distro is None  # no os-release there


def test_flags_of_this_cpu_agree_with_proc_cpuinfo() -> None:
    text = Path("/proc/cpuinfo").read_text()
    reading = HostSource().read()
    for flag in reading.cpu.flags:
        assert f" {flag}" in text


def test_unknown_frequency_is_none_not_zero() -> None:
    reading = HostSource().read()
    for mhz in (reading.cpu.freq_current_mhz, reading.cpu.freq_max_mhz):
        assert mhz is None or mhz > 0


def test_meminfo_fields_are_bytes() -> None:
    text = "MemTotal:       32768000 kB\nSwapTotal:       8388604 kB\nSwapFree:  100 kB\n" \
           "HugePages_Total:       0\n"
    fields = parse_meminfo(text)
    assert fields["SwapTotal"] == 8388604 * 1024 and fields["SwapFree"] == 102400
    assert fields["HugePages_Total"] == 0


def test_swap_figures_equal_psutil_swap_memory() -> None:
    reading = HostSource().read()
    swap = psutil.swap_memory()
    assert reading.memory.swap_total == swap.total
    assert abs(reading.memory.swap_used - swap.used) < 64 * 1024**2
