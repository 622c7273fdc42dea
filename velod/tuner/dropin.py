"""velod's systemd drop-in for a server's unit: render, parse, write atomically, roll back.

The drop-in is ``<systemd_dir>/<unit>.d/<name>`` (``50-velod.conf``), a ``[Service]``
section of ``Environment=`` lines under a header that marks it as velod's. velod writes
only that file and its backup ``<name>.prev`` (systemd reads ``*.conf`` only, so the
backup is inert); it reads every other drop-in to learn the effective environment and to
report variables another file sets too, and never modifies them. It also reads the unit's
``ExecStart=`` (the last one, after an empty ``ExecStart=`` reset, as systemd does), because
a server's command-line flags can override its environment.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "# Managed by velod"
NO_PREVIOUS = "# velod: there was no drop-in before the last write\n"


class DropinError(Exception):
    """A drop-in velod cannot read or must not write; the message names the file and why."""


@dataclass(frozen=True)
class ParsedDropin:
    """One unit file or drop-in: its ``[Service]`` environment and whether velod wrote it."""

    path: Path
    environment: dict[str, str]
    managed: bool
    resets: bool = False  # an empty "Environment=" cleared what earlier files set
    exec_start: str | None = None  # the last ExecStart= value ("" = reset), None = none


@dataclass(frozen=True)
class Conflict:
    """A variable velod manages that another file sets too."""

    name: str
    path: str
    value: str
    wins: bool  # True: the other file sorts after velod's and overrides it

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "path": self.path, "value": self.value, "wins": self.wins}

    def describe(self) -> str:
        if self.wins:
            return (f"{self.name}={self.value} in {self.path} overrides velod's value "
                    "(it sorts after velod's drop-in); remove it there or pin it in tuner.pin")
        return f"{self.name}={self.value} in {self.path} is overridden by velod's drop-in"


@dataclass(frozen=True)
class Effective:
    """The environment systemd gives the unit, with where each value comes from."""

    environment: dict[str, str]
    sources: dict[str, str]
    velod: dict[str, str]  # what velod's own drop-in sets
    conflicts: list[Conflict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # unreadable or malformed files
    exec_start: list[str] = field(default_factory=list)  # the unit's command line, as argv


# --------------------------------------------------------------------------- text


def _quote(name: str, value: str) -> str:
    if not name.replace("_", "").isalnum() or not name[0].isalpha():
        raise DropinError(f"{name!r} is not an environment variable name")
    if any(c in value for c in "\n\r\0"):
        raise DropinError(f"the value of {name} contains a line break or NUL: {value!r}")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'Environment="{name}={escaped}"'


def render(environment: dict[str, str], unit: str, comment: str = "") -> str:
    """The drop-in text setting ``environment`` (sorted by name) for ``unit``."""
    lines = [
        f"{MARKER} for {unit}; velod rewrites this file, edits here are lost.",
        "# To change a value for good, pin it in velod's config (tuner.pin).",
        "# To undo: `velodctl tune rollback`, or delete this file and run",
        "# `systemctl daemon-reload && systemctl restart " + unit + "`.",
    ]
    lines += [f"# {line}" for line in comment.splitlines() if line.strip()]
    lines.append("[Service]")
    lines += [_quote(name, environment[name]) for name in sorted(environment)]
    return "\n".join(lines) + "\n"


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Lines with systemd's trailing-backslash continuations joined, numbered from 1."""
    out: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if not pending:
            start = number
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def split_assignments(value: str) -> list[str]:
    """Split an ``Environment=`` value into ``KEY=value`` words (systemd's quoting rules)."""
    words, current, quote, in_word = [], [], "", False
    i = 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            current.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
            in_word, i = True, i + 2
            continue
        if quote:
            if c == quote:
                quote = ""
            else:
                current.append(c)
        elif c in "\"'":
            quote, in_word = c, True
        elif c.isspace():
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
        else:
            current.append(c)
            in_word = True
        i += 1
    if quote:
        raise ValueError(f"unterminated {quote} quote")
    if in_word:
        words.append("".join(current))
    return [w.replace("%%", "%") for w in words]


def parse(text: str, path: Path | str = "<drop-in>") -> ParsedDropin:
    """Read the ``[Service]`` environment of a unit file or drop-in.

    Raises DropinError naming the file and line for text systemd would not accept as
    ours: a line outside any section, a section header that is not closed, an
    ``Environment=`` word without ``=``, an unterminated quote.
    """
    path = Path(path)
    env: dict[str, str] = {}
    section, resets = "", False
    exec_start: str | None = None
    for number, line in _logical_lines(text):
        where = f"{path}, line {number}"
        if line.startswith("["):
            if not line.endswith("]"):
                raise DropinError(f"{where}: section header {line!r} is not closed with ']'")
            section = line[1:-1].strip()
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise DropinError(f"{where}: {line!r} is not 'Key=value' (fix or remove the line)")
        if not section:
            raise DropinError(f"{where}: {key.strip()}= comes before any [Section] header")
        if section == "Service" and key.strip() == "ExecStart":
            exec_start = value.strip()
            continue
        if section != "Service" or key.strip() != "Environment":
            continue
        value = value.strip()
        if not value:
            env.clear()
            resets = True
            continue
        try:
            words = split_assignments(value)
        except ValueError as exc:
            raise DropinError(f"{where}: {exc} in {line!r}") from None
        for word in words:
            name, eq, val = word.partition("=")
            if not eq or not name:
                raise DropinError(f"{where}: Environment word {word!r} is not NAME=value")
            env[name] = val
    managed = text.lstrip().startswith(MARKER)
    return ParsedDropin(path, env, managed, resets, exec_start)


def split_command(line: str) -> list[str]:
    """An ``ExecStart=`` value as argv: systemd's prefixes (``-@:+!``) dropped, words split
    by its quoting rules (the same as ``Environment=``'s)."""
    words = split_assignments(line)
    if words:
        words[0] = words[0].lstrip("-@:+!")
    return words


# --------------------------------------------------------------------------- files


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` by temp file in the same directory + fsync + rename."""
    # The temp name does not end in .conf, so systemd never reads a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class DropinDir:
    """The unit's drop-in directory as velod sees it (blocking file I/O; small files)."""

    def __init__(self, systemd_dir: str | Path, unit: str, name: str = "50-velod.conf") -> None:
        if "/" in name or not name.endswith(".conf"):
            raise DropinError(f"drop-in name {name!r} must be a plain file name ending in .conf")
        self.unit = unit
        self.unit_file = Path(systemd_dir) / unit
        self.directory = Path(systemd_dir) / f"{unit}.d"
        self.path = self.directory / name
        self.backup = self.directory / f"{name}.prev"

    def read_velod(self) -> dict[str, str]:
        """What velod's drop-in sets now ({} when there is none)."""
        if not self.path.exists():
            return {}
        parsed = self._parse(self.path)
        if not parsed.managed:
            raise DropinError(f"{self.path} exists but was not written by velod (no "
                              f"'{MARKER}' header); velod will not overwrite it — rename it "
                              "or choose another name with ollama.dropin")
        return parsed.environment

    def _parse(self, path: Path) -> ParsedDropin:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DropinError(f"cannot read {path}: {exc}") from None
        return parse(text, path)

    def files(self) -> list[Path]:
        """The unit file (when in this directory) then its drop-ins, in systemd's order."""
        out = [self.unit_file] if self.unit_file.is_file() else []
        if self.directory.is_dir():
            out += sorted(p for p in self.directory.iterdir()
                          if p.name.endswith(".conf") and p.is_file())
        return out

    def effective(self) -> Effective:
        """The environment the unit gets after the next daemon-reload, with conflicts."""
        env: dict[str, str] = {}
        sources: dict[str, str] = {}
        errors: list[str] = []
        parsed_files: list[ParsedDropin] = []
        command = ""
        for path in self.files():
            try:
                parsed = self._parse(path)
            except DropinError as exc:
                errors.append(str(exc))
                continue
            parsed_files.append(parsed)
            if parsed.exec_start is not None:
                command = parsed.exec_start
            if parsed.resets:
                env.clear()
                sources.clear()
            for name, value in parsed.environment.items():
                env[name] = value
                sources[name] = str(path)
        velod = next((p.environment for p in parsed_files if p.path == self.path), {})
        conflicts = []
        for parsed in parsed_files:
            if parsed.path == self.path:
                continue
            for name, value in parsed.environment.items():
                if name in velod:
                    conflicts.append(Conflict(name, str(parsed.path), value,
                                              wins=parsed.path.name > self.path.name
                                              and parsed.path.parent == self.directory))
        try:
            argv = split_command(command)
        except ValueError as exc:
            errors.append(f"ExecStart= of {self.unit}: {exc}")
            argv = []
        return Effective(env, sources, dict(velod), conflicts, errors, argv)

    def says(self, environment: dict[str, str]) -> bool:
        """True when velod's drop-in exists and sets exactly ``environment``."""
        return self.path.exists() and self.read_velod() == environment

    def write(self, environment: dict[str, str], comment: str = "") -> bool:
        """Make velod's drop-in set exactly ``environment``; keep the old file as backup.

        Returns False (and writes nothing) when the file already says the same thing.
        """
        current = self.read_velod()  # refuses a same-named file that is not velod's
        if self.path.exists() and current == environment:
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        previous = self.path.read_text(encoding="utf-8") if self.path.exists() else NO_PREVIOUS
        atomic_write(self.backup, previous)
        atomic_write(self.path, render(environment, self.unit, comment))
        return True

    def has_backup(self) -> bool:
        return self.backup.is_file()

    def rollback(self) -> dict[str, str]:
        """Put the backup back (or remove velod's file if there was none); returns its env.

        The backup is consumed, so a second rollback fails rather than flip-flopping.
        """
        if not self.backup.is_file():
            raise DropinError(f"nothing to roll back to: {self.backup} does not exist")
        text = self.backup.read_text(encoding="utf-8")
        if self.path.exists():
            self.read_velod()  # never remove or replace a file that is not velod's
        if text == NO_PREVIOUS:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            env: dict[str, str] = {}
        else:
            env = parse(text, self.backup).environment
            atomic_write(self.path, text)
        self.backup.unlink()
        _fsync_dir(self.directory)
        return env
