"""velod's configuration: the schema (dataclasses), loading and validation.

Every key has a default, a type and, where it matters, a range. Loading collects
*all* problems and raises :class:`ConfigError`, each :class:`ConfigIssue` naming the
key path, the value and the reason (with a did-you-mean for unknown keys).
``etc/velod/velod.yaml`` documents every key and equals these defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import reprlib
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NewType

from velod import safe_yaml
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


def between(low: float, high: float, what: str = "") -> typing.Callable[[Any], str | None]:
    """A check that the value lies in [low, high]; ``what`` words the bounds when given."""
    words = what or f"between {low:g} and {high:g}"
    return _check(f"must be {words}", lambda v: low <= v <= high)


positive = _check("must be greater than 0", lambda v: v > 0)
non_negative = _check("must not be negative", lambda v: v >= 0)
percent = _check("must be between 0 and 100", lambda v: 0 <= v <= 100)
power_of_two = _check("must be a power of two", lambda v: v > 0 and v & (v - 1) == 0)
count = between(1, 1_000_000, "between 1 and 1000000")  # any count the daemon keeps in memory

# Every Duration and Size is also bounded by its type (see _convert): nothing sleeps for a
# century or allocates an exabyte because a value validated.
MAX_DURATION = 366 * 86400.0
MAX_SIZE = 2**50  # 1 PiB
MAX_STRING = 4096

_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.@\\-]+\.service$")
_GROUP_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*\$?$")
_MODEL_SUFFIX = re.compile(r"^[A-Za-z0-9._-]+$")


def absolute_path(value: str) -> str | None:
    if not value.startswith("/"):
        return "must be an absolute path (starting with /)"
    if "/../" in value + "/":
        return "must not contain '..'"
    return None


def optional_absolute_path(value: str) -> str | None:
    return absolute_path(value) if value else None


def socket_path(value: str) -> str | None:
    if value and len(value.encode()) > 107:
        return "is longer than the 107 bytes a Unix socket path may have"
    return optional_absolute_path(value)


def plain_conf_name(value: str) -> str | None:
    if "/" in value or value.startswith(".") or not value.endswith(".conf") or len(value) < 6:
        return "must be a plain file name ending in .conf (no directory, not hidden)"
    return None


def program(value: str) -> str | None:
    if not value:
        return "must not be empty"
    return absolute_path(value) if "/" in value else None


def http_url(value: str) -> str | None:
    """Empty, or an address as Ollama reads OLLAMA_HOST: [http[s]://]host[:port][/path]."""
    if not value:
        return None
    scheme, sep, rest = value.partition("://")
    if sep and scheme not in ("http", "https"):
        return f"must be an http:// or https:// address (not {scheme}://)"
    hostport = (rest if sep else value).partition("/")[0]
    if not hostport or any(c.isspace() for c in value):
        return "must be an address such as http://127.0.0.1:11434"
    port = hostport.rpartition("]")[2] if hostport.startswith("[") else hostport
    if ":" in port:
        digits = port.rpartition(":")[2]
        if not digits.isdigit() or not 0 < int(digits) <= 65535:
            return "has a port that is not a number between 1 and 65535"
    return None


def matches(pattern: re.Pattern[str], words: str) -> typing.Callable[[Any], str | None]:
    return _check(f"must be {words}", lambda v: bool(pattern.match(v)))


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = _opt("info", "Log level.")


@dataclass(frozen=True)
class ControlConfig:
    socket: str = _opt("", "Socket path; empty = /run/velod/velod.sock as root, "
                       "else $XDG_RUNTIME_DIR/velod/velod.sock.", socket_path)
    admin_group: str = _opt("velod", "Members of this group may call methods that change things.",
                            matches(_GROUP_NAME, "a group name"))
    max_message_size: Size = _opt(Size(1024**2), "Largest accepted request.",
                                  _check("must be between 1KiB and 64MiB",
                                         lambda v: 1024 <= v <= 64 * 1024**2))
    max_connections: int = _opt(64, "Simultaneous client connections.", between(1, 4096))
    max_connections_per_uid: int = _opt(16, "Connections one user may hold at once.",
                                        between(1, 4096))
    admin_reserved_connections: int = _opt(8, "Connections only root, velod's user and the "
                                           "admin group may use.", between(0, 4095))
    idle_timeout: Duration = _opt(Duration(60.0), "Close a connection silent this long "
                                  "(event subscribers excepted).", positive)
    message_timeout: Duration = _opt(Duration(10.0), "A request must arrive whole within "
                                     "this long of its first byte.", positive)
    max_inflight: int = _opt(16, "Requests one connection may have in flight; past it velod "
                             "reads no more until replies go out.", between(1, 4096))


@dataclass(frozen=True)
class HardwareConfig:
    enabled: bool = _opt(True, "Watch GPUs, CPU and memory.")
    interval: Duration = _opt(Duration(5.0), "Time between polls.",
                              _check("must be at least 100ms", lambda v: v >= 0.1))
    timeout: Duration = _opt(Duration(10.0), "A poll that takes longer is abandoned.", positive)
    nvml: bool = _opt(True, "Query NVIDIA GPUs through NVML.")
    sysfs_root: str = _opt("/sys", "Where to read AMD GPUs' sysfs files.", absolute_path)
    vram_change_threshold: Size = _opt(Size(512 * 1024**2), "Free VRAM change that counts.")
    vram_change_percent: float = _opt(10.0, "Free VRAM change, in % of total, that counts.",
                                      percent)
    ram_available_threshold: Size = _opt(Size(2 * 1024**3),
                                         "Report when available RAM crosses this.")
    history_size: int = _opt(720, "Samples kept for hardware.history.",
                             between(1, 100_000, "between 1 and 100000"))


@dataclass(frozen=True)
class OllamaConfig:
    enabled: bool = _opt(True, "Tune Ollama (false on machines that only run llama-server).")
    url: str = _opt("", "Ollama's address; empty = $OLLAMA_HOST or http://127.0.0.1:11434.",
                    http_url)
    service: str = _opt("ollama.service", "The systemd unit that runs Ollama.",
                        matches(_UNIT_NAME, "a unit name such as ollama.service"))
    systemd_dir: str = _opt("/etc/systemd/system", "Where the unit's drop-in directory lives.",
                            absolute_path)
    dropin: str = _opt("50-velod.conf", "File name of velod's drop-in.", plain_conf_name)
    systemctl: str = _opt("systemctl", "The systemctl program.", program)
    request_timeout: Duration = _opt(Duration(10.0), "Timeout of one HTTP request.", positive)


@dataclass(frozen=True)
class LlamaServerConfig:
    """One llama.cpp llama-server velod tunes (an item of the ``llama_server`` list)."""

    name: str = _opt("", "What velodctl calls it (--server); empty = llama-server, then "
                     "llama-server-2, ... in list order.")
    url: str = _opt("", "Its address, e.g. http://127.0.0.1:8080; empty = not managed.",
                    lambda v: None if not v or (v.startswith(("http://", "https://"))
                    and http_url(v) is None) else "must be an http:// or https:// address")
    unit: str = _opt("llama-server.service", "The systemd unit that runs it.",
                     matches(_UNIT_NAME, "a unit name such as llama-server.service"))
    systemd_dir: str = _opt("/etc/systemd/system", "Where the unit's drop-in directory lives.",
                            absolute_path)
    dropin: str = _opt("50-velod.conf", "File name of velod's drop-in.", plain_conf_name)
    systemctl: str = _opt("systemctl", "The systemctl program.", program)
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
                             "empty = every installed model.",
                             _check("must list at most 1000 models", lambda v: len(v) <= 1000))
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
                               matches(_MODEL_SUFFIX, "letters, digits, '.', '_' or '-' "
                                       "(not empty)"))
    verify: bool = _opt(False, "Benchmark after each applied change; roll back if slower.")
    explore: bool = _opt(False, "Try safe candidate settings when idle; keep the fastest.")
    verify_tokens: int = _opt(64, "Tokens generated per request by verify/explore "
                              "benchmarks.", between(1, 100_000))
    verify_repeat: int = _opt(3, "Measured runs per verify/explore benchmark (after one "
                              "warm-up).", between(1, 100))
    verify_tolerance: float = _opt(0.05, "A change counts as slower (or faster) only beyond "
                                   "this fraction of the speed and the measured spread.",
                                   _check("must be between 0 and 1", lambda v: 0 <= v < 1))
    verify_timeout: Duration = _opt(Duration(120.0), "Longest a verify/explore benchmark may "
                                    "run.", positive)


@dataclass(frozen=True)
class GeometryConfig:
    layers: int = _opt(16, "Transformer layers.", between(1, 1024))
    heads: int = _opt(32, "Query heads.", between(1, 1024))
    kv_heads: int = _opt(8, "Key/value heads (divides heads).", between(1, 1024))
    head_dim: int = _opt(64, "Dimension of one head.", between(1, 1024))
    max_context: int = _opt(8192, "Longest sequence, prompt and output together.",
                            between(1, 2**24, "between 1 and 16777216"))


@dataclass(frozen=True)
class EngineConfig:
    enabled: bool = _opt(True, "Host the engine (allocates nothing until used).")
    model: str = _opt("llama3.2-1b", "Ollama model name (gemma3:270m) or .gguf path; or a "
                      "synthetic geometry preset; or 'custom' (engine.geometry).")
    geometry: GeometryConfig | None = _opt(None, "Explicit geometry when model is 'custom'.")
    dtype: Literal["float16", "bfloat16", "float32"] = _opt("float16", "KV cache element type "
                                                            "(CPU math is float32).")
    device: Literal["auto", "cpu", "cuda"] = _opt("auto", "auto = CUDA when PyCUDA and a GPU "
                                                  "are present.")
    kv_cache: MemoryAmount = _opt(MemoryAmount(bytes=1024**3), "KV pool: bytes ('4GiB') or a "
                                  "fraction of free device memory (0.5).")
    block_size: int = _opt(16, "Tokens per KV block (8, 16 or 32).",
                           _check("must be 8, 16 or 32", lambda v: v in (8, 16, 32)))
    max_batch_size: int = _opt(64, "Sequences per step.", between(1, 65536))
    max_tokens_per_step: int = _opt(2048, "Tokens per step (prefill chunks + decode).", count)
    max_waiting: int = _opt(4096, "Queued requests before submit says busy.", count)
    idle_release: Duration = _opt(Duration(600.0), "Free the KV pool after this long idle.",
                                  positive)


def _listen_address(value: str) -> str | None:
    if not value or value.startswith("/"):
        return None  # off, or a Unix socket path
    host, colon, port = value.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        return "must be HOST:PORT (127.0.0.1:11435), :PORT (loopback) or a Unix socket path"
    if host.startswith("[") != host.endswith("]"):
        return "an IPv6 host goes in brackets: [::1]:11435"
    return None


@dataclass(frozen=True)
class HttpConfig:
    listen: str = _opt("", "Serve the OpenAI- and Ollama-compatible APIs and /metrics here: "
                       "HOST:PORT, :PORT (loopback) or a Unix socket path; empty = off.",
                       _listen_address)
    api_key_file: str = _opt("", "File holding the bearer token clients must send "
                             "(Authorization: Bearer ...); needed beyond loopback.")
    max_body_size: Size = _opt(Size(4 * 1024**2), "Largest request body.",
                               _check("must be between 1KiB and 256MiB",
                                      lambda v: 1024 <= v <= 256 * 1024**2))
    max_requests: int = _opt(256, "Requests served at once; more get 503 with Retry-After.",
                             between(1, 65536))
    request_timeout: Duration = _opt(Duration(600.0), "Longest one request may run (its "
                                     "generation is aborted then).", positive)
    retry_after: Duration = _opt(Duration(1.0), "Retry-After sent with 503 when the engine's "
                                 "queue is full.", positive)
    max_connections: int = _opt(256, "HTTP connections open at once; more are answered 503 "
                                "and closed.", between(1, 16384))
    max_connections_per_client: int = _opt(128, "HTTP connections one client may hold (a "
                                           "client: a local user, by uid; a remote "
                                           "address).", between(1, 16384))
    idle_timeout: Duration = _opt(Duration(30.0), "An HTTP connection with no request being "
                                  "served this long is closed (also one still sending a "
                                  "request's head).", positive)


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
    http: HttpConfig = field(default_factory=HttpConfig)
    state_dir: str = _opt("", "Where velod keeps its history; empty = /var/lib/velod as root, "
                          "else $XDG_STATE_HOME/velod.", optional_absolute_path)


# --------------------------------------------------------------------------- validation


MAX_EXCERPT = 200  # characters of a value quoted in an error
MAX_MESSAGE = 4096  # characters of one error message, however many issues it lists

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = MAX_EXCERPT
_repr.maxlist = _repr.maxdict = _repr.maxtuple = 8
_repr.maxlevel = 3


def excerpt(value: Any, limit: int = MAX_EXCERPT) -> str:
    """``repr(value)`` cut to ``limit`` characters, however large or deep the value is."""
    text = _repr.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def cap(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, saying so."""
    if len(text) <= limit:
        return text
    tail = f"... ({len(text) - limit} more characters)"
    return text[:limit - len(tail)] + tail


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: the key path (``tuner.mode``), the offending value and why."""

    path: str
    value: Any
    reason: str

    def __str__(self) -> str:
        path = excerpt(self.path)[1:-1] if self.path else "<top>"
        got = f" (got {excerpt(self.value)})" if self.path or self.value != "" else ""
        return cap(f"{path}: {self.reason}{got}", 1024)


class ConfigError(Exception):
    """The config was refused; ``issues`` lists every problem found.

    The message is bounded (MAX_MESSAGE) whatever the input: it is logged and sent to
    clients, and the input may come from anyone who can reach the socket.
    """

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        super().__init__(cap(f"invalid config {excerpt(source)[1:-1]}:\n"
                             + "\n".join(f"  {line}" for line in self.lines())))

    def lines(self, limit: int = 20) -> list[str]:
        """One bounded line per issue, the first ``limit`` of them and how many more."""
        out = [str(i) for i in self.issues[:limit]]
        if len(self.issues) > limit:
            out.append(f"... and {len(self.issues) - limit} more problems")
        return out


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _convert(tp: Any, value: Any, path: str, issues: list[ConfigIssue]) -> Any:
    """Convert a YAML value to the annotated type, appending issues instead of raising."""
    origin = typing.get_origin(tp)
    if tp is Duration or tp is Size or tp is MemoryAmount:
        parser = {Duration: parse_duration, Size: parse_size, MemoryAmount: parse_memory_amount}
        try:
            parsed = parser[tp](value)
        except (ValueError, TypeError, OverflowError) as exc:
            issues.append(ConfigIssue(path, value, cap(str(exc), 300)))
            return None
        reason = _out_of_type_range(tp, parsed)
        if reason:
            issues.append(ConfigIssue(path, value, reason))
            return None
        return parsed
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
            text = str(v).lower() if isinstance(v, bool) else str(v)
            if isinstance(v, dict | list) or v is None:
                issues.append(ConfigIssue(f"{path}.{k}", v, "must be a plain value"))
            elif reason := _bad_text(text):
                issues.append(ConfigIssue(f"{path}.{k}", v, reason))
            else:
                out[str(k)] = text
        return out
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    wrong_bool = isinstance(value, bool) and tp is not bool
    if tp in _TYPE_WORDS and (not isinstance(value, tp) or wrong_bool):
        issues.append(ConfigIssue(path, value, f"must be {_TYPE_WORDS[tp]}"))
        return None
    if tp is float and not math.isfinite(value):
        issues.append(ConfigIssue(path, value, "must be a finite number"))
        return None
    if tp is str and (reason := _bad_text(value)):
        issues.append(ConfigIssue(path, value, reason))
        return None
    return value


def _out_of_type_range(tp: Any, value: Any) -> str | None:
    """Why a parsed Duration, Size or MemoryAmount is beyond what velod can use, or None."""
    if tp is Duration and not (math.isfinite(value) and value <= MAX_DURATION):
        return f"must be at most {format_duration(MAX_DURATION)}"
    if tp is Size and value > MAX_SIZE:
        return "must be at most 1024TiB"
    if tp is MemoryAmount and value.bytes is not None and value.bytes > MAX_SIZE:
        return "must be at most 1024TiB"
    return None


def _bad_text(text: str) -> str | None:
    """Why a string cannot be a config value (it ends up in paths, units and logs), or None."""
    if len(text) > MAX_STRING:
        return f"must be at most {MAX_STRING} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return "must not contain control characters (newlines, tabs, NUL)"
    return None


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
    control = config.control
    if control.admin_reserved_connections >= control.max_connections:
        issues.append(ConfigIssue("control.admin_reserved_connections",
                                  control.admin_reserved_connections,
                                  "must be less than control.max_connections "
                                  f"({control.max_connections})"))
    http = config.http
    if http.max_connections_per_client > http.max_connections:
        issues.append(ConfigIssue("http.max_connections_per_client",
                                  http.max_connections_per_client,
                                  f"must be at most http.max_connections ({http.max_connections})"))
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


def parse_yaml(text: str, source: str = "<config>") -> Any:
    """The YAML data of config ``text``, within safe_yaml's bounds; ConfigError otherwise."""
    try:
        return safe_yaml.load(text)
    except safe_yaml.YamlRefused as exc:
        raise ConfigError(source, [ConfigIssue("", "", cap(str(exc), 1000))]) from None


def read_config_text(path: Path) -> str | None:
    """The file's text, or None when there is none (missing, or a dangling symlink).

    Reads at most safe_yaml.MAX_BYTES (+1 to notice more), so a huge or endless file
    (``/dev/zero``) costs nothing.
    """
    try:
        # O_NONBLOCK: a FIFO put at the path must not hang the reader until someone writes.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(str(path), [ConfigIssue("", str(path), f"cannot read: {exc}")]) from exc
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(str(path), [ConfigIssue("", str(path), "not a regular file")])
        data = f.read(safe_yaml.MAX_BYTES + 1)
    if len(data) > safe_yaml.MAX_BYTES:
        raise ConfigError(str(path), [ConfigIssue("", str(path), "the file is larger than "
                                                  f"{safe_yaml.MAX_BYTES} bytes")])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [ConfigIssue("", str(path), f"not UTF-8: {exc}")]) from exc


def load_config(path: Path | str | None) -> Config:
    """Read and validate ``path``; a missing file means the built-in defaults."""
    if path is None:
        return Config()
    text = read_config_text(Path(path))
    if text is None:
        return Config()
    return parse_config(parse_yaml(text, str(path)), str(path))


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
    """Validate config text the way the daemon would load its file (for ``config.validate``):
    {valid, errors, notes}, every line bounded whatever the text."""
    try:
        data = parse_yaml(text, name)
        parse_config(data, name)
    except ConfigError as exc:
        return {"valid": False, "errors": exc.lines(), "notes": []}
    notes = [] if data is not None else [
        "the text is empty: a running velod keeps its config when its file becomes empty; "
        "write '{}' to mean the built-in defaults"]
    return {"valid": True, "errors": [], "notes": notes}
