"""A fake ``systemctl`` for tests: put ``tests/fakes/bin`` first on PATH.

It records every call (one line of JSON argv per call in ``$FAKE_SYSTEMCTL_LOG``) and
manages services described by ``$FAKE_SYSTEMCTL_STATE/<unit>.json``
(``{"argv": [...], "env": {...}, "log": "path"}``) the way systemd would (systemd.service(5),
systemd.exec(5), systemctl(1)):

- ``daemon-reload`` re-reads the unit's ``Environment=`` and ``ExecStart=`` lines from
  ``$FAKE_SYSTEMCTL_SYSTEMD_DIR/<unit>`` and ``<unit>.d/*.conf`` (lexical order, later wins,
  an empty ``Environment=`` or ``ExecStart=`` resets; a second ``ExecStart=`` without a
  reset is refused, as for a ``Type=simple`` service); ``start``/``restart`` use what the
  *last* reload read, so a changed drop-in without a daemon-reload is not seen, as with
  systemd;
- ``start``, ``stop``, ``restart`` run the service as a process (pid in ``<unit>.pid``): the
  unit's ``ExecStart=`` command line when its files give one (``-@:+!`` prefixes dropped),
  else the JSON's ``argv``, with the JSON's ``env`` plus the loaded environment;
- ``is-active``; ``show -p PROP [-p PROP...] [--value]`` for ``Environment`` (the
  environment loaded at the last daemon-reload, each entry shell-quoted where needed and
  space-separated, as systemd prints it), ``ExecStart`` (the loaded command line, in
  systemd's ``{ path=... ; argv[]=... ; ... }`` form), ``MainPID`` (0 when stopped),
  ``ActiveState``, ``NeedDaemonReload`` (``yes`` when the files on disk say something else
  than what was loaded) and ``ExecMainStartTimestampMonotonic`` (microseconds of
  CLOCK_MONOTONIC when the main process started, 0 if never), the properties systemd
  documents for a service.

Failure injection: a file ``$FAKE_SYSTEMCTL_STATE/<unit>.next-restart`` containing ``fail``
makes the next start/restart fail (exit 1, service stopped); ``no-come-back`` starts a
process that never answers. The file is consumed by the start it affects.
A file ``$FAKE_SYSTEMCTL_STATE/hang`` containing ``VERB before`` or ``VERB after`` makes
the next call of that verb sleep ``$FAKE_SYSTEMCTL_HANG_S`` seconds (default 30) before or
after doing its work, so a test can kill velod at that point (consumed by that call; the
sleeping process writes its pid to ``$FAKE_SYSTEMCTL_STATE/hanging.pid``).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ.get("FAKE_SYSTEMCTL_STATE", "/tmp/fake-systemctl"))
SYSTEMD_DIR = Path(os.environ.get("FAKE_SYSTEMCTL_SYSTEMD_DIR", "/etc/systemd/system"))


def log_call(argv: list[str]) -> None:
    path = os.environ.get("FAKE_SYSTEMCTL_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), "argv": argv}) + "\n")


def unit_name(name: str) -> str:
    return name if "." in name else f"{name}.service"


class UnitError(Exception):
    """A unit file systemd would refuse to load."""


def read_unit(unit: str) -> dict[str, object]:
    """The ``[Service]`` environment and command line the unit's files give."""
    files = [SYSTEMD_DIR / unit] if (SYSTEMD_DIR / unit).is_file() else []
    dropins = SYSTEMD_DIR / f"{unit}.d"
    if dropins.is_dir():
        files += sorted(p for p in dropins.iterdir() if p.name.endswith(".conf"))
    env: dict[str, str] = {}
    command: list[str] = []
    for path in files:
        section = ""
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            if section != "Service":
                continue
            if key.strip() == "ExecStart":
                if not value.strip():
                    command = []
                elif command:
                    raise UnitError(f"{unit} has more than one ExecStart= setting, which is "
                                    "only allowed for Type=oneshot services. Refusing.")
                else:
                    command = [w.replace("%%", "%") for w in shlex.split(value)]
                    command[0] = command[0].lstrip("-@:+!")
                continue
            if key.strip() != "Environment":
                continue
            if not value.strip():
                env.clear()
                continue
            for word in shlex.split(value):
                name, _, val = word.partition("=")
                env[name] = val.replace("%%", "%")
    return {"env": env, "exec_start": command}


def loaded_path(unit: str) -> Path:
    return STATE / f"{unit}.loaded-env.json"


def loaded_unit(unit: str) -> dict[str, object]:
    path = loaded_path(unit)
    if not path.exists():  # as at boot: the first start reads the files
        daemon_reload_unit(unit)
    return json.loads(path.read_text())


def _read_or_error(unit: str) -> dict[str, object]:
    try:
        return read_unit(unit)
    except UnitError as exc:  # systemd logs it and leaves the unit unloadable
        return {"env": {}, "exec_start": [], "error": str(exc)}


def daemon_reload_unit(unit: str) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    loaded_path(unit).write_text(json.dumps(_read_or_error(unit)))


def pid_of(unit: str) -> int | None:
    try:
        pid = int((STATE / f"{unit}.pid").read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    # A zombie (exited child of a dead parent) is not running.
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return None
    except (OSError, IndexError):
        return None
    return pid


def stop(unit: str) -> None:
    pid = pid_of(unit)
    if pid is None:
        return
    os.killpg(pid, signal.SIGTERM)
    deadline = time.time() + 5
    while time.time() < deadline and pid_of(unit) == pid:
        time.sleep(0.02)
    if pid_of(unit) == pid:
        os.killpg(pid, signal.SIGKILL)
    (STATE / f"{unit}.pid").unlink(missing_ok=True)


def started_path(unit: str) -> Path:
    return STATE / f"{unit}.started-monotonic-us"


def start(unit: str) -> int:
    if pid_of(unit) is not None:
        return 0
    spec_path = STATE / f"{unit}.json"
    if not spec_path.exists():
        print(f"Failed to start {unit}: Unit {unit} not found.", file=sys.stderr)
        return 5
    spec = json.loads(spec_path.read_text())
    flag = STATE / f"{unit}.next-restart"
    failure = flag.read_text().strip() if flag.exists() else ""
    flag.unlink(missing_ok=True)
    if failure == "fail":
        print(f"Job for {unit} failed because the control process exited with error code.\n"
              f"See \"systemctl status {unit}\" and \"journalctl -xeu {unit}\" for details.",
              file=sys.stderr)
        return 1
    loaded = loaded_unit(unit)
    if loaded.get("error"):
        print(f"Failed to start {unit}: Unit {unit} has a bad unit file setting.\n"
              f"{loaded['error']}", file=sys.stderr)
        return 1
    argv = loaded.get("exec_start") or spec["argv"]
    if failure == "no-come-back":
        argv = [sys.executable, "-c", "import time; time.sleep(3600)"]
    env = {**spec.get("env", {}), **loaded["env"]}  # type: ignore[dict-item]
    log = open(spec.get("log", os.devnull), "ab")  # noqa: SIM115 (handed to the child)
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                            start_new_session=True, cwd=spec.get("cwd"))
    (STATE / f"{unit}.pid").write_text(str(proc.pid))
    started_path(unit).write_text(str(int(time.monotonic() * 1e6)))
    return 0


# systemd's shell_maybe_quote(s, 0), which `systemctl show` applies to each entry of a
# string array: double quotes when a character needs them; inside, \ " ` $ get a
# backslash and control characters a C escape.
_NEEDS_QUOTES = set("\"\\`$*?['()<>|&;!")
_C_ESCAPES = {"\a": "a", "\b": "b", "\f": "f", "\n": "n", "\r": "r", "\t": "t", "\v": "v"}


def shell_maybe_quote(text: str) -> str:
    if not any(c in _NEEDS_QUOTES or c <= " " or c >= "\x7f" for c in text):
        return text
    out = []
    for c in text:
        if c in '\\"`$':
            out.append("\\" + c)
        elif c in _C_ESCAPES:
            out.append("\\" + _C_ESCAPES[c])
        elif c < " " or c == "\x7f":
            out.append(f"\\{ord(c):03o}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def show(unit: str, props: list[str], value_only: bool) -> int:
    pid = pid_of(unit)
    known = (STATE / f"{unit}.json").exists()
    loaded = loaded_unit(unit) if known else {}
    env: dict[str, str] = loaded.get("env", {})  # type: ignore[assignment]
    command: list[str] = loaded.get("exec_start", [])  # type: ignore[assignment]
    exec_start = (f"{{ path={command[0]} ; argv[]={' '.join(command)} ; ignore_errors=no ; "
                  f"start_time=[n/a] ; stop_time=[n/a] ; pid={pid or 0} ; code=(null) ; "
                  "status=0/0 }") if command else ""
    started = started_path(unit).read_text() if started_path(unit).exists() else "0"
    on_disk = _read_or_error(unit)
    stale = known and {k: on_disk.get(k) for k in ("env", "exec_start", "error")} != \
        {k: loaded.get(k) for k in ("env", "exec_start", "error")}
    values = {"Environment": " ".join(shell_maybe_quote(f"{k}={v}") for k, v in env.items()),
              "ExecStart": exec_start,
              "MainPID": str(pid or 0), "ActiveState": "active" if pid else "inactive",
              "NeedDaemonReload": "yes" if stale else "no",
              "ExecMainStartTimestampMonotonic": started, "Id": unit}
    for prop in props or list(values):
        value = values.get(prop, "")
        print(value if value_only else f"{prop}={value}")
    return 0


def hang(verb: str, when: str) -> None:
    """Sleep when the test asked this verb to hang at this point (see the module doc)."""
    flag = STATE / "hang"
    if flag.exists() and flag.read_text().split() == [verb, when]:
        flag.unlink(missing_ok=True)
        (STATE / "hanging.pid").write_text(str(os.getpid()))  # for the test to end it
        time.sleep(float(os.environ.get("FAKE_SYSTEMCTL_HANG_S", "30")))


def main(argv: list[str]) -> int:
    log_call(argv)
    args = [a for a in argv if a not in ("--no-pager", "--quiet", "-q", "--no-block", "--system")]
    if not args:
        print("fake systemctl: a command is required", file=sys.stderr)
        return 1
    verb = args[0]
    hang(verb, "before")
    code = run(verb, args[1:], quiet="--quiet" in argv or "-q" in argv)
    hang(verb, "after")
    return code


def run(verb: str, rest: list[str], quiet: bool) -> int:
    STATE.mkdir(parents=True, exist_ok=True)
    if verb == "daemon-reload":
        for spec in STATE.glob("*.json"):
            if not spec.name.endswith(".loaded-env.json"):
                daemon_reload_unit(spec.name.removesuffix(".json"))
        return 0
    if verb in ("start", "stop", "restart", "is-active") and not rest:
        print(f"Too few arguments for {verb}.", file=sys.stderr)
        return 1
    if verb == "start":
        return max(start(unit_name(u)) for u in rest)
    if verb == "stop":
        for u in rest:
            stop(unit_name(u))
        return 0
    if verb == "restart":
        code = 0
        for u in rest:
            stop(unit_name(u))
            code = max(code, start(unit_name(u)))
        return code
    if verb == "is-active":
        active = pid_of(unit_name(rest[0])) is not None
        if not quiet:
            print("active" if active else "inactive")
        return 0 if active else 3
    if verb == "show":
        props, value_only, units = [], False, []
        i = 0
        while i < len(rest):
            if rest[i] in ("-p", "--property"):
                props += rest[i + 1].split(",")
                i += 2
                continue
            if rest[i].startswith("--property="):
                props += rest[i].split("=", 1)[1].split(",")
            elif rest[i] == "--value":
                value_only = True
            else:
                units.append(rest[i])
            i += 1
        return show(unit_name(units[0]) if units else "ollama.service", props, value_only)
    print(f"Unknown command verb {verb}.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
