"""The table of Ollama's environment variables: versions, parsers and defaults."""

from __future__ import annotations

import pytest

from velod.hardware.snapshot import Cpu, Gpu, Memory, OsInfo, Snapshot
from velod.tuner.backends.ollama_settings import (
    SETTINGS,
    InvalidVersion,
    Version,
    defaults_for,
    known_for_version,
    normalize,
    parse_version,
)

GIB = 1024**3


def machine(*gpus: Gpu) -> Snapshot:
    return Snapshot(time=0.0, gpus=tuple(gpus), cpu=Cpu("x86", 8, 16),
                    memory=Memory(64 * GIB, 60 * GIB), os=OsInfo("Linux", "6.1", "x86_64"))


def nvidia(total: float, cc: tuple[int, int] = (8, 9), index: int = 0) -> Gpu:
    return Gpu(index=index, vendor="nvidia", name="GPU", memory_total=int(total * GIB),
               compute_capability=cc)


# --------------------------------------------------------------------------- versions


@pytest.mark.parametrize(("text", "expected"), [
    ("0.32.1", Version(0, 32, 1)),
    ("v0.5.7", Version(0, 5, 7)),
    ("0.33.0-rc1", Version(0, 33, 0, "rc1")),
    ("0.6", Version(0, 6, 0)),
    (" 0.30.2 ", Version(0, 30, 2)),
])
def test_version_parse(text: str, expected: Version) -> None:
    assert Version.parse(text) == expected


@pytest.mark.parametrize("text", ["", "latest", "0", "0.x.1", "1.2.3.4.5"])
def test_version_parse_rejects_garbage(text: str) -> None:
    with pytest.raises(InvalidVersion):
        Version.parse(text)


def test_version_order_puts_release_candidates_before_their_release() -> None:
    assert Version.parse("0.32.9") < Version.parse("0.33.0-rc1") < Version.parse("0.33.0")
    assert Version.parse("0.9.0") < Version.parse("0.10.0")  # numeric, not lexical
    assert str(Version.parse("0.33.0-rc1")) == "0.33.0-rc1"


def test_unknown_dev_and_garbage_versions_are_unknown() -> None:
    assert parse_version(None) is None
    assert parse_version("0.0.0") is None  # a source build without a version
    assert parse_version("not a version") is None
    assert parse_version("0.32.1") == Version(0, 32, 1)


# --------------------------------------------------------------------------- which variables


def test_0_29_reads_the_old_engine_variables_and_not_the_fit_target() -> None:
    known = known_for_version("0.29.3")
    assert {"OLLAMA_NEW_ENGINE", "OLLAMA_MULTIUSER_CACHE"} <= known
    assert "LLAMA_ARG_FIT_TARGET" not in known


def test_0_30_and_its_release_candidate_read_the_new_set() -> None:
    for version in ("0.30.0", "0.30.0-rc1", "0.33.0"):
        known = known_for_version(version)
        assert "LLAMA_ARG_FIT_TARGET" in known, version
        assert not {"OLLAMA_NEW_ENGINE", "OLLAMA_MULTIUSER_CACHE"} & known, version


def test_unknown_version_gets_only_variables_every_recent_release_reads() -> None:
    for version in (None, "0.0.0", "garbage"):
        known = known_for_version(version)
        assert not {"LLAMA_ARG_FIT_TARGET", "OLLAMA_NEW_ENGINE",
                    "OLLAMA_MULTIUSER_CACHE"} & known
        assert {"OLLAMA_NUM_PARALLEL", "OLLAMA_CONTEXT_LENGTH", "OLLAMA_KV_CACHE_TYPE",
                "OLLAMA_FLASH_ATTENTION", "OLLAMA_KEEP_ALIVE"} <= known


def test_old_versions_lack_later_variables() -> None:
    assert "OLLAMA_CONTEXT_LENGTH" not in known_for_version("0.5.4")
    assert "OLLAMA_KV_CACHE_TYPE" not in known_for_version("0.4.7")
    assert "OLLAMA_KV_CACHE_TYPE" in known_for_version("0.5.0")


def test_model_parameters_are_not_in_the_table() -> None:
    for name in ("OLLAMA_NUM_CTX", "OLLAMA_NUM_GPU", "OLLAMA_NUM_BATCH"):
        assert name not in SETTINGS


# --------------------------------------------------------------------------- parsers


@pytest.mark.parametrize(("name", "raw", "normal"), [
    ("OLLAMA_FLASH_ATTENTION", "1", "true"),
    ("OLLAMA_FLASH_ATTENTION", " 'TRUE' ", "true"),
    ("OLLAMA_SCHED_SPREAD", "F", "false"),
    ("OLLAMA_KV_CACHE_TYPE", "Q8_0", "q8_0"),
    ("OLLAMA_NUM_PARALLEL", "04", "4"),
    ("OLLAMA_KEEP_ALIVE", "-1", "-1"),
    ("OLLAMA_KEEP_ALIVE", "1h30m", "1h30m"),
    ("OLLAMA_HOST", '"0.0.0.0:11434"', "0.0.0.0:11434"),
])
def test_normalize(name: str, raw: str, normal: str) -> None:
    assert normalize(name, raw) == normal


@pytest.mark.parametrize(("name", "raw"), [
    ("OLLAMA_FLASH_ATTENTION", "yes"),
    ("OLLAMA_KV_CACHE_TYPE", "q5_1"),
    ("OLLAMA_NUM_PARALLEL", "-1"),
    ("OLLAMA_MAX_QUEUE", "0"),
    ("OLLAMA_KEEP_ALIVE", "forever"),
])
def test_normalize_rejects_what_ollama_would_not_read(name: str, raw: str) -> None:
    with pytest.raises(ValueError):
        normalize(name, raw)


# --------------------------------------------------------------------------- defaults


@pytest.mark.parametrize(("gpus", "expected"), [
    ((), "4096"),
    ((nvidia(16),), "4096"),
    ((nvidia(22.99),), "4096"),
    ((nvidia(23),), "32768"),  # routes.go: >= 23 GiB, one below the documented 24
    ((nvidia(24),), "32768"),
    ((nvidia(46.9),), "32768"),
    ((nvidia(47),), "262144"),
    ((nvidia(80),), "262144"),
    ((nvidia(24), nvidia(24, index=1)), "262144"),  # total VRAM over all GPUs
])
def test_context_length_default_by_total_vram(gpus: tuple[Gpu, ...], expected: str) -> None:
    assert defaults_for("0.32.1", machine(*gpus))["OLLAMA_CONTEXT_LENGTH"] == expected


def test_context_length_default_counts_gpu_overhead_per_gpu() -> None:
    snap = machine(nvidia(24))
    assert defaults_for("0.32.1", snap, gpu_overhead=GIB)["OLLAMA_CONTEXT_LENGTH"] == "32768"
    assert defaults_for("0.32.1", snap, gpu_overhead=2 * GIB)["OLLAMA_CONTEXT_LENGTH"] == "4096"


def test_context_length_default_before_vram_tiers() -> None:
    assert defaults_for("0.15.4", machine(nvidia(80)))["OLLAMA_CONTEXT_LENGTH"] == "4096"
    assert defaults_for("0.15.5", machine(nvidia(80)))["OLLAMA_CONTEXT_LENGTH"] == "262144"


def test_num_parallel_default_is_one_since_0_10() -> None:
    assert defaults_for("0.10.0", machine())["OLLAMA_NUM_PARALLEL"] == "1"
    assert defaults_for("0.9.6", machine())["OLLAMA_NUM_PARALLEL"] == "0"


def test_max_loaded_models_default_is_three_per_gpu() -> None:
    assert defaults_for("0.32.1", machine())["OLLAMA_MAX_LOADED_MODELS"] == "3"
    two = machine(nvidia(24), nvidia(24, index=1))
    assert defaults_for("0.32.1", two)["OLLAMA_MAX_LOADED_MODELS"] == "6"


@pytest.mark.parametrize(("gpus", "expected"), [
    ((nvidia(24, (8, 9)),), "true"),
    ((nvidia(16, (6, 0)),), "true"),
    ((nvidia(32, (7, 2)),), "false"),  # Jetson Xavier
    ((nvidia(4, (5, 2)),), "false"),  # Maxwell
    ((nvidia(24, (8, 6)), nvidia(32, (7, 2), index=1)), "false"),  # all GPUs must support it
    ((Gpu(index=0, vendor="amd", name="RX 7900 XTX", memory_total=24 * GIB),), "true"),
    ((), "false"),
])
def test_flash_attention_default_is_auto_where_supported(gpus: tuple[Gpu, ...],
                                                         expected: str) -> None:
    assert defaults_for("0.32.1", machine(*gpus))["OLLAMA_FLASH_ATTENTION"] == expected


def test_defaults_cover_exactly_the_known_variables() -> None:
    for version in ("0.29.0", "0.30.0", None):
        assert set(defaults_for(version, machine(nvidia(24)))) == known_for_version(version)


def test_default_values_are_already_normalised() -> None:
    for name, value in defaults_for("0.32.1", machine(nvidia(24))).items():
        if value:
            assert normalize(name, value) == value, name
