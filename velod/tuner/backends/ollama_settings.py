"""Ollama's server settings: which environment variables a version reads, and their defaults.

Ollama reads these variables once, when ``ollama serve`` starts. The set changes between
releases, so velod writes only the variables the running version reads (``known_for_version``)
and shows Ollama's own default next to each value it plans (``defaults_for``).

Sources (checked with velod's code search, Nov 2026):
- ollama/ollama ``envconfig/config.go``: names, parsers and defaults (``Uint("OLLAMA_NUM_PARALLEL",
  1)``, ``Uint("OLLAMA_MAX_QUEUE", 512)``, ``Uint64("OLLAMA_GPU_OVERHEAD", 0)``, ``KeepAlive`` and
  ``LoadTimeout`` 5m, ``ContextLength = Uint("OLLAMA_CONTEXT_LENGTH", 0)``, booleans through Go's
  ``strconv.ParseBool``, values trimmed of spaces and quotes by ``Var``).
- ollama/ollama ``server/routes.go`` (``Serve``): with OLLAMA_CONTEXT_LENGTH unset the default
  ``num_ctx`` comes from total VRAM minus OLLAMA_GPU_OVERHEAD per GPU: >= 47 GiB -> 262144,
  >= 23 GiB -> 32768, else 4096 ("slightly lower thresholds (47/23 GiB vs. 48/24 GiB)").
  docs/context-length.mdx states the same tiers as < 24 / 24-48 / >= 48 GiB.
- ollama/ollama ``ml/device.go`` (``FlashAttentionSupported``): every device must support it;
  CUDA except compute capability 7.2 (Jetson Xavier), ROCm, Metal, Vulkan and CPU do. The
  ">= 6.0" CUDA floor is the issue's statement; the ml/device.go versions found spell the
  CUDA test differently (one checks ``ComputeMajor < 6`` explicitly, an older one a
  ``DriverMajor >= 7`` field), so velod keeps the issue's rule.
- llama.cpp ``common/arg.cpp``/``common.h``: LLAMA_ARG_FIT_TARGET, free-memory margin per device
  for ``--fit`` in MiB, default 1024 (read by the llama-server engine Ollama uses since 0.30).
Version boundaries that the search could not confirm are marked "per issue 4" (taken from the
issue text, itself citing Ollama's 0.32/0.33 sources) or "unverified".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import total_ordering

from velod.hardware.snapshot import Gpu, Snapshot
from velod.tuner.backends.base import SettingsTable

GIB = 1024**3


# --------------------------------------------------------------------------- versions


class InvalidVersion(ValueError):
    """An Ollama version string that is not ``MAJOR.MINOR.PATCH[-pre]``."""


@total_ordering
@dataclass(frozen=True)
class Version:
    """An Ollama release number; ``pre`` is a pre-release tag such as ``rc1``."""

    major: int
    minor: int
    patch: int
    pre: str = ""

    _PATTERN = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?(?:[-+~]([0-9A-Za-z.\-+]+))?$")

    @classmethod
    def parse(cls, text: str) -> Version:
        match = cls._PATTERN.match(text.strip())
        if not match:
            raise InvalidVersion(f"{text!r} is not an Ollama version (expected e.g. '0.32.1')")
        major, minor, patch, pre = match.groups()
        return cls(int(major), int(minor), int(patch or 0), pre or "")

    @property
    def release(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    @property
    def is_dev_build(self) -> bool:
        """Ollama built from source without a version reports 0.0.0."""
        return self.release == (0, 0, 0)

    def __lt__(self, other: Version) -> bool:
        # A pre-release sorts before its release: 0.33.0-rc1 < 0.33.0.
        return (self.release, not self.pre, self.pre) < (other.release, not other.pre, other.pre)

    def __str__(self) -> str:
        base = f"{self.major}.{self.minor}.{self.patch}"
        return f"{base}-{self.pre}" if self.pre else base


def parse_version(version: str | Version | None) -> Version | None:
    """The version to gate settings by; None when unknown (None, garbage or a 0.0.0 dev build).

    A pre-release carries its release's settings: 0.30.0-rc1 already runs the 0.30 engine,
    so gating compares release numbers only.
    """
    if version is None or isinstance(version, Version):
        parsed = version
    else:
        try:
            parsed = Version.parse(version)
        except InvalidVersion:
            return None
    if parsed is None or parsed.is_dev_build:
        return None
    return parsed


def _v(text: str) -> Version:
    return Version.parse(text)


# --------------------------------------------------------------------------- value parsers

_GO_TRUE = {"1", "t", "true", "TRUE", "True", "T"}
_GO_FALSE = {"0", "f", "false", "FALSE", "False", "F"}
_DURATION = re.compile(r"^-?(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _trim(value: str) -> str:
    # envconfig.Var: strings.Trim(strings.TrimSpace(v), "\"'")
    return value.strip().strip("\"'")


def parse_bool(value: str) -> str:
    """Go's strconv.ParseBool, normalised to ``"true"``/``"false"``."""
    text = _trim(value)
    if text in _GO_TRUE:
        return "true"
    if text in _GO_FALSE:
        return "false"
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


def parse_uint(value: str) -> str:
    text = _trim(value)
    if not text.isdigit():
        raise ValueError(f"{value!r} is not a non-negative integer")
    return str(int(text))


def parse_positive(value: str) -> str:
    text = parse_uint(value)
    if int(text) == 0:
        raise ValueError(f"{value!r} must be greater than 0")
    return text


def parse_go_duration(value: str) -> str:
    """A Go duration ("5m", "1h30m", "-1") or a whole number of seconds, as Ollama reads it."""
    text = _trim(value)
    if re.fullmatch(r"-?\d+", text) or _DURATION.match(text):
        return text
    raise ValueError(f"{value!r} is not a duration (use e.g. 5m, 1h or -1 for forever)")


def parse_kv_cache_type(value: str) -> str:
    text = _trim(value).lower()
    if text not in ("f16", "q8_0", "q4_0"):
        raise ValueError(f"{value!r} is not a KV cache type (f16, q8_0 or q4_0)")
    return text


def parse_text(value: str) -> str:
    return _trim(value)


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class SettingSpec:
    """One environment variable of ``ollama serve``: when it exists and what it defaults to."""

    name: str
    default: str  # Ollama's default as written; see ``meaning`` for what it stands for
    meaning: str
    parse: Callable[[str], str]  # validates a value and returns its normalised text
    since: Version | None = None  # None: in every version velod supports
    until: Version | None = None  # first version that no longer reads it

    def exists_in(self, version: Version | None) -> bool:
        """True when ``version`` reads this variable; for an unknown version, only those
        that every version since 0.6 reads (conservative: never write a possibly ignored one)."""
        if version is None:
            return self.until is None and (self.since is None or self.since <= UNKNOWN_FLOOR)
        release = Version(*version.release)
        if self.since is not None and release < self.since:
            return False
        return self.until is None or release < self.until


# An unknown version is assumed to be at least this old; variables newer than it are not
# written until the version is known.
UNKNOWN_FLOOR = _v("0.6.0")
# Ollama 0.30 replaced its runners with the llama-server engine (per issue 4).
LLAMA_SERVER_ENGINE = _v("0.30.0")
# OLLAMA_NUM_PARALLEL defaults to 1 (before: 0 = auto, 4 or 1 by free memory). Per issue 4;
# the current envconfig reads Uint("OLLAMA_NUM_PARALLEL", 1).
PARALLEL_ONE_SINCE = _v("0.10.0")
# OLLAMA_CONTEXT_LENGTH unset = tier by total VRAM (routes.go); version per issue 4.
VRAM_CONTEXT_SINCE = _v("0.15.5")
# Before the VRAM tiers the default was 4096 (envconfig Uint(..., 4096)) and earlier 2048
# (the variable's first releases); both versions are unverified.
CONTEXT_4096_SINCE = _v("0.6.4")
# OLLAMA_FLASH_ATTENTION unset = auto where supported (envconfig BoolWithDefault); before,
# unset = off. The release that switched is unverified; velod always writes the value.
FLASH_ATTENTION_AUTO_SINCE = _v("0.13.0")

SETTINGS: dict[str, SettingSpec] = {s.name: s for s in (
    SettingSpec("OLLAMA_NUM_PARALLEL", "1", "parallel requests per model; the runner holds "
                "num_ctx x this many tokens of KV cache", parse_uint, since=_v("0.1.33")),
    SettingSpec("OLLAMA_MAX_LOADED_MODELS", "0", "models loaded at once; 0 = 3 per GPU "
                "(3 on CPU)", parse_uint, since=_v("0.1.33")),
    SettingSpec("OLLAMA_KEEP_ALIVE", "5m", "how long an idle model stays loaded; negative = "
                "forever", parse_go_duration),
    SettingSpec("OLLAMA_CONTEXT_LENGTH", "0", "default num_ctx; 0 = by total VRAM (4096 under "
                "23 GiB, 32768 under 47 GiB, else 262144)", parse_uint,
                since=_v("0.5.13")),  # first release unverified
    SettingSpec("OLLAMA_FLASH_ATTENTION", "", "flash attention; unset = auto where supported",
                parse_bool, since=_v("0.1.39")),  # first release unverified
    SettingSpec("OLLAMA_KV_CACHE_TYPE", "f16", "KV cache element type; q8_0/q4_0 need flash "
                "attention", parse_kv_cache_type, since=_v("0.5.0")),  # unverified
    SettingSpec("OLLAMA_GPU_OVERHEAD", "0", "bytes of VRAM per GPU Ollama leaves unused",
                parse_uint, since=_v("0.3.11")),  # unverified
    SettingSpec("OLLAMA_SCHED_SPREAD", "false", "always spread a model over all GPUs",
                parse_bool, since=_v("0.1.39")),  # unverified
    SettingSpec("OLLAMA_MAX_QUEUE", "512", "queued requests before Ollama answers busy",
                parse_positive, since=_v("0.1.33")),
    SettingSpec("OLLAMA_LOAD_TIMEOUT", "5m", "how long a model load may stall",
                parse_go_duration, since=_v("0.3.14")),  # unverified
    SettingSpec("LLAMA_ARG_FIT_TARGET", "1024", "MiB per device the llama-server engine keeps "
                "free when it fits unset options", parse_uint, since=LLAMA_SERVER_ENGINE),
    SettingSpec("OLLAMA_NEW_ENGINE", "false", "use the Ollama engine instead of llama.cpp's "
                "runner", parse_bool, since=_v("0.5.13"), until=LLAMA_SERVER_ENGINE),
    SettingSpec("OLLAMA_MULTIUSER_CACHE", "false", "prompt caching tuned for many users",
                parse_bool, since=_v("0.4.0"), until=LLAMA_SERVER_ENGINE),
    # Pass-through settings velod never plans but lets a user pin.
    SettingSpec("OLLAMA_HOST", "127.0.0.1:11434", "address Ollama listens on", parse_text),
    SettingSpec("OLLAMA_MODELS", "~/.ollama/models", "where models are stored", parse_text),
    SettingSpec("OLLAMA_ORIGINS", "", "extra allowed CORS origins", parse_text),
    SettingSpec("OLLAMA_DEBUG", "false", "debug logging", parse_text),
    SettingSpec("OLLAMA_NOPRUNE", "false", "keep unused blobs at start-up", parse_bool),
    SettingSpec("OLLAMA_LLM_LIBRARY", "", "force a runner library", parse_text),
    SettingSpec("CUDA_VISIBLE_DEVICES", "", "NVIDIA GPUs Ollama may use", parse_text),
    SettingSpec("HIP_VISIBLE_DEVICES", "", "AMD GPUs Ollama may use", parse_text),
    SettingSpec("ROCR_VISIBLE_DEVICES", "", "AMD GPUs Ollama may use", parse_text),
    SettingSpec("HSA_OVERRIDE_GFX_VERSION", "", "AMD gfx version override", parse_text),
)}

# Names people set believing Ollama reads them (the original VeloLLM wrote these). They are
# model parameters (Modelfile PARAMETER, /api/create, request options), not variables.
NOT_ENVIRONMENT = {
    "OLLAMA_NUM_CTX": "num_ctx", "OLLAMA_NUM_GPU": "num_gpu",
    "OLLAMA_NUM_BATCH": "num_batch", "OLLAMA_NUM_THREAD": "num_thread",
}


def known_for_version(version: str | Version | None) -> set[str]:
    """Names of the variables ``version`` reads (a conservative set when it is unknown)."""
    parsed = parse_version(version)
    return {name for name, spec in SETTINGS.items() if spec.exists_in(parsed)}


def normalize(name: str, value: str) -> str:
    """``value`` of variable ``name`` in canonical text ("1" -> "true" for booleans).

    Raises ValueError for a value Ollama would reject; unknown names pass through trimmed.
    """
    spec = SETTINGS.get(name)
    return spec.parse(value) if spec else _trim(value)


TABLE = SettingsTable(normalize, {name: spec.default for name, spec in SETTINGS.items()})


# --------------------------------------------------------------------------- defaults


def gpu_supports_flash_attention(gpu: Gpu) -> bool:
    """Ollama's rule (ml/device.go): CUDA cc >= 6.0 except 7.2; AMD (ROCm) supported."""
    if gpu.vendor == "amd":
        return True
    cc = gpu.compute_capability
    return cc is not None and cc >= (6, 0) and cc != (7, 2)


def flash_attention_supported(snapshot: Snapshot) -> bool:
    """True when the machine has GPUs and all of them support flash attention."""
    return bool(snapshot.gpus) and all(gpu_supports_flash_attention(g) for g in snapshot.gpus)


def default_context_length(version: Version | None, total_vram: int, gpu_overhead: int = 0,
                           gpus: int = 0) -> int:
    """The num_ctx Ollama uses when OLLAMA_CONTEXT_LENGTH is unset (routes.go tiers)."""
    if version is not None and version < CONTEXT_4096_SINCE:
        return 2048
    if version is not None and version < VRAM_CONTEXT_SINCE:
        return 4096
    usable = max(0, total_vram - gpu_overhead * gpus)
    if usable >= 47 * GIB:
        return 262144
    if usable >= 23 * GIB:
        return 32768
    return 4096


def defaults_for(version: str | Version | None, snapshot: Snapshot,
                 gpu_overhead: int = 0) -> dict[str, str]:
    """What each variable ``version`` reads is worth on this machine when it is unset.

    Values are normalised like ``normalize`` so they compare with planned values. For an
    unknown version the newest behaviour is assumed (0.33).
    """
    parsed = parse_version(version)
    out: dict[str, str] = {}
    for name in known_for_version(parsed):
        out[name] = SETTINGS[name].default
    if "OLLAMA_NUM_PARALLEL" in out and parsed is not None and parsed < PARALLEL_ONE_SINCE:
        out["OLLAMA_NUM_PARALLEL"] = "0"  # auto: 4, or 1 when memory is short
    if "OLLAMA_MAX_LOADED_MODELS" in out:
        out["OLLAMA_MAX_LOADED_MODELS"] = str(3 * max(1, len(snapshot.gpus)))
    if "OLLAMA_CONTEXT_LENGTH" in out:
        out["OLLAMA_CONTEXT_LENGTH"] = str(default_context_length(
            parsed, snapshot.vram_total, gpu_overhead, len(snapshot.gpus)))
    if "OLLAMA_FLASH_ATTENTION" in out:
        auto = parsed is None or parsed >= FLASH_ATTENTION_AUTO_SINCE
        out["OLLAMA_FLASH_ATTENTION"] = (
            "true" if auto and flash_attention_supported(snapshot) else "false")
    return out
