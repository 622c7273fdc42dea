#!/usr/bin/env python3
"""Write etc/velod/velod.yaml from the schema: every key, its default and its doc comment.

Run after changing velod/config.py; tests/unit/test_config.py checks the file is current.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from velod.config import describe, describe_items

TARGET = Path(__file__).resolve().parents[1] / "etc" / "velod" / "velod.yaml"
HEADER = """\
# velod configuration. Every key is shown with its built-in default, so deleting this
# file changes nothing. velod picks up edits by itself (or: velodctl reload, kill -HUP);
# a broken edit is refused and the running config stays (see velodctl status).
# Check a file first with: velod --check-config FILE  or  velodctl config validate FILE
# Durations: 500ms, 30s, 10m, 1h. Sizes: 512MiB, 2GiB (binary) or 1GB (decimal).
"""


def render() -> str:
    lines = [HEADER]
    section = None
    for path, default, doc in describe():
        parts = path.split(".")
        if len(parts) == 1:
            lines += ["", f"# {doc}", yaml.safe_dump({path: default}).rstrip()]
            items = describe_items(path)
            if items:
                lines.append("# Each item is a map of these keys, shown with their defaults:")
            for key, item_default, item_doc in items:
                value = yaml.safe_dump({key: item_default}, default_flow_style=True,
                                       width=1000).strip()
                lines += [f"#   # {item_doc}", f"#   {value[1:-1] if value[0] == '{' else value}"]
            continue
        if parts[0] != section:
            section = parts[0]
            lines += ["", f"{section}:"]
        indent = "  " * (len(parts) - 1)
        value = yaml.safe_dump({parts[-1]: default}, default_flow_style=True, width=1000)
        value = value.strip()
        if value.startswith("{") and value.endswith("}"):
            value = value[1:-1]
        lines += [f"{indent}# {doc}", f"{indent}{value}"]
    return "\n".join(lines).lstrip("\n") + "\n"


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
