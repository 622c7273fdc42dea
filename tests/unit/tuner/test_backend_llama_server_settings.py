"""llama-server's settings table against the wheel's own ``--help``, and flag detection."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from velod.tuner.backends.llama_server_settings import (
    PLANNED,
    SETTINGS,
    TABLE,
    command_line_settings,
    normalize,
)
from velod.tuner.dropin import split_command


@pytest.fixture(scope="module")
def help_options(llama_bin: Path) -> dict[str, set[str]]:
    """Every ``(env: NAME)`` of ``llama-server --help`` with the flags of its option."""
    text = subprocess.run([str(llama_bin / "llama-server"), "--help"], capture_output=True,
                          text=True, timeout=60).stdout
    out: dict[str, set[str]] = {}
    for block in re.split(r"\n(?=-)", text):
        env = re.search(r"\(env: (LLAMA_ARG_\w+)\)", block)
        if env:
            first = block.splitlines()[0]  # the flags, then the description
            out[env.group(1)] = {w.strip(",") for w in first.split() if w.startswith("-")}
    return out


def test_every_variable_velod_knows_is_one_llama_server_reads(
        help_options: dict[str, set[str]]) -> None:
    missing = [name for name in SETTINGS if name not in help_options]
    assert not missing, f"llama-server --help has no (env: ...) for {missing}"


def test_every_flag_velod_knows_sets_that_variable(help_options: dict[str, set[str]]) -> None:
    for name, spec in SETTINGS.items():
        known = set(spec.flags) | set(spec.negations)
        assert known <= help_options[name], (name, known - help_options[name])


def test_defaults_are_the_ones_help_states(llama_bin: Path) -> None:
    text = subprocess.run([str(llama_bin / "llama-server"), "--help"], capture_output=True,
                          text=True, timeout=60).stdout
    assert "--ctx-size N                     size of the prompt context (default: 0" in text
    assert "number of server slots (default: -1, -1 = auto)" in text
    assert "'auto', default: 'auto')" in text  # --flash-attn
    assert "physical maximum batch size (default: 512)" in text
    for name in PLANNED:
        assert name in SETTINGS


@pytest.mark.parametrize(("name", "value", "canonical"), [
    ("LLAMA_ARG_FLASH_ATTN", "enabled", "on"), ("LLAMA_ARG_FLASH_ATTN", "0", "off"),
    ("LLAMA_ARG_FLASH_ATTN", "Auto", "auto"), ("LLAMA_ARG_KV_UNIFIED", "1", "true"),
    ("LLAMA_ARG_N_GPU_LAYERS", "ALL", "all"), ("LLAMA_ARG_N_GPU_LAYERS", " 33 ", "33"),
    ("LLAMA_ARG_CACHE_TYPE_K", "Q8_0", "q8_0"), ("LLAMA_ARG_N_PARALLEL", "-1", "-1"),
])
def test_values_are_read_as_llama_server_reads_them(name: str, value: str,
                                                   canonical: str) -> None:
    assert normalize(name, value) == canonical


@pytest.mark.parametrize(("name", "value", "why"), [
    ("LLAMA_ARG_FLASH_ATTN", "bogus", "not a boolean"),
    ("LLAMA_ARG_CTX_SIZE", "abc", "not a whole number"),
    ("LLAMA_ARG_N_PARALLEL", "0", "not a slot count"),
    ("LLAMA_ARG_CACHE_TYPE_V", "q3_k", "not a KV cache type"),
])
def test_a_value_llama_server_refuses_is_named(name: str, value: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        normalize(name, value)


def test_unset_and_default_spellings_compare_equal() -> None:
    assert TABLE.means_default("LLAMA_ARG_FLASH_ATTN", "AUTO")
    assert TABLE.same("LLAMA_ARG_KV_UNIFIED", "on", "true")
    assert not TABLE.same("LLAMA_ARG_N_PARALLEL", "2", "4")


def test_flags_on_the_command_line_are_found_with_their_values() -> None:
    argv = split_command('/usr/bin/llama-server -m "/models/my model.gguf" -c 8192 '
                         "--parallel=3 -fa --kv-unified -ngl all --no-cont-batching -t 2")
    fixed = command_line_settings(argv)
    assert fixed["LLAMA_ARG_CTX_SIZE"].value == "8192"
    assert fixed["LLAMA_ARG_CTX_SIZE"].written == "-c 8192"
    assert fixed["LLAMA_ARG_N_PARALLEL"].value == "3"
    assert fixed["LLAMA_ARG_FLASH_ATTN"].value == "on"  # -fa alone
    assert fixed["LLAMA_ARG_FLASH_ATTN"].written == "-fa"
    assert fixed["LLAMA_ARG_KV_UNIFIED"].value == "true"
    assert fixed["LLAMA_ARG_CONT_BATCHING"].value == "false"
    assert fixed["LLAMA_ARG_N_GPU_LAYERS"].value == "all"
    assert fixed["LLAMA_ARG_MODEL"].value == "/models/my model.gguf"
    assert "LLAMA_ARG_CACHE_TYPE_K" not in fixed


def test_the_last_flag_wins_and_unknown_flags_are_skipped() -> None:
    fixed = command_line_settings(["llama-server", "--jinja", "-c", "1024", "--ctx-size",
                                   "2048", "-fa", "off", "--mystery", "-np", "-1"])
    assert fixed["LLAMA_ARG_CTX_SIZE"].value == "2048"
    assert fixed["LLAMA_ARG_FLASH_ATTN"].value == "off"
    assert fixed["LLAMA_ARG_N_PARALLEL"].value == "-1"
