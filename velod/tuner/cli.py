"""``velodctl ollama``, ``velodctl tune show|plan|apply|rollback|history`` and, through
``velod.tuner.bench.cli``, ``velodctl bench``.

``tune show`` and ``tune plan`` show every managed server (Ollama, each llama-server) one
after the other, each setting named as that server names it; ``--server NAME`` picks one.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from velod.control.output import ago, emit, print_json, table
from velod.control.progress import EventProgress, stderr_view
from velod.tuner.bench.cli import register as register_bench
from velod.units import format_size, parse_size

EXIT_OK = 0


def register(sub: argparse._SubParsersAction) -> None:
    ollama = sub.add_parser("ollama", help="is Ollama reachable; version; loaded models",
                            description="Ollama as velod sees it: reachable or not, its "
                            "version, and each loaded model's GPU/CPU split and context.")
    ollama.set_defaults(func=cmd_ollama)

    tune = sub.add_parser("tune", help="server settings (Ollama, llama-server): show, plan, "
                          "apply, rollback, history")
    actions = tune.add_subparsers(dest="tune_command", metavar="ACTION")
    actions.required = True
    show = actions.add_parser("show", help="current vs recommended settings, reasons, memory "
                              "budget")
    _server_option(show, "the server to show (default: every managed one)")
    show.set_defaults(func=cmd_show)
    plan = actions.add_parser("plan", help="plan for this machine, or a what-if one",
                              description="Plan the servers' settings. Without options: for "
                              "this machine and the installed (or served) models. With "
                              "options: for a hypothetical machine or other models; an "
                              "installed model's own metadata is used before velod's "
                              "catalog.")
    _server_option(plan, "the server to plan for (default: every managed one)")
    plan.add_argument("--vram", type=_size, metavar="SIZE", help="VRAM per GPU, e.g. 24GiB")
    plan.add_argument("--gpus", type=int, metavar="N", help="number of GPUs (0 = CPU only)")
    plan.add_argument("--ram", type=_size, metavar="SIZE", help="system RAM, e.g. 64GiB")
    plan.add_argument("--model", action="append", dest="models", metavar="NAME",
                      help="a model to plan for (repeat for several), e.g. llama3.1:8b")
    plan.add_argument("--profile", choices=["balanced", "throughput", "long-context",
                                            "low-memory"])
    plan.set_defaults(func=cmd_plan)
    apply = actions.add_parser("apply", help="apply the plan now (admin)",
                               description="Write velod's drop-in and restart the server with "
                               "the current plan, without waiting for tuner.settle. Waits for "
                               "it to be idle and for tuner.min_restart_interval unless "
                               "--now is given.")
    apply.add_argument("--now", action="store_true",
                       help="restart even if the server is busy or was restarted recently")
    _server_option(apply, "the server to change (needed when several are managed)")
    apply.set_defaults(func=cmd_apply)
    rollback = actions.add_parser("rollback", help="restore the previous drop-in and restart "
                                  "(admin)")
    _server_option(rollback, "the server to change (needed when several are managed)")
    rollback.set_defaults(func=cmd_rollback)
    history = actions.add_parser("history", help="the tuner's last decisions")
    history.add_argument("--limit", type=int, default=20, metavar="N")
    _server_option(history, "one server's decisions only")
    history.set_defaults(func=cmd_history)
    register_bench(sub)


def _server_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--server", metavar="NAME", help=f"{text}: ollama, llama-server, or "
                        "a llama_server's name")


def _with_server(args: argparse.Namespace, params: dict[str, Any]) -> dict[str, Any]:
    server = getattr(args, "server", None)
    return {**params, "server": server} if server else params


def _each_server(args: argparse.Namespace, client: Any, method: str,
                 params: dict[str, Any]) -> list[dict[str, Any]]:
    """``method``'s answer for the server named, else for every managed server in turn."""
    first = client.call(method, _with_server(args, params))
    if getattr(args, "server", None):
        return [first]
    others = [n for n in first.get("servers", []) if n != _name(first)]
    return [first] + [client.call(method, {**params, "server": n}) for n in others]


def _name(result: dict[str, Any]) -> str | None:
    server = result.get("server")
    return server.get("name") if isinstance(server, dict) else server


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --------------------------------------------------------------------------- commands


def cmd_ollama(args: argparse.Namespace, client: Any) -> int:
    result = client.call("ollama.status")
    emit(args, result, render_ollama)
    return EXIT_OK if result.get("reachable") else 1


def cmd_show(args: argparse.Namespace, client: Any) -> int:
    results = _each_server(args, client, "tuner.show", {})
    if args.json:
        print_json(results[0] if len(results) == 1 else {"servers": results})
    else:
        print("\n\n".join(render_show(r) for r in results))
    return EXIT_OK


def cmd_plan(args: argparse.Namespace, client: Any) -> int:
    params = {k: v for k, v in (("vram", args.vram), ("gpus", args.gpus), ("ram", args.ram),
                                ("models", args.models), ("profile", args.profile))
              if v is not None}
    results = _each_server(args, client, "tuner.plan", params)
    if args.json:
        print_json(results[0] if len(results) == 1 else {"servers": results})
        return EXIT_OK
    blocks = []
    for result in results:
        title = "What-if plan" if result.get("what_if") else "Plan for this machine"
        who = f"{result.get('server')}: " if len(results) > 1 else ""
        blocks.append(f"{who}{title} ({result['plan']['profile']} profile)\n"
                      + render_plan(result["plan"]))
    print("\n\n".join(blocks))
    return EXIT_OK


def cmd_apply(args: argparse.Namespace, client: Any) -> int:
    result = _with_progress(args, "tune apply", lambda: client.call(
        "tuner.apply", _with_server(args, {"now": args.now}), timeout=600))
    if args.json:
        print_json(result)
    else:
        print(f"{result['decision']}: {result['message']}")
    return EXIT_OK if result["decision"] in ("applied", "nothing") else 1


def _with_progress(args: argparse.Namespace, prefix: str, call: Any) -> Any:
    """``call()`` while its steps (restart, wait, verification benchmarks) go to stderr."""
    progress = EventProgress(args.socket, ["tuner.progress", "bench.progress"],
                             render_step, stderr_view(prefix))
    try:
        return call()
    finally:
        progress.close()


def render_step(data: dict[str, Any]) -> tuple[str, float | None] | None:
    """A ``tuner.progress`` step, or a verification benchmark's ``bench.progress``."""
    if "step" in data:
        return str(data["step"]), None
    if data.get("phase") in ("warm-up", "measure"):
        return (f"measuring {data.get('prompt') or ''}: {data.get('done', 0)}/"
                f"{data.get('total', 0)} requests"), None
    return None


def cmd_rollback(args: argparse.Namespace, client: Any) -> int:
    result = _with_progress(args, "tune rollback", lambda: client.call(
        "tuner.rollback", _with_server(args, {}), timeout=600))
    if args.json:
        print_json(result)
    else:
        print(f"{result['decision']}: {result['message']}")
    return EXIT_OK if result["decision"] == "rolled-back" else 1


def cmd_history(args: argparse.Namespace, client: Any) -> int:
    result = client.call("tuner.history", _with_server(args, {"limit": args.limit}))
    if args.json:
        print_json(result)
    else:
        print(render_history(result["entries"]))
        if result.get("warning"):
            print(f"warning: {result['warning']}")
    return EXIT_OK


# --------------------------------------------------------------------------- rendering


def render_ollama(r: dict[str, Any]) -> str:
    if r.get("reachable") is False:
        lines = [f"Ollama at {r['url']}: not reachable — {r.get('error')}"]
        if r.get("last_ok"):
            lines.append(f"last answered {ago(r['last_ok'])} (version {r.get('version')})")
        return "\n".join(lines)
    lines = [f"Ollama {r.get('version')} at {r['url']}: reachable, "
             f"{len(r.get('models') or [])} model(s) installed"]
    loaded = r.get("loaded") or []
    if not loaded:
        lines.append("No model loaded.")
        return "\n".join(lines)
    rows = []
    for m in loaded:
        split = (f"{m['cpu_percent']:.0f}%/{m['gpu_percent']:.0f}% CPU/GPU"
                 if m["spills_to_cpu"] else "100% GPU")
        rows.append([m["name"], format_size(m["size"]), split,
                     str(m.get("context_length") or "-"), _until(m.get("expires_at"))])
    lines.append(table(rows, ["NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]))
    if any(m["spills_to_cpu"] for m in loaded):
        lines.append("warning: part of a model runs on the CPU (slow); see `velodctl tune show`")
    return "\n".join(lines)


def _until(expires_at: str | None) -> str:
    if not expires_at:
        return "-"
    try:
        from datetime import datetime

        left = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp() - time.time()
    except ValueError:
        return expires_at
    if left > 365 * 86400:
        return "forever"
    return f"in {int(left // 60)}m{int(left % 60)}s" if left > 0 else "now"


def render_show(r: dict[str, Any]) -> str:
    plan = r["plan"]
    server = r.get("server") or r.get("ollama") or {}
    label = server.get("label") or "Ollama"
    version = server.get("version") or plan.get("version") or "?"
    head = f"{label} {version} at {server.get('url', '?')}: mode {r['mode']}, profile " \
        f"{r['profile']}"
    if server.get("reachable") is False:
        head += f" (not reachable: {server.get('error')})"
    lines = [head]
    seen = server.get("observed") or {}
    if seen.get("slots") is not None:
        lines.append(f"serving {seen.get('model')}: {seen['slots']} slot(s) of "
                     f"{seen.get('slot_context')} tokens, {'busy' if seen.get('busy') else 'idle'}"
                     + ("" if seen.get("metrics") else " (no /metrics: start it with --metrics "
                        "for token counters)"))
    lines.append("")
    rows = []
    for s in r["settings"]:
        current = s["current"] if s["current"] is not None else f"({s['default'] or 'unset'})"
        mark = "!" if s.get("locked") else "*" if s["change"] else " "
        pin = " (pinned)" if s["pinned"] else ""
        rows.append([mark + s["name"], current, s["recommended"] + pin, s["reason"]])
    lines.append(table(rows, [" SETTING", "CURRENT", "RECOMMENDED", "REASON"]))
    lines.append("(value) = not set, the server's default; * = will change; ! = fixed by the "
                 "unit's command line, cannot be applied")
    lines.append("")
    lines.append(render_budget(plan))
    for c in r.get("conflicts") or []:
        lines.append(f"{'warning' if c['wins'] else 'note'}: {c['message']}")
    for e in r.get("dropin_errors") or []:
        lines.append(f"warning: {e}")
    if r.get("unit_found") is False:
        lines.append(f"note: no {r['service']} unit or drop-ins in {r['systemd_dir']}: "
                     f"CURRENT shows {label}'s defaults (velod reads its settings from "
                     "systemd's files; see the systemd_dir and unit/service of this server "
                     "in velod's config)")
    lines.extend(f"note: {n}" for n in plan.get("notes") or [])
    for name, why in sorted((plan.get("skipped") or {}).items()):
        lines.append(f"skipped {name}: {why}")
    lines.append("")
    lines.append(_verdict(r, label))
    return "\n".join(lines)


def _verdict(r: dict[str, Any], label: str) -> str:
    running = r.get("running") or {}
    if r["up_to_date"]:
        if not running.get("known", True):
            return (f"The drop-ins set the recommended settings; what {label} runs cannot be "
                    f"checked ({running.get('note')}).")
        return f"{label} runs the recommended settings; nothing to change."
    count = len(r["changes"])
    if running.get("not_running"):
        names = ", ".join(f"{k}={v[0] if v[0] is not None else '(unset)'}"
                          for k, v in sorted(running["not_running"].items()))
        return (f"The drop-ins set the recommended settings, but {label} was not restarted "
                f"since: it runs {names}. "
                + ("Observe mode: `velodctl tune apply` restarts it." if r["mode"] == "observe"
                   else f"velod restarts it when {label} is idle."))
    if r.get("blocked"):
        return (f"{count} setting(s) differ, but this plan failed before "
                f"({r['blocked']['decision']}: {r['blocked']['message']}); velod will not "
                "retry it by itself (`velodctl tune apply` to try again).")
    if r["mode"] == "observe":
        return (f"{count} setting(s) to change. Observe mode: nothing is applied "
                "(`velodctl tune apply`, or set tuner.mode: apply).")
    pending = r.get("pending")
    when = f" in {pending['settled_in']:.0f}s" if pending and pending["settled_in"] else ""
    return f"{count} setting(s) to change; velod applies them{when} when {label} is idle."


def render_budget(plan: dict[str, Any]) -> str:
    budgets = plan.get("budgets") or []
    if not budgets and plan.get("ram"):
        ram = plan["ram"]
        rows = [["RAM", format_size(ram["total"]), format_size(ram["reserve"]),
                 format_size(ram["weights"]), format_size(ram["kv_cache"]),
                 format_size(ram["overhead"]), "-", format_size(ram["free_after"]),
                 "yes" if ram["fits"] else "NO"]]
    else:
        rows = [[f"GPU {b['index']}", format_size(b["total"]), format_size(b["reserve"]),
                 format_size(b["weights"]), format_size(b["kv_cache"]),
                 format_size(b["overhead"]), format_size(b["margin"]),
                 format_size(b["free_after"]), "yes" if b["fits"] else "NO"]
                for b in budgets]
    if not rows:
        return "Memory budget: no device."
    header = ["MEMORY", "TOTAL", "RESERVE", "WEIGHTS", "KV CACHE", "OVERHEAD", "MARGIN", "FREE",
              "FITS"]
    lines = ["Memory budget:", table(rows, header)]
    models = plan.get("models") or {}
    if models:
        model_rows = [[m["name"], str(m["context"]), str(m["parallel"]), m["kv_cache_type"],
                       format_size(m["kv_cache"]),
                       "CPU" if plan.get("cpu_only") else "GPU" if m["fully_on_gpu"]
                       else f"{m['gpu_layers']}/{m['layers']} layers on GPU",
                       _source(m.get("source"), plan.get("kind"))] for m in models.values()]
        lines.append(table(model_rows, ["MODEL", "CONTEXT", "SLOTS", "KV TYPE", "KV CACHE",
                                        "RUNS ON", "SHAPE FROM"]))
    return "\n".join(lines)


def _source(source: str | None, kind: str | None) -> str:
    """Where a model's shape came from, in words."""
    if source == "catalog":
        return "velod's catalog (not installed)"
    if source == "installed":
        return "served GGUF header" if kind == "llama-server" else "installed (/api/show)"
    return source or "?"


def render_plan(plan: dict[str, Any]) -> str:
    rows = [[("!" if s.get("locked") else "") + s["name"],
             s["value"] + (" (pinned)" if s["pinned"] else ""), s["reason"]]
            for s in plan["server"].values()]
    lines = [table(rows, ["SETTING", "VALUE", "REASON"])]
    for model, params in sorted((plan.get("model_params") or {}).items()):
        text = ", ".join(f"{p['name']}={p['value']}" for p in params.values())
        lines.append(f"{model}: {text}")
    lines.append("")
    lines.append(render_budget(plan))
    lines.extend(f"note: {n}" for n in plan.get("notes") or [])
    for name, why in sorted((plan.get("skipped") or {}).items()):
        lines.append(f"skipped {name}: {why}")
    if not plan.get("fits", True):
        lines.append("warning: this plan does not fit entirely; see the notes")
    return "\n".join(lines)


def render_history(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "No decisions recorded yet."
    several = len({e.get("server") for e in entries}) > 1
    rows = []
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("time", 0)))
        detail = e.get("message") or ""
        changes = e.get("changes")
        if isinstance(changes, dict) and changes:
            detail += " (" + ", ".join(f"{k}: {v[0] if v[0] is not None else 'unset'} -> {v[1]}"
                                       for k, v in changes.items()
                                       if isinstance(v, list) and len(v) == 2) + ")"
        rows.append([when] + ([str(e.get("server"))] if several else [])
                    + [e.get("decision", "?"), detail])
    return table(rows, ["TIME"] + (["SERVER"] if several else []) + ["DECISION", "DETAILS"])
