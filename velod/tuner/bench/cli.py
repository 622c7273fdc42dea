"""``velodctl bench [options]`` and ``velodctl bench list|show|compare``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from velod.control.output import emit, print_json, table
from velod.control.progress import EventProgress, stderr_view
from velod.tuner.bench.store import status_of

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C

PROMPT_CHOICES = ("chat", "summary", "code")
# (metric key, column header) in display order
COLUMNS = (("gen_tps", "GEN TOK/S"), ("prompt_tps", "PROMPT TOK/S"), ("ttft_s", "TTFT S"),
           ("total_s", "TOTAL S"), ("aggregate_tps", "AGG TOK/S"), ("load_s", "LOAD S"))


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser(
        "bench", help="benchmark a server (Ollama, llama-server); list, show and compare "
        "results",
        description="Benchmark a local server through its streaming API (admin): Ollama's "
        "/api/generate or llama-server's /completion. Per prompt and concurrency level: "
        "generation and prompt tokens/s (the server's own counters), time to first token, "
        "total time, aggregate tokens/s and load time; median and spread over the repeats, "
        "warm-up excluded. Results are saved in velod's state directory.")
    bench.add_argument("--backend", choices=["ollama", "llama-server"],
                       help="the kind of server to measure (default: the first managed one)")
    bench.add_argument("--server", metavar="NAME",
                       help="the server to measure by name, when several of a kind are managed")
    bench.add_argument("--model", help="model to measure (default: the most-used one)")
    bench.add_argument("--prompt", default=list(PROMPT_CHOICES), type=_prompts,
                       metavar="KIND[,KIND]", help="fixed prompts shipped with velod: chat "
                       "(short), summary (a long document), code (completion), or all "
                       "(default all)")
    bench.add_argument("--prompt-tokens", type=_positive, metavar="N",
                       help="stretch or cut the prompt to about N tokens")
    bench.add_argument("--gen", type=_positive, default=128, metavar="N",
                       help="tokens to generate per request (default 128)")
    bench.add_argument("--concurrency", type=_levels, default=[1], metavar="1,2,4",
                       help="concurrent requests, one case per level (default 1)")
    bench.add_argument("--repeat", type=_positive, default=3, metavar="R",
                       help="measured runs per case after the warm-up (default 3)")
    bench.add_argument("--timeout", type=float, default=600.0, metavar="S",
                       help="stop after S seconds, keeping partial results (default 600)")
    bench.add_argument("--url", metavar="URL", help="measure another Ollama-compatible "
                       "server, such as velod's own engine (http://127.0.0.1:11435, the "
                       "http.listen address), instead of the local Ollama")
    bench.set_defaults(func=cmd_run)
    actions = bench.add_subparsers(dest="bench_command", metavar="[ACTION]")
    listing = actions.add_parser("list", help="saved results, newest first")
    listing.add_argument("--limit", type=_positive, default=20, metavar="N")
    listing.set_defaults(func=cmd_list)
    show = actions.add_parser("show", help="one saved result")
    show.add_argument("id", nargs="?", default="last", help="ID, a unique prefix, or last")
    show.set_defaults(func=cmd_show)
    compare = actions.add_parser("compare", help="two results per metric, with ratios")
    compare.add_argument("a", help="ID of the first (baseline) result")
    compare.add_argument("b", help="ID of the second result")
    compare.set_defaults(func=cmd_compare)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _levels(text: str) -> list[int]:
    return [_positive(part) for part in text.split(",") if part.strip()]


def _prompts(text: str) -> list[str]:
    kinds = list(PROMPT_CHOICES) if text == "all" else [p for p in text.split(",") if p]
    bad = [k for k in kinds if k not in PROMPT_CHOICES]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown prompt {bad[0] if bad else text!r} "
                                         f"(chat, summary, code or all)")
    return kinds


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace, client: Any) -> int:
    params = {"model": args.model, "prompts": args.prompt, "prompt_tokens": args.prompt_tokens,
              "gen": args.gen, "concurrency": args.concurrency, "repeat": args.repeat,
              "timeout": args.timeout, "url": args.url}
    params.update({k: v for k, v in (("backend", args.backend), ("server", args.server)) if v})
    progress = None
    try:
        progress = EventProgress(args.socket, ["bench.progress"], render_progress,
                                 stderr_view("bench"))
        result = client.call("bench.run", params, timeout=args.timeout + 120)
    except KeyboardInterrupt:
        # Leaving closes the connection; velod sees it, stops and saves what it measured.
        run_id = progress.last.get("id") if progress else None
        if progress:
            progress.close()
        where = f"`velodctl bench show {run_id}`" if run_id else "`velodctl bench list`"
        print(f"velodctl: interrupted; velod keeps the partial run ({where})",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if progress:
            progress.close()
    emit(args, result, render_result)
    if result.get("error"):
        print(f"velodctl: {result['error']}", file=sys.stderr)
        return 1
    return 0


def render_progress(data: dict[str, Any]) -> tuple[str, float] | None:
    """One ``bench.progress`` event as a progress step: (text, fraction done)."""
    if data.get("phase") == "finished":
        return None  # the result says how it ended
    done, total = data.get("done", 0), max(1, data.get("total", 1))
    what = data.get("prompt") or ""
    if data.get("concurrency"):
        what += f" x{data['concurrency']}"
    return f"{done}/{total} requests, {data.get('phase', '')} {what}".rstrip(), done / total


def cmd_list(args: argparse.Namespace, client: Any) -> int:
    result = client.call("bench.list", {"limit": args.limit})
    if args.json:
        print_json(result)
        return 0
    rows = [[r["id"], _when(r.get("time")), str(r.get("server") or "ollama"),
             str(r.get("model")), str(r.get("purpose")), _num(r.get("gen_tps")),
             r.get("status") or ("complete" if r.get("complete") else "partial")]
            for r in result["results"]]
    damaged = result.get("damaged") or []
    if not rows and not damaged:
        print(f"no saved benchmarks (in {result['directory']}); run `velodctl bench`")
        return 0
    if rows:
        print(table(rows, ["ID", "TIME", "SERVER", "MODEL", "PURPOSE", "GEN TOK/S", "STATUS"]))
    for run_id in damaged:
        print(f"warning: {run_id}: damaged file skipped (`velodctl bench show {run_id}` "
              "says why)")
    return 0


def cmd_show(args: argparse.Namespace, client: Any) -> int:
    result = client.call("bench.show", {"id": args.id})
    emit(args, result, render_result)
    return 0


def cmd_compare(args: argparse.Namespace, client: Any) -> int:
    result = client.call("bench.compare", {"a": args.a, "b": args.b})
    emit(args, result, render_compare)
    return 0


# --------------------------------------------------------------------------- output


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _cell(stats: dict[str, Any] | None, seconds: bool) -> str:
    if not stats:
        return "-"
    digits = 3 if seconds else 1
    return f"{stats['median']:.{digits}f} ±{stats['spread']:.{digits}f}"


def render_result(r: dict[str, Any]) -> str:
    spec = r.get("spec", {})
    model = r.get("model") or {}
    digest = (model.get("digest") or "")[:12]
    server = r.get("server") or {"name": "ollama", "kind": "ollama", **(r.get("ollama") or {})}
    lines = [f"benchmark {r.get('id')}  {_when(r.get('time'))}  "
             f"{status_of(r).upper() if not r.get('complete') else 'complete'}",
             f"model {model.get('name')}" + (f" ({digest})" if digest else "")
             + f"  {server.get('name')} ({server.get('kind')} {server.get('version')})"
             f"  gen {spec.get('gen')} tokens, {spec.get('repeat')} repeat(s) after a warm-up"]
    settings = r.get("server_settings") or {}
    if settings:
        lines.append("settings " + " ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    loaded = r.get("loaded")
    if loaded and loaded.get("gpu_percent") is not None:
        lines.append(f"loaded   {loaded.get('gpu_percent')}% on the GPU, context "
                     f"{loaded.get('context_length')}")
    elif loaded:
        lines.append(f"serving  {loaded.get('slots')} slot(s) of {loaded.get('context_length')} "
                     "tokens")
    rows = []
    for case in r.get("cases", []):
        m = case["metrics"]
        rows.append([case["prompt"], str(case["concurrency"]), str(case["repeats"])]
                    + [_cell(m.get(k), k.endswith("_s")) for k, _ in COLUMNS])
    if rows:
        lines += ["", table(rows, ["PROMPT", "CONC", "RUNS"] + [h for _, h in COLUMNS])]
    else:
        lines.append("no case was measured")
    warm = r.get("warmups") or []
    if warm:
        lines.append("warm-up (excluded): " + ", ".join(
            f"{w['prompt']} load {w['load_s']:.3f}s total {w['total_s']:.3f}s" for w in warm))
    if r.get("error"):
        lines.append(f"error: {r['error']}")
    return "\n".join(lines)


def render_compare(c: dict[str, Any]) -> str:
    a, b = c["a"], c["b"]
    lines = [f"A {a['id']}  {a.get('model')}  {_num(a.get('gen_tps'))} tok/s",
             f"B {b['id']}  {b.get('model')}  {_num(b.get('gen_tps'))} tok/s"]
    for name, (va, vb) in c.get("settings_changed", {}).items():
        lines.append(f"  {name}: {va if va is not None else '(unset)'} -> "
                     f"{vb if vb is not None else '(unset)'}")
    rows = []
    for row in c["rows"]:
        seconds = row["unit"] == "s"
        digits = 3 if seconds else 1
        verdict = ("noise" if row["significant"] is False
                   else "spread unknown" if not row.get("spread_known", True)
                   else "?" if row["significant"] is None
                   else "better" if row["b_better"] else "worse")
        rows.append([f"{row['prompt']} x{row['concurrency']}", f"{row['label']} ({row['unit']})",
                     _num(row["a"], digits), _num(row["b"], digits),
                     _num(row["ratio"], 3), verdict])
    lines += ["", table(rows, ["CASE", "METRIC", "A", "B", "B/A", "B IS"])]
    lines += [f"note: {n}" for n in c.get("notes", [])]
    return "\n".join(lines)
