"""Write tables for the fake ``pynvml`` (tests/fakes/nvml) and load private copies of it.

A daemon under test gets fake NVIDIA GPUs with::

    table = tmp_path / "nvml.json"
    write_gpu_table(table, [gpu("NVIDIA GeForce RTX 4090", memory_total=24 * GiB)])
    env = nvml_env(table)   # PYTHONPATH=tests/fakes/nvml + FAKE_NVML_TABLE=table

and changes them while it runs by calling ``write_gpu_table`` again (the fake notices the
new file). The table format is documented in ``tests/fakes/nvml/pynvml.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

GiB = 1024**3
MiB = 1024**2
FAKE_NVML_DIR = Path(__file__).resolve().parent / "nvml"


def gpu(name: str = "NVIDIA GeForce RTX 4090", *, memory_total: int = 24 * GiB,
        memory_used: int | None = None, **fields: Any) -> dict[str, Any]:
    """One GPU row of the table; ``fields`` are any other keys of the table format.

    ``raise_`` stands for the table's ``raise`` key (a Python keyword).
    """
    if "raise_" in fields:
        fields["raise"] = fields.pop("raise_")
    row: dict[str, Any] = {"name": name, "memory_total": memory_total, **fields}
    if memory_used is not None:
        row["memory_used"] = memory_used
    return row


def write_gpu_table(path: str | os.PathLike[str], gpus: list[dict[str, Any]] | None = None,
                    **top: Any) -> Path:
    """Atomically write a table with ``gpus`` and top-level keys ``top``; returns the path.

    The file is replaced by rename and its mtime moved forward, so a running fake sees a
    change even when two writes fall in the same clock tick.
    """
    path = Path(path)
    table = {"gpus": gpus or [], **top}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1), encoding="utf-8")
    old_ns = path.stat().st_mtime_ns if path.exists() else 0
    os.replace(tmp, path)
    new_ns = max(path.stat().st_mtime_ns, old_ns + 1_000_000)
    os.utime(path, ns=(new_ns, new_ns))
    return path


def nvml_env(table: str | os.PathLike[str], base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment additions that make a child Python process import the fake ``pynvml``."""
    env = dict(base or {})
    rest = env.get("PYTHONPATH") or os.environ.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAKE_NVML_DIR), rest) if p)
    env["FAKE_NVML_TABLE"] = str(table)
    return env


def load_fake_pynvml(table: str | os.PathLike[str] | None) -> ModuleType:
    """A private copy of the fake module reading ``table`` (None: no NVML library)."""
    spec = importlib.util.spec_from_file_location("fake_pynvml", FAKE_NVML_DIR / "pynvml.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.fake_load_table(table if table is not None else os.devnull + ".missing")
    return module
