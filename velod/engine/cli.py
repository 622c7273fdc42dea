"""velodctl engine: status, bench (with a live progress bar), submit and abort."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from velod.control.output import emit, print_json, table
from velod.control.progress import EventProgress, stderr_view

PLAIN_INTERVAL = 1.0  # engine progress comes 4 times a second: a plain line a second at most


def register(sub: argparse._SubParsersAction) -> None:
    engine = sub.add_parser("engine", help="the paged-attention engine (synthetic workload)")
    actions = engine.add_subparsers(dest="engine_command", metavar="ACTION")
    actions.required = True

    actions.add_parser("status", help="backend, geometry, pool, queue, throughput"
                       ).set_defaults(func=cmd_status)

    bench = actions.add_parser("bench", help="run a workload through the engine and report")
    bench.add_argument("--requests", type=int, default=64, help="requests (default 64)")
    bench.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    bench.add_argument("--gen", type=int, default=128, help="tokens to generate (default 128)")
    bench.add_argument("--shared-prefix", type=float, default=0.0, metavar="FRACTION",
                       help="fraction of each prompt shared by all requests (default 0)")
    bench.add_argument("--priority", action="store_true",
                       help="spread the requests over priorities -1, 0 and 1")
    bench.add_argument("--verify", type=int, default=0, metavar="N",
                       help="check N sequences' attention outputs against a dense recompute")
    bench.add_argument("--seed", type=int, default=0)
    bench.set_defaults(func=cmd_bench)

    submit = actions.add_parser("submit", help="queue one request")
    source = submit.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="comma-separated token ids")
    source.add_argument("--prompt-length", type=int, help="a synthetic prompt of N tokens")
    submit.add_argument("--max-new-tokens", type=int, required=True)
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--wait", action="store_true", help="wait for it to finish")
    submit.set_defaults(func=cmd_submit)

    abort = actions.add_parser("abort", help="abort a request, or all of them")
    target = abort.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", type=int)
    target.add_argument("--all", action="store_true")
    abort.set_defaults(func=cmd_abort)

    from velod.engine import generate_cli

    generate_cli.register(sub, actions)


# ---------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace, client: Any) -> int:
    status = client.call("engine.status")
    emit(args, status, render_status)
    return 0


def render_status(s: dict[str, Any]) -> str:
    lines = [f"engine: {s.get('state')} — {s.get('summary')}"]
    if s.get("error"):
        lines.append(f"error: {s['error']}")
    if not s.get("enabled"):
        return "\n".join(lines)
    g = s.get("geometry") or {}
    model = s.get("model") or {}
    if model.get("architecture"):  # a language model
        from velod.engine.generate_cli import render_model

        lines.append(render_model(model))
    label = "KV" if model.get("architecture") else "model"
    lines.append(f"{label}: {g.get('name')} geometry ({g.get('layers')} layers, "
                 f"{g.get('heads')} heads, {g.get('kv_heads')} KV heads, head dim "
                 f"{g.get('head_dim')}, context {g.get('max_context')}), {s.get('dtype')} "
                 f"cache; {model.get('kind')}")
    pool = s.get("pool") or {}
    if pool.get("allocated"):
        lines.append(f"backend: {s.get('backend')} on {s.get('device')}")
        lines.append(f"KV pool: {pool['bytes'] / 2**20:.0f} MiB, {pool['blocks']} blocks of "
                     f"{pool['block_size']} tokens, {pool['blocks_free']} free, "
                     f"{pool['blocks_cached']} cached, {pool['utilization']:.0%} in use")
        prefix = s.get("prefix_cache") or {}
        step = s.get("step_s") or {}
        rows = [
            ["requests", f"{s.get('running', 0)} running, {s.get('waiting', 0)} waiting, "
             f"{s.get('finished', 0)} finished, {s.get('aborted', 0)} aborted"],
            ["throughput", f"{s.get('tokens_per_s', 0):.1f} tokens/s over the last "
             f"{s.get('interval_s', 0):g}s"],
            ["step time", f"p50 {_ms(step.get('p50'))}, p99 {_ms(step.get('p99'))}"],
            ["preemptions", str(s.get("preemptions", 0))],
            ["prefix cache", f"{prefix.get('hit_rate', 0):.1%} of prompt tokens "
             f"({prefix.get('hit_tokens', 0)}/{prefix.get('query_tokens', 0)})"],
        ]
        lines.append(table(rows))
    else:
        lines.append(f"pool: not allocated (engine.kv_cache {pool.get('kv_cache')}; allocated "
                     "on the first submit or bench)")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


# ---------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace, client: Any) -> int:
    params = {"requests": args.requests, "prompt": args.prompt, "gen": args.gen,
              "shared_prefix": args.shared_prefix, "priority": args.priority,
              "verify": args.verify, "seed": args.seed}
    progress = EventProgress(args.socket, ["engine.bench.progress"], render_progress,
                             stderr_view("bench", min_interval=PLAIN_INTERVAL))
    try:
        result = client.call("engine.bench", params, timeout=24 * 3600)
    finally:
        progress.close()
    emit(args, result, render_bench)
    return 0


def render_progress(p: dict[str, Any]) -> tuple[str, float]:
    """One ``engine.bench.progress`` event as the progress view's (text, fraction)."""
    fraction = min(max(float(p.get("fraction", 0.0)), 0.0), 1.0)
    return (f"{fraction:4.0%} {p.get('generated', 0)}/{p.get('target', 0)} tokens, "
            f"{p.get('finished', 0)}/{p.get('requests', 0)} requests, "
            f"{p.get('tokens_per_s', 0.0):.0f} tokens/s, {p.get('elapsed_s', 0.0):.1f}s",
            fraction)


def render_bench(r: dict[str, Any]) -> str:
    w = r.get("workload") or {}
    g = r.get("geometry") or {}
    prefix = r.get("prefix_cache") or {}
    kv = r.get("kv_utilization") or {}
    breakdown = r.get("breakdown") or {}

    def pair(key: str) -> str:
        value = r.get(key) or {}
        return f"p50 {_ms(value.get('p50'))}, p99 {_ms(value.get('p99'))}"

    rows = [
        ["workload", f"{w.get('requests')} requests x {w.get('prompt')} prompt / {w.get('gen')} "
         f"generated tokens, shared prefix {w.get('shared_prefix', 0):g}"
         + (", mixed priorities" if w.get("priority") else "")],
        ["engine", f"{g.get('name')} ({g.get('layers')}x{g.get('heads')}/{g.get('kv_heads')}"
         f"x{g.get('head_dim')}), {r.get('dtype')} on {r.get('backend')} ({r.get('device')})"],
        ["elapsed", f"{r.get('elapsed_s', 0):.2f} s in {r.get('steps')} steps"],
        ["throughput", f"{r.get('tokens_per_s', 0):.1f} generated tokens/s "
         f"({r.get('processed_tokens_per_s', 0):.1f} incl. prompt)"],
        ["time to first token", pair("ttft_s")],
        ["per-token latency", pair("token_latency_s")],
        ["step time", pair("step_s")],
        ["KV utilization", f"mean {kv.get('mean', 0):.0%}, max {kv.get('max', 0):.0%}"],
        ["preemptions", str(r.get("preemptions"))],
        ["prefix cache", f"{prefix.get('hit_rate', 0):.1%} of prompt tokens "
         f"({prefix.get('hit_tokens', 0)}/{prefix.get('query_tokens', 0)})"],
        ["outside kernels", f"{breakdown.get('overhead_share', 0):.1%} of step time"],
        ["token counts", "exact" if r.get("exact_token_counts") else "NOT exact"],
    ]
    verify = r.get("verify")
    if verify:
        rows.append(["verify", f"{verify.get('sequences')} sequences, {verify.get('positions')} "
                     f"positions: max |error| {verify.get('max_abs_error')} vs dense reference"])
    return table(rows) + f"\nnote: {r.get('model')}"


# ---------------------------------------------------------------------------- submit, abort


def cmd_submit(args: argparse.Namespace, client: Any) -> int:
    params: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "priority": args.priority}
    if args.prompt is not None:
        try:
            params["prompt"] = [int(t) for t in args.prompt.split(",") if t.strip()]
        except ValueError:
            print("velodctl: --prompt takes comma-separated integer token ids", file=sys.stderr)
            return 2
    else:
        params["prompt_length"] = args.prompt_length
    events = None
    if args.wait:
        from velod.control.client import Client

        watcher = Client.connect(args.socket)
        events = watcher.subscribe(["engine.finished"])
    result = client.call("engine.submit", params)
    finished = None
    if events is not None:
        for event in events:
            data = event.get("data") or {}
            if data.get("id") == result["id"]:
                finished = data
                break
    if args.json:
        print_json({**result, "finished": finished} if args.wait else result)
    else:
        print(f"request {result['id']} queued ({result['prompt_tokens']} prompt tokens, "
              f"{result['max_new_tokens']} to generate)")
        if finished:
            print(f"finished: {finished.get('reason')}, {finished.get('generated')} tokens, "
                  f"time to first token {_ms(finished.get('ttft_s'))}")
    return 0


def cmd_abort(args: argparse.Namespace, client: Any) -> int:
    result = client.call("engine.abort", {"all": True} if args.all else {"id": args.id})
    if args.json:
        print_json(result)
    else:
        aborted = result.get("aborted") or []
        print(f"aborted {len(aborted)} request(s): {', '.join(map(str, aborted)) or '-'}")
    return 0
