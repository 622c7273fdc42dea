"""llama-server's settings: the ``LLAMA_ARG_*`` variables it reads, their flags and defaults.

llama-server reads each of its options from a command-line flag or, when the flag is absent,
from an environment variable (``(env: LLAMA_ARG_CTX_SIZE)`` in its ``--help``). A flag wins
over the variable, so a setting fixed by the unit's ``ExecStart=`` line cannot be changed
through velod's drop-in: :func:`command_line_settings` finds those.

Every name, flag and default here is checked against the wheel's ``llama-server --help`` by
``tests/unit/tuner/test_backend_llama_server_settings.py``. Values are normalised the way
``common/arg.cpp`` reads them: booleans take on/enabled/true/1 and off/disabled/false/0;
``--flash-attn`` on/off/auto (booleans as on/off).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from velod.model.kv import LLAMA_CPP_CACHE_TYPES
from velod.tuner.backends.base import SettingsTable

_TRUE = {"on", "enabled", "true", "1"}
_FALSE = {"off", "disabled", "false", "0"}


def _text(value: str) -> str:
    return value.strip()


def parse_bool(value: str) -> str:
    """A llama.cpp boolean as ``"true"``/``"false"``."""
    text = value.strip().lower()
    if text in _TRUE:
        return "true"
    if text in _FALSE:
        return "false"
    raise ValueError(f"{value!r} is not a boolean (on/off, true/false, 1/0)")


def parse_on_off_auto(value: str) -> str:
    """``--flash-attn``'s value: on, off or auto (booleans read as on/off)."""
    text = value.strip().lower()
    if text == "auto":
        return "auto"
    return "on" if parse_bool(text) == "true" else "off"


def parse_on_off(value: str) -> str:
    return "on" if parse_bool(value) == "true" else "off"


def _integer(low: int, what: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        text = value.strip()
        try:
            number = int(text)
        except ValueError:
            raise ValueError(f"{value!r} is not a whole number") from None
        if number < low:
            raise ValueError(f"{value!r} must be {what}")
        return str(number)
    return parse


parse_count = _integer(0, "0 or more")
parse_positive = _integer(1, "1 or more")


def parse_slots(value: str) -> str:
    """``--parallel``: -1 (auto) or a slot count."""
    text = _integer(-1, "-1 (auto) or more")(value)
    if text == "0":
        raise ValueError(f"{value!r} is not a slot count (-1 = auto, or 1 or more)")
    return text


def parse_threads(value: str) -> str:
    return _integer(-1, "-1 (auto) or more")(value)


def parse_gpu_layers(value: str) -> str:
    """``--n-gpu-layers``: a number of layers, ``auto`` or ``all``."""
    text = value.strip().lower()
    if text in ("auto", "all"):
        return text
    return _integer(-1, "a number of layers, auto or all")(text)


def parse_cache_type(value: str) -> str:
    text = value.strip().lower()
    if text not in LLAMA_CPP_CACHE_TYPES:
        raise ValueError(f"{value!r} is not a KV cache type "
                         f"({', '.join(LLAMA_CPP_CACHE_TYPES)})")
    return text


@dataclass(frozen=True)
class LlamaSetting:
    """One option of llama-server: its variable, the flags that set it, its default."""

    name: str
    flags: tuple[str, ...]  # flags that set it (with a value, or "true" for a switch)
    default: str  # llama-server's default, as its --help states it
    meaning: str
    parse: Callable[[str], str]
    switch: bool = False  # a flag without a value: present = true
    negations: tuple[str, ...] = ()  # flags that set it to false


SETTINGS: dict[str, LlamaSetting] = {s.name: s for s in (
    LlamaSetting("LLAMA_ARG_CTX_SIZE", ("-c", "--ctx-size"), "0", "tokens of context in all; "
                 "each slot gets an equal share (0 = the model's trained context per slot)",
                 parse_count),
    LlamaSetting("LLAMA_ARG_N_PARALLEL", ("-np", "--parallel"), "-1", "server slots: requests "
                 "served at once (-1 = auto: 4 slots sharing one unified cache)", parse_slots),
    LlamaSetting("LLAMA_ARG_FLASH_ATTN", ("-fa", "--flash-attn"), "auto", "flash attention; "
                 "a quantized V cache needs it on", parse_on_off_auto),
    LlamaSetting("LLAMA_ARG_CACHE_TYPE_K", ("-ctk", "--cache-type-k"), "f16",
                 "KV cache type of K", parse_cache_type),
    LlamaSetting("LLAMA_ARG_CACHE_TYPE_V", ("-ctv", "--cache-type-v"), "f16",
                 "KV cache type of V (quantized only with flash attention)", parse_cache_type),
    LlamaSetting("LLAMA_ARG_N_GPU_LAYERS", ("-ngl", "--gpu-layers", "--n-gpu-layers"), "auto",
                 "layers held in VRAM (auto: as many as fit, all, or a number)",
                 parse_gpu_layers),
    LlamaSetting("LLAMA_ARG_KV_UNIFIED", ("-kvu", "--kv-unified"), "auto", "one KV pool shared "
                 "by all slots (auto: only when the slot count is auto)", parse_bool,
                 switch=True, negations=("-no-kvu", "--no-kv-unified")),
    LlamaSetting("LLAMA_ARG_SWA_FULL", ("--swa-full",), "false", "size sliding-window layers "
                 "like full ones", parse_bool, switch=True),
    LlamaSetting("LLAMA_ARG_UBATCH", ("-ub", "--ubatch-size"), "512", "physical batch size; "
                 "sliding-window caches hold one more", parse_positive),
    LlamaSetting("LLAMA_ARG_BATCH", ("-b", "--batch-size"), "2048", "logical batch size",
                 parse_positive),
    LlamaSetting("LLAMA_ARG_THREADS", ("-t", "--threads"), "-1", "CPU threads for generation "
                 "(-1 = auto)", parse_threads),
    LlamaSetting("LLAMA_ARG_FIT", ("-fit", "--fit"), "on", "adjust unset options to fit the "
                 "device memory", parse_on_off),
    LlamaSetting("LLAMA_ARG_FIT_TARGET", ("-fitt", "--fit-target"), "1024", "MiB per device "
                 "--fit keeps free", _text),
    LlamaSetting("LLAMA_ARG_CACHE_RAM", ("-cram", "--cache-ram"), "8192", "MiB of host memory "
                 "for the prompt cache (-1 = no limit, 0 = off)", _integer(-1, "-1 or more")),
    LlamaSetting("LLAMA_ARG_CONT_BATCHING", ("-cb", "--cont-batching"), "true", "continuous "
                 "batching", parse_bool, switch=True, negations=("-nocb", "--no-cont-batching")),
    LlamaSetting("LLAMA_ARG_ENDPOINT_METRICS", ("--metrics",), "false", "the Prometheus "
                 "/metrics endpoint", parse_bool, switch=True),
    # Pass-through settings velod never plans but lets a user pin.
    LlamaSetting("LLAMA_ARG_MODEL", ("-m", "--model"), "", "model path", _text),
    LlamaSetting("LLAMA_ARG_ALIAS", ("-a", "--alias"), "", "model name aliases", _text),
    LlamaSetting("LLAMA_ARG_HOST", ("--host",), "127.0.0.1", "address it listens on", _text),
    LlamaSetting("LLAMA_ARG_PORT", ("--port",), "8080", "port it listens on", parse_positive),
    LlamaSetting("LLAMA_ARG_MAIN_GPU", ("-mg", "--main-gpu"), "0", "the GPU for the model",
                 parse_count),
    LlamaSetting("LLAMA_ARG_SPLIT_MODE", ("-sm", "--split-mode"), "layer", "how to split the "
                 "model over GPUs", _text),
    LlamaSetting("LLAMA_ARG_TENSOR_SPLIT", ("-ts", "--tensor-split"), "", "share of the model "
                 "per GPU", _text),
    LlamaSetting("LLAMA_ARG_DEVICE", ("-dev", "--device"), "", "devices to offload to", _text),
)}

# Settings whose values decide the KV cache and the slots, which velod plans.
PLANNED = ("LLAMA_ARG_CTX_SIZE", "LLAMA_ARG_N_PARALLEL", "LLAMA_ARG_FLASH_ATTN",
           "LLAMA_ARG_CACHE_TYPE_K", "LLAMA_ARG_CACHE_TYPE_V", "LLAMA_ARG_N_GPU_LAYERS")


def normalize(name: str, value: str) -> str:
    """``value`` of ``name`` in canonical text; ValueError for what llama-server refuses.
    Names outside the table pass through trimmed."""
    spec = SETTINGS.get(name)
    return spec.parse(value) if spec else value.strip()


TABLE = SettingsTable(normalize, {n: s.default for n, s in SETTINGS.items()})


# --------------------------------------------------------------------------- command line


@dataclass(frozen=True)
class CommandLineValue:
    """A setting fixed by a flag on the command line: its value, and the flag as written."""

    value: str
    written: str


def _flag_table() -> dict[str, tuple[LlamaSetting, str | None]]:
    """Flag -> (setting, fixed value or None when the value follows)."""
    out: dict[str, tuple[LlamaSetting, str | None]] = {}
    for spec in SETTINGS.values():
        for flag in spec.flags:
            out[flag] = (spec, "true" if spec.switch else None)
        for flag in spec.negations:
            out[flag] = (spec, "false")
    return out


_FLAGS = _flag_table()
# Flags whose value may be left out (``-fa`` alone means on).
_OPTIONAL_VALUE = {"LLAMA_ARG_FLASH_ATTN": "on", "LLAMA_ARG_FIT": "on"}


def command_line_settings(argv: list[str]) -> dict[str, CommandLineValue]:
    """The settings ``argv`` (a llama-server command line) fixes with flags, by variable.

    ``--flag value`` and ``--flag=value`` are read; the last occurrence wins, as in
    llama-server. A value llama-server would refuse is kept as written.
    """
    out: dict[str, CommandLineValue] = {}
    i = 1  # argv[0] is the program
    while i < len(argv):
        word = argv[i]
        flag, eq, inline = word.partition("=") if word.startswith("--") else (word, "", "")
        entry = _FLAGS.get(flag)
        i += 1
        if entry is None:
            continue
        spec, fixed = entry
        if fixed is not None:
            out[spec.name] = CommandLineValue(fixed, word)
            continue
        if eq:
            raw, written = inline, word
        elif (i < len(argv) and (not argv[i].startswith("-") or _is_number(argv[i]))
              and (spec.name not in _OPTIONAL_VALUE or _accepts(spec, argv[i]))):
            raw, written = argv[i], f"{flag} {argv[i]}"
            i += 1
        elif spec.name in _OPTIONAL_VALUE:
            raw, written = _OPTIONAL_VALUE[spec.name], flag
        else:
            continue  # a flag without its value: llama-server would refuse to start
        try:
            value = spec.parse(raw)
        except ValueError:
            value = raw
        out[spec.name] = CommandLineValue(value, written)
    return out


def _is_number(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _accepts(spec: LlamaSetting, raw: str) -> bool:
    try:
        spec.parse(raw)
    except ValueError:
        return False
    return True
