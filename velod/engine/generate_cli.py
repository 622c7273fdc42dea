"""velodctl generate, engine load and engine unload: text from the engine's language model."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from velod.control.output import emit, print_json_line

GENERATE_TIMEOUT = 24 * 3600.0  # the request ends by itself (max tokens, context, Ctrl-C)
LOAD_TIMEOUT = 900.0


def register(sub: argparse._SubParsersAction, engine_actions: argparse._SubParsersAction) -> None:
    """Adds ``velodctl generate`` and the ``engine load|unload`` actions."""
    load = engine_actions.add_parser("load", help="load a language model (admin)")
    load.add_argument("model", help="an Ollama model name (gemma3:270m) or a GGUF file")
    load.add_argument("--chat-template", metavar="NAME|FILE",
                      help="chat template: a built-in (gemma, llama3, chatml) or a Jinja file")
    load.set_defaults(func=cmd_load)
    engine_actions.add_parser("unload", help="unload the language model (admin)"
                              ).set_defaults(func=cmd_unload)

    gen = sub.add_parser("generate", help="generate text with the engine's model (admin)")
    gen.add_argument("prompt", help="the prompt (with --chat: the user's message)")
    gen.add_argument("--model", help="the model (loaded first if another one is); default: "
                     "the loaded model")
    gen.add_argument("--chat", action="store_true",
                     help="send the prompt as a user message through the chat template")
    gen.add_argument("--system", help="with --chat: a system message first")
    gen.add_argument("--chat-template", metavar="NAME|FILE",
                     help="with --chat: a built-in template or a Jinja file")
    gen.add_argument("--max-tokens", type=int, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, help="0 = greedy (default 0.8)")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--min-p", type=float)
    gen.add_argument("--repeat-penalty", type=float, dest="repetition_penalty")
    gen.add_argument("--seed", type=int, help="same seed, same output")
    gen.add_argument("--stop", action="append", metavar="TEXT",
                     help="stop before this text (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", default=None,
                     help="keep generating past the model's end-of-generation tokens")
    gen.set_defaults(func=cmd_generate)


def cmd_load(args: argparse.Namespace, client: Any) -> int:
    params = {"model": args.model}
    if args.chat_template:
        params["chat_template"] = args.chat_template
    emit(args, client.call("engine.load", params, timeout=LOAD_TIMEOUT), render_model)
    return 0


def cmd_unload(args: argparse.Namespace, client: Any) -> int:
    result = client.call("engine.unload")
    emit(args, result, lambda r: f"unloaded {r['unloaded']}" if r.get("unloaded")
         else "no model was loaded")
    return 0


def render_model(m: dict[str, Any]) -> str:
    """One line per fact about a loaded model (also used by ``engine status``)."""
    weights = m.get("weights") or {}
    lines = [f"model: {m.get('name')} ({m.get('display_name') or '-'}), "
             f"{m.get('architecture')}, {m.get('quantization') or 'unknown quantization'}",
             f"shape: {m.get('layers')} layers, hidden {m.get('hidden')}, {m.get('heads')} "
             f"heads, {m.get('kv_heads')} KV heads, head dim {m.get('head_dim')}, vocabulary "
             f"{m.get('vocab_size')}, context {m.get('context_length')}"
             + (f", sliding window {m['sliding_window']}" if m.get("sliding_window") else "")]
    if weights:
        lines.append(f"weights: {_mib(weights.get('bytes'))} MiB {weights.get('dtype')} in "
                     f"memory (file {_mib(weights.get('file_bytes'))} MiB)")
    lines.append(f"chat template: {m.get('chat_template')}")
    return "\n".join(lines)


def _mib(value: Any) -> str:
    return "?" if not isinstance(value, int) else f"{value / 2**20:.0f}"


def generation_params(args: argparse.Namespace) -> dict[str, Any]:
    """engine.generate's params from the command line."""
    options = {key: getattr(args, key) for key in (
        "max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
        "ignore_eos")
        if getattr(args, key) is not None}
    if args.stop:
        options["stop"] = args.stop
    params: dict[str, Any] = {"options": options}
    if args.model:
        params["model"] = args.model
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        params["messages"] = [*messages, {"role": "user", "content": args.prompt}]
        if args.chat_template:
            params["chat_template"] = args.chat_template
    else:
        params["prompt"] = args.prompt
    return params


def cmd_generate(args: argparse.Namespace, client: Any) -> int:
    def on_token(method: str, params: Any) -> None:
        if method != "engine.token" or not isinstance(params, list) or not params:
            return
        piece = params[0]
        if args.json:
            print_json_line(piece)
        else:
            sys.stdout.write(piece.get("text", ""))
            sys.stdout.flush()

    result = client.call("engine.generate", generation_params(args), timeout=GENERATE_TIMEOUT,
                         on_notification=on_token)
    if args.json:
        print_json_line(result)
        return 0
    sys.stdout.write("\n")
    timings = result.get("timings") or {}
    eval_s = timings.get("eval_s") or 0.0
    rate = (result["completion_tokens"] - 1) / eval_s if eval_s > 0 else 0.0
    print(f"[{result['finish_reason']}: {result['prompt_tokens']} prompt tokens, "
          f"{result['completion_tokens']} generated, first token after "
          f"{(timings.get('ttft_s') or 0) * 1000:.0f} ms, {rate:.1f} tokens/s]",
          file=sys.stderr)
    return 0
