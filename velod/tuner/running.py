"""What Ollama's service runs now, as opposed to what its drop-ins say it will get.

The drop-ins are what systemd gives Ollama at its *next* start. velod may only say that
Ollama runs a setting after checking the service itself:

- ``systemctl show -p MainPID -p ActiveState -p Environment -p NeedDaemonReload
  -p ExecMainStartTimestampMonotonic <unit>`` (documented properties of a service unit:
  ``Environment`` is the environment systemd holds for the unit since its last
  ``daemon-reload``, ``NeedDaemonReload`` says the files changed since then,
  ``ExecMainStartTimestampMonotonic`` is when the main process started, in microseconds of
  CLOCK_MONOTONIC);
- ``/proc/<MainPID>/environ``: the environment the running process was started with, the
  truth, readable by root and by the service's own user.

With the process's environment the answer is exact. With systemd's only, it is what the
process got if it started after the last ``daemon-reload``; the start time tells a
restart after a given moment apart from none.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from velod.blocking import run_blocking

PROPERTIES = ("MainPID", "ActiveState", "Environment", "NeedDaemonReload",
              "ExecMainStartTimestampMonotonic")


@dataclass(frozen=True)
class Running:
    """The service's state: active, its main process, and the environment it runs with."""

    active: bool | None  # None: systemd could not be asked (see ``note``)
    pid: int | None = None
    environment: dict[str, str] | None = None  # None: unknown (see ``note``)
    source: str = ""  # "process" (/proc/PID/environ) or "systemd" (systemctl show)
    started: float | None = None  # CLOCK_MONOTONIC seconds when the main process started
    need_daemon_reload: bool = False
    note: str = ""  # why the environment is unknown, or how far to trust it

    def differences(self, wanted: dict[str, str]) -> dict[str, tuple[str | None, str]]:
        """Variables of ``wanted`` the service runs with another value (name -> (runs,
        wanted)); {} also when the environment is unknown."""
        if self.environment is None:
            return {}
        return {k: (self.environment.get(k), v) for k, v in wanted.items()
                if self.environment.get(k) != v}

    def runs(self, wanted: dict[str, str]) -> bool | None:
        """True when the service runs every value of ``wanted``; None when unknown."""
        if self.environment is None:
            return None
        return not self.differences(wanted)

    def to_dict(self) -> dict[str, object]:
        return {"active": self.active, "pid": self.pid, "source": self.source or None,
                "need_daemon_reload": self.need_daemon_reload, "note": self.note or None}


def parse_show(text: str) -> dict[str, str]:
    """``Key=value`` lines of ``systemctl show`` as a map."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value
    return out


_C_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_OCTAL = "01234567"


def split_strv(value: str) -> list[str]:
    """The entries of a string-array property as ``systemctl show`` prints them: separated
    by spaces, each in double quotes where needed (systemd's ``shell_maybe_quote(s, 0)``),
    with ``\\ " ` $`` and control characters backslash-escaped inside the quotes."""
    words: list[str] = []
    i, n = 0, len(value)
    while i < n:
        if value[i] == " ":
            i += 1
            continue
        if value[i] != '"':
            end = value.find(" ", i)
            end = n if end < 0 else end
            words.append(value[i:end])
            i = end
            continue
        out: list[str] = []
        i += 1
        while True:
            if i >= n:
                raise ValueError(f"unterminated quote in {value!r}")
            c = value[i]
            if c == '"':
                i += 1
                break
            if c == "\\" and i + 1 < n:
                nxt = value[i + 1]
                if nxt in _C_ESCAPES:
                    out.append(_C_ESCAPES[nxt])
                    i += 2
                elif all(d in _OCTAL for d in value[i + 1:i + 4]) and i + 4 <= n:
                    out.append(chr(int(value[i + 1:i + 4], 8)))
                    i += 4
                else:
                    out.append(nxt)
                    i += 2
                continue
            out.append(c)
            i += 1
        words.append("".join(out))
    return words


def parse_environment_property(value: str) -> dict[str, str]:
    """``NAME=value`` entries of the ``Environment`` property (later ones win)."""
    out: dict[str, str] = {}
    for word in split_strv(value):
        name, eq, val = word.partition("=")
        if eq and name:
            out[name] = val
    return out


def parse_environ(data: bytes) -> dict[str, str]:
    """``/proc/PID/environ``: NUL-separated ``NAME=value`` entries."""
    out: dict[str, str] = {}
    for entry in data.split(b"\0"):
        name, eq, value = entry.partition(b"=")
        if eq and name:
            out[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return out


def from_reports(props: dict[str, str], environ: bytes | None, environ_error: str = ""
                 ) -> Running:
    """A Running from ``systemctl show`` properties and, when it could be read, the main
    process's ``/proc/PID/environ``."""
    pid = int(props["MainPID"]) if props.get("MainPID", "").isdigit() else 0
    active = props.get("ActiveState") == "active" and pid > 0
    started_us = props.get("ExecMainStartTimestampMonotonic", "")
    started = int(started_us) / 1e6 if started_us.isdigit() and int(started_us) else None
    reload = props.get("NeedDaemonReload") == "yes"
    if not active:
        return Running(False, None, None, "", started, reload,
                       f"the service is {props.get('ActiveState') or 'unknown to systemd'}")
    if environ is not None:
        return Running(True, pid, parse_environ(environ), "process", started, reload)
    try:
        env = parse_environment_property(props.get("Environment", ""))
    except ValueError as exc:
        return Running(True, pid, None, "", started, reload,
                       f"cannot read systemd's Environment property: {exc}")
    note = f"/proc/{pid}/environ: {environ_error}; systemd's view of the unit"
    if reload:
        note += " (its files changed since the last daemon-reload)"
    return Running(True, pid, env, "systemd", started, reload, note)


def read_environ(pid: int) -> bytes:
    """The start environment of process ``pid`` (blocking; PermissionError unless root or
    the same user)."""
    return Path(f"/proc/{pid}/environ").read_bytes()


async def read_running(systemctl: Callable[..., Awaitable[str]], unit: str) -> Running:
    """Ask systemd (through ``systemctl(*args)``, which raises on failure) and the kernel
    what ``unit`` runs now."""
    args = ["show"]
    for prop in PROPERTIES:
        args += ["-p", prop]
    props = parse_show(await systemctl(*args, unit))
    pid = int(props["MainPID"]) if props.get("MainPID", "").isdigit() else 0
    environ, problem = None, ""
    if pid > 0 and props.get("ActiveState") == "active":
        try:
            environ = await run_blocking(read_environ, pid, timeout=5)
        except (OSError, TimeoutError) as exc:
            problem = str(exc) or type(exc).__name__
    return from_reports(props, environ, problem)
