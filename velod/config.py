"""velod's configuration: the schema (dataclasses), loading and validation.

Every key has a default, a type and, where it matters, a range. Loading collects
*all* problems and raises :class:`ConfigError`, each :class:`ConfigIssue` naming the
key path, the value and the reason (with a did-you-mean for unknown keys).
``etc/velod/velod.yaml`` documents every key and equals these defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NewType

import yaml

from velod.units import format_duration, format_size_exact, parse_duration, parse_size

Duration = NewType("Duration", float)  # seconds; written "500ms", "30s", "10m"
Size = NewType("Size", int)  # bytes; written "512MiB", "2GiB"


@dataclass(frozen=True)
class MemoryAmount:
    """Either a number of bytes or a fraction (0 < f <= 1) of the free memory of a device."""

    bytes: int | None = None
    fraction: float | None = None

    def resolve(self, free_bytes: int) -> int:
        """Bytes this amount stands for on a device with ``free_bytes`` free."""
        if self.bytes is not None:
            return self.bytes
        return int(free_bytes * (self.fraction or 0.0))

    def __str__(self) -> str:
        return format_size_exact(self.bytes) if self.bytes is not None else f"{self.fraction:g}"


def parse_memory_amount(value: object) -> MemoryAmount:
    if isinstance(value, float) or (isinstance(value, str) and _is_fraction(value)):
        fraction = float(value)  # type: ignore[arg-type]
        if not 0 < fraction <= 1:
            raise ValueError("a fraction of free memory must be in (0, 1]")
        return MemoryAmount(fraction=fraction)
    return MemoryAmount(bytes=parse_size(value))  # type: ignore[arg-type]


def _is_fraction(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return "." in text


def _check(reason: str, ok: typing.Callable[[Any], bool]) -> typing.Callable[[Any], str | None]:
    return lambda v: None if ok(v) else reason


def _opt(default: Any, doc: str, check: typing.Callable[[Any], str | None] | None = None) -> Any:
    meta = {"doc": doc, "check": check}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


positive = _check("must be greater than 0", lambda v: v > 0)
non_negative = _check("must not be negative", lambda v: v >= 0)
percent = _check("must be between 0 and 100", lambda v: 0 <= v <= 100)
power_of_two = _check("must be a power of two", lambda v: v > 0 and v & (v - 1) == 0)


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = _opt("info", "Log level.")


@dataclass(frozen=True)
class ControlConfig:
    socket: str = _opt("", "Socket path; empty = /run/velod/velod.sock as root, "
                       "else $XDG_RUNTIME_DIR/velod/velod.sock.")
    admin_group: str = _opt("velod", "Members of this group may call methods that change things.")
    max_message_size: Size = _opt(Size(1024**2), "Largest accepted request.",
                                  _check("must be between 1KiB and 64MiB",
                                         lambda v: 1024 <= v <= 64 * 1024**2))
    max_connections: int = _opt(64, "Simultaneous client connections.", positive)
    idle_timeout: Duration = _opt(Duration(60.0), "Close a connection silent this long "
                                  "(event subscribers excepted).", positive)
    max_inflight: int = _opt(16, "Requests one connection may have in flight.", positive)


@dataclass(frozen=True)
class HardwareConfig:
    enabled: bool = _opt(True, "Watch GPUs, CPU and memory.")
    interval: Duration = _opt(Duration(5.0), "Time between polls.",
                              _check("must be at least 100ms", lambda v: v >= 0.1))
    timeout: Duration = _opt(Duration(10.0), "A poll that takes longer is abandoned.", positive)
    nvml: bool = _opt(True, "Query NVIDIA GPUs through NVML.")
    sysfs_root: str = _opt("/sys", "Where to read AMD GPUs' sysfs files.")
    vram_change_threshold: Size = _opt(Size(512 * 1024**2), "Free VRAM change that counts.")
    vram_change_percent: float = _opt(10.0, "Free VRAM change, in % of total, that counts.",
                                      percent)
    ram_available_threshold: Size = _opt(Size(2 * 1024**3),
                                         "Report when available RAM crosses this.")
    history_size: int = _opt(720, "Samples kept for hardware.history.", positive)


@dataclass(frozen=True)
class OllamaConfig:
    enabled: bool = _opt(True, "Tune Ollama (false on machines that only run llama-server).")
    url: str = _opt("", "Ollama's address; empty = $OLLAMA_HOST or http://127.0.0.1:11434.")
    service: str = _opt("ollama.service", "The systemd unit that runs Ollama.")
    systemd_dir: str = _opt("/etc/systemd/system", "Where the unit's drop-in directory lives.")
    dropin: str = _opt("50-velod.conf", "File name of velod's drop-in.")
    systemctl: str = _opt("systemctl", "The systemctl program.")
    request_timeout: Duration = _opt(Duration(10.0), "Timeout of one HTTP request.", positive)


@dataclass(frozen=True)
class LlamaServerConfig:
    """One llama.cpp llama-server velod tunes (an item of the ``llama_server`` list)."""

    name: str = _opt("", "What velodctl calls it (--server); empty = llama-server, then "
                     "llama-server-2, ... in list order.")
    url: str = _opt("", "Its address, e.g. http://127.0.0.1:8080; empty = not managed.")
    unit: str = _opt("llama-server.service", "The systemd unit that runs it.")
    systemd_dir: str = _opt("/etc/systemd/system", "Where the unit's drop-in directory lives.")
    dropin: str = _opt("50-velod.conf", "File name of velod's drop-in.")
    systemctl: str = _opt("systemctl", "The systemctl program.")
    request_timeout: Duration = _opt(Duration(10.0), "Timeout of one HTTP request.", positive)
    start_timeout: Duration = _opt(Duration(120.0), "How long it may take to load its model "
                                   "after a restart.", positive)
    pin: dict[str, str] = _opt({}, "Settings velod must never change, with their value, "
                               "e.g. LLAMA_ARG_N_GPU_LAYERS: all.")


@dataclass(frozen=True)
class TunerConfig:
    enabled: bool = _opt(True, "Plan the servers' settings (Ollama, each llama_server).")
    mode: Literal["observe", "apply"] = _opt("observe", "observe: recommend only; "
                                             "apply: write the drop-in and restart the server.")
    profile: Literal["balanced", "throughput", "long-context", "low-memory"] = _opt(
        "balanced", "What the plan optimises for.")
    reserve_vram: Size = _opt(Size(512 * 1024**2), "VRAM per GPU left to other programs.")
    pin: dict[str, str] = _opt({}, "Ollama settings velod must never change, with their "
                               "value, e.g. OLLAMA_KEEP_ALIVE: 30m.")
    models: list[str] = _opt([], "The Ollama models that matter most, first first; "
                             "empty = every installed model.")
    interval: Duration = _opt(Duration(60.0), "Time between checks of each server.", positive)
    settle: Duration = _opt(Duration(120.0), "A changed plan must hold this long before "
                            "it is applied.", non_negative)
    restart_when_idle_for: Duration = _opt(Duration(120.0), "Restart a server only after it "
                                           "has been idle this long.", non_negative)
    min_restart_interval: Duration = _opt(Duration(1800.0), "At most one restart per this "
                                          "interval.", non_negative)
    model_variants: bool = _opt(False, "Create '<model><suffix>' variants with the planned "
                                "parameters through /api/create.")
    variant_suffix: str = _opt("-velod", "Suffix of derived model variants.",
                               _check("must not be empty", bool))
    verify: bool = _opt(False, "Benchmark after each applied change; roll back if slower.")
    explore: bool = _opt(False, "Try safe candidate settings when idle; keep the fastest.")
    verify_tokens: int = _opt(64, "Tokens generated per request by verify/explore "
                              "benchmarks.", positive)
    verify_repeat: int = _opt(3, "Measured runs per verify/explore benchmark (after one "
                              "warm-up).", positive)
    verify_tolerance: float = _opt(0.05, "A change counts as slower (or faster) only beyond "
                                   "this fraction of the speed and the measured spread.",
                                   _check("must be between 0 and 1", lambda v: 0 <= v < 1))
    verify_timeout: Duration = _opt(Duration(120.0), "Longest a verify/explore benchmark may "
                                    "run.", positive)


@dataclass(frozen=True)
class GeometryConfig:
    layers: int = _opt(16, "Transformer layers.", positive)
    heads: int = _opt(32, "Query heads.", positive)
    kv_heads: int = _opt(8, "Key/value heads (divides heads).", positive)
    head_dim: int = _opt(64, "Dimension of one head.", positive)
    max_context: int = _opt(8192, "Longest sequence, prompt and output together.", positive)


@dataclass(frozen=True)
class EngineConfig:
    enabled: bool = _opt(True, "Host the engine (allocates nothing until used).")
    model: str = _opt("llama3.2-1b", "Geometry preset, or 'custom' to use engine.geometry.")
    geometry: GeometryConfig | None = _opt(None, "Explicit geometry when model is 'custom'.")
    dtype: Literal["float16", "bfloat16", "float32"] = _opt("float16", "KV cache element type "
                                                            "(CPU math is float32).")
    device: Literal["auto", "cpu", "cuda"] = _opt("auto", "auto = CUDA when PyCUDA and a GPU "
                                                  "are present.")
    kv_cache: MemoryAmount = _opt(MemoryAmount(bytes=1024**3), "KV pool: bytes ('4GiB') or a "
                                  "fraction of free device memory (0.5).")
    block_size: int = _opt(16, "Tokens per KV block (8, 16 or 32).",
                           _check("must be 8, 16 or 32", lambda v: v in (8, 16, 32)))
    max_batch_size: int = _opt(64, "Sequences per step.", positive)
    max_tokens_per_step: int = _opt(2048, "Tokens per step (prefill chunks + decode).", positive)
    max_waiting: int = _opt(4096, "Queued requests before submit says busy.", positive)
    idle_release: Duration = _opt(Duration(600.0), "Free the KV pool after this long idle.",
                                  positive)


@dataclass(frozen=True)
class Config:
    log: LogConfig = field(default_factory=LogConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    ollama: OllamaConfig = field(default_factory=OllamaConfig)
    llama_server: list[LlamaServerConfig] = _opt([], "llama.cpp servers velod tunes beside "
                                                 "Ollama (a list; see the keys below).")
    tuner: TunerConfig = field(default_factory=TunerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    state_dir: str = _opt("", "Where velod keeps its history; empty = /var/lib/velod as root, "
                          "else $XDG_STATE_HOME/velod.")


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: the key path (``tuner.mode``), the offending value and why."""

    path: str
    value: Any
    reason: str

    def __str__(self) -> str:
        return f"{self.path or '<top>'}: {self.reason} (got {self.value!r})"


class ConfigError(Exception):
    """The config was refused; ``issues`` lists every problem found."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        lines = "\n".join(f"  {i}" for i in issues)
        super().__init__(f"invalid config {source}:\n{lines}")


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _convert(tp: Any, value: Any, path: str, issues: list[ConfigIssue]) -> Any:
    """Convert a YAML value to the annotated type, appending issues instead of raising."""
    origin = typing.get_origin(tp)
    if tp is Duration or tp is Size or tp is MemoryAmount:
        parser = {Duration: parse_duration, Size: parse_size, MemoryAmount: parse_memory_amount}
        try:
            return parser[tp](value)
        except (ValueError, TypeError) as exc:
            issues.append(ConfigIssue(path, value, str(exc)))
            return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        issues.append(ConfigIssue(path, value, f"must be one of {', '.join(map(str, choices))}"
                                  + extra))
        return None
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(inner[0], value, path, issues)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            issues.append(ConfigIssue(path, value, "must be a map of keys"))
            return None
        return _build(tp, value, path, issues)
    if origin is list:
        if not isinstance(value, list):
            issues.append(ConfigIssue(path, value, "must be a list"))
            return None
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]", issues) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            issues.append(ConfigIssue(path, value, "must be a map"))
            return None
        out = {}
        for k, v in value.items():
            if isinstance(v, dict | list) or v is None:
                issues.append(ConfigIssue(f"{path}.{k}", v, "must be a plain value"))
            else:
                out[str(k)] = str(v).lower() if isinstance(v, bool) else str(v)
        return out
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    wrong_bool = isinstance(value, bool) and tp is not bool
    if tp in _TYPE_WORDS and (not isinstance(value, tp) or wrong_bool):
        issues.append(ConfigIssue(path, value, f"must be {_TYPE_WORDS[tp]}"))
        return None
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str, issues: list[ConfigIssue]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            extra = f"; did you mean '{hint[0]}'?" if hint else ""
            issues.append(ConfigIssue(path, value, f"unknown key{extra}"))
            continue
        before = len(issues)
        converted = _convert(hints[key], value, path, issues)
        check = fields[key].metadata.get("check")
        reason = check(converted) if check and converted is not None else None
        if len(issues) == before and reason:
            issues.append(ConfigIssue(path, value, reason))
        if len(issues) == before:
            values[key] = converted
    return cls(**values)


def _cross_checks(config: Config) -> list[ConfigIssue]:
    issues = _engine_issues(config.engine)
    pins = [(f"tuner.pin.{n}", n) for n in config.tuner.pin]
    pins += [(f"llama_server[{i}].pin.{n}", n) for i, s in enumerate(config.llama_server)
             for n in s.pin]
    for path, name in pins:
        if not name.replace("_", "").isalnum() or not name.isupper():
            issues.append(ConfigIssue(path, name, "must be an environment variable name "
                                      "such as OLLAMA_KEEP_ALIVE or LLAMA_ARG_CTX_SIZE"))
    return issues + _llama_server_issues(config.llama_server)


def llama_server_names(servers: list[LlamaServerConfig]) -> list[tuple[int, str]]:
    """(index in ``llama_server``, name) of each entry with a URL: its ``name``, else
    ``llama-server`` for the first entry and ``llama-server-N`` for the N-th."""
    return [(i, s.name or ("llama-server" if i == 0 else f"llama-server-{i + 1}"))
            for i, s in enumerate(servers) if s.url]


def _llama_server_issues(servers: list[LlamaServerConfig]) -> list[ConfigIssue]:
    """Names of managed llama-servers are unique, plain words, and not 'ollama'."""
    issues = []
    seen: set[str] = set()
    for i, name in llama_server_names(servers):
        path = f"llama_server[{i}].name"
        if name == "ollama" or not name.replace("-", "").replace("_", "").replace(".", "") \
                .isalnum():
            issues.append(ConfigIssue(path, name, "must be letters, digits, '-', '_' or '.', "
                                      "and not 'ollama'"))
        elif name in seen:
            issues.append(ConfigIssue(path, name, "another llama_server has this name"))
        seen.add(name)
    return issues


def _engine_issues(engine: EngineConfig) -> list[ConfigIssue]:
    """The engine's own checks (model shape, scheduler limits), under the config's keys."""
    from velod.engine.core.errors import EngineConfigError  # light: no NumPy
    from velod.engine.settings import EngineSettings

    try:
        EngineSettings.from_config(engine)
    except EngineConfigError as exc:
        key = _ENGINE_KEYS.get(exc.field, exc.field)
        return [ConfigIssue(f"engine.{key}", exc.value, exc.reason)]
    return []


# Scheduler limit -> the engine key that sets it, where the names differ.
_ENGINE_KEYS = {"max_model_len": "geometry.max_context"}


def parse_config(raw: Any, source: str = "<config>") -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [ConfigIssue("", raw, "the file must be a map of sections")])
    issues: list[ConfigIssue] = []
    config = _build(Config, raw, "", issues)
    if not issues:
        issues = _cross_checks(config)
    if issues:
        raise ConfigError(source, issues)
    return config


def load_config(path: Path | str | None) -> Config:
    """Read and validate ``path``; a missing file means the built-in defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [ConfigIssue("", str(path), f"cannot read: {exc}")]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), [ConfigIssue("", "", f"YAML syntax error at {where}"
                                                  f"{problem}")]) from exc
    return parse_config(raw, str(path))


def to_plain(obj: Any) -> Any:
    """The config as plain YAML/msgpack data, in the file's own notation ("30s", "1GiB")."""
    if isinstance(obj, MemoryAmount):
        return str(obj)
    if dataclasses.is_dataclass(obj):
        hints = typing.get_type_hints(type(obj))
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            tp = hints[f.name]
            if tp is Duration:
                out[f.name] = format_duration(value)
            elif tp is Size:
                out[f.name] = format_size_exact(value)
            else:
                out[f.name] = to_plain(value)
        return out
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key path, default in file notation, doc) for every key: for docs and the sample file."""
    rows = []
    defaults = to_plain(cls())
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint) and hint is not MemoryAmount:
            rows.extend(describe(hint, f"{path}."))
        else:
            rows.append((path, defaults[f.name], f.metadata.get("doc", "")))
    return rows


def describe_items(path: str) -> list[tuple[str, Any, str]]:
    """(key, default, doc) of each item of the list at top-level key ``path`` when its items
    are maps (``llama_server``); [] for any other key."""
    field_type = typing.get_type_hints(Config).get(path)
    (item,) = typing.get_args(field_type) or (None,)
    if typing.get_origin(field_type) is not list or not dataclasses.is_dataclass(item):
        return []
    return describe(item)  # type: ignore[arg-type]


__all__ = ["Config", "ConfigError", "ConfigIssue", "load_config", "parse_config"]


def validate_text(text: str, name: str) -> dict[str, Any]:
    """Validate config text the way the daemon would load it (for ``config.validate``)."""
    try:
        raw = yaml.safe_load(text)
        parse_config(raw, name)
    except yaml.YAMLError as exc:
        return {"valid": False, "errors": [f"YAML syntax error: {exc}"]}
    except ConfigError as exc:
        return {"valid": False, "errors": [str(i) for i in exc.issues]}
    return {"valid": True, "errors": []}
