"""Printing helpers shared by velodctl commands: JSON for scripts, compact text for people."""

import sys
import time

TYPE_CHECKING = False  # like typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


def print_json(obj: "Any") -> None:
    import json  # lazy: most invocations print text

    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=_fallback)
    sys.stdout.write("\n")


def emit(args: "Any", result: "Any", render: "Callable[[Any], str]") -> None:
    """Print ``result`` as JSON with ``--json``, else as ``render(result)`` for people."""
    if args.json:
        print_json(result)
    else:
        print(render(result))


def print_json_line(obj: "Any") -> None:
    import json

    sys.stdout.write(json.dumps(obj, sort_keys=True, default=_fallback) + "\n")
    sys.stdout.flush()


def _fallback(obj: "Any") -> "Any":
    if isinstance(obj, bytes):
        return obj.hex()
    return str(obj)


def table(rows: list[list[str]], header: list[str] | None = None) -> str:
    """Left-aligned columns separated by two spaces."""
    all_rows = ([header] if header else []) + rows
    if not all_rows:
        return ""
    widths = [max(len(r[i]) if i < len(r) else 0 for r in all_rows)
              for i in range(max(len(r) for r in all_rows))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip()
             for r in all_rows]
    return "\n".join(lines)


def ago(timestamp: float | None) -> str:
    """'12s ago', '3m ago', 'never'."""
    if not timestamp:
        return "never"
    return f"{human_duration(time.time() - timestamp)} ago"


def human_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
