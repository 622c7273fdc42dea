"""``velodctl hw``: the hardware the daemon sees, once or refreshing like ``watch nvidia-smi``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from velod.control.output import emit, print_json_line, table
from velod.units import format_size

CLEAR_HOME = "\x1b[H\x1b[2J"  # cursor home, clear screen: redraw in place on a terminal
EXIT_OK = 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hw", help="GPUs, CPU and memory as the daemon sees them",
                       description="Show the latest hardware snapshot of velod's monitor.")
    p.add_argument("--watch", action="store_true",
                   help="refresh until Ctrl-C (in place on a terminal)")
    p.add_argument("--interval", type=_positive_seconds, default=2.0, metavar="SECONDS",
                   help="refresh period for --watch (default 2)")
    p.set_defaults(func=cmd_hw)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the interval must be greater than 0")
    return value


def cmd_hw(args: argparse.Namespace, client: Any) -> int:
    if not args.watch:
        result = client.call("hardware.get")
        emit(args, result, render)
        return EXIT_OK
    in_place = sys.stdout.isatty() and not args.json
    try:
        while True:
            result = client.call("hardware.get")
            if args.json:
                print_json_line(result)
            elif in_place:
                sys.stdout.write(CLEAR_HOME + render(result) + "\n")
                sys.stdout.flush()
            else:
                print(render(result) + "\n", flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def render(result: dict[str, Any]) -> str:
    """The compact text of ``velodctl hw`` from a ``hardware.get`` result."""
    snap = result["snapshot"]
    lines = [table([gpu_row(g) for g in snap["gpus"]])]
    lines.append(f"CPU    {cpu_text(snap['cpu'])}")
    lines.append(memory_line(snap["memory"]))
    if not snap["gpus"]:
        notes = snap.get("gpu_notes") or {}
        lines.append("No GPU found:" if notes else "No GPU found.")
        lines.extend(f"  {vendor}: {why}" for vendor, why in sorted(notes.items()))
    for name, source in sorted((result.get("sources") or {}).items()):
        if source.get("state") != "ok":
            hung = " (call still hung)" if source.get("hung") else ""
            retry = source.get("retry_in")
            when = f"; retrying in {retry:.0f}s" if retry else ""
            lines.append(f"warning: {name} source failing: {source.get('error')}{hung}{when}")
    os_info = snap.get("os") or {}
    lines.append(f"OS     {os_info.get('distro') or os_info.get('system', '?')}, kernel "
                 f"{os_info.get('kernel', '?')}, {os_info.get('arch', '?')}")
    return "\n".join(line for line in lines if line)


def gpu_row(g: dict[str, Any]) -> list[str]:
    """GPU n | name | used / total | util | temp | power; an error replaces the figures."""
    label = f"GPU {g['index']}" + (" (AMD)" if g.get("vendor") == "amd" else "")
    name = g.get("name") or "?"
    if g.get("error"):
        return [label, name, f"error: {g['error']}", "", "", ""]
    memory = f"{format_size(g.get('memory_used'))} / {format_size(g.get('memory_total'))}"
    temp = f"{g['temperature']:.0f}°C" if g.get("temperature") is not None else "-"
    power = f"{g['power_draw']:.0f} W" if g.get("power_draw") is not None else ""
    return [label, name, memory, _percent(g.get("utilization_gpu")), temp, power]


def cpu_text(cpu: dict[str, Any]) -> str:
    parts = [cpu.get("model") or "?",
             f"{cpu.get('physical_cores') or '?'} cores / {cpu.get('threads') or '?'} threads"]
    freq = cpu.get("freq_current_mhz")
    if freq:
        parts.append(f"{freq / 1000:.2f} GHz")
    if cpu.get("utilization") is not None:
        parts.append(f"{cpu['utilization']:.0f}% busy")
    if cpu.get("flags"):
        parts.append(" ".join(cpu["flags"]))
    return ", ".join(parts)


def memory_line(mem: dict[str, Any]) -> str:
    line = (f"Memory {format_size(mem['available'])} available of "
            f"{format_size(mem['total'])}")
    if mem.get("swap_total"):
        line += f", swap {format_size(mem['swap_used'])} / {format_size(mem['swap_total'])}"
    return line


def _percent(value: float | None) -> str:
    return f"{value:.0f}%" if value is not None else "-"
