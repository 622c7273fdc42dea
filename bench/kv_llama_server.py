"""velod's KV-cache estimate against the sizes the real llama-server logs, per setting.

Beside it, what sizing every layer at the full context (velod before issue 17) would say.

The cases of ``tests/unit/model/test_kv_llama_server.py`` (Gemma 3 270M with its 15
sliding-window layers, and the tiny random full-attention llama), each started once with
``-lv 4`` so that llama-server logs every cache it allocates. Prints JSON.

    .venv/bin/python bench/kv_llama_server.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from harness import machine

from tests import assets
from tests.tiny_vocab import spm_metadata
from tests.unit.model.test_kv_llama_server import (
    GEMMA_CASES,
    TINY_CASES,
    logged_kv_bytes,
    velod_estimate,
)
from velod.model.gguf_header import read_geometry
from velod.model.kv import context_per_sequence, kv_bytes_per_token

MIB = 1024**2


def main() -> None:
    from tests.unit.tiny_gguf import SPECS, write_tiny

    tiny = write_tiny(Path(tempfile.mkdtemp()) / "tiny-llama.gguf", SPECS["llama"], seed=7,
                      vocab=spm_metadata())
    rows = []
    for name, model, cases in (("gemma3-270m", assets.gemma3_gguf(), GEMMA_CASES),
                               ("tiny-llama", tiny, TINY_CASES)):
        for ctx, slots, k, v, extra, _unified in cases:
            logged, unified = logged_kv_bytes(model, ctx, "-np", str(slots), "-ctk", k,
                                              "-ctv", v, *extra)
            ubatch = int(extra[extra.index("-ub") + 1]) if "-ub" in extra else 512
            estimate = velod_estimate(model, ctx, slots, unified, k, v, ubatch)
            # What sizing every layer at the full context (velod before issue 17) said.
            cells = context_per_sequence(ctx, slots, unified) * (1 if unified else slots)
            naive = kv_bytes_per_token(read_geometry(model), k, cache_type_v=v) * cells
            rows.append({"model": name, "ctx": ctx, "slots": slots, "k": k, "v": v,
                         "flags": " ".join(extra), "unified": unified,
                         "llama_server_mib": round(logged / MIB, 2),
                         "velod_mib": round(estimate / MIB, 2),
                         "ratio": round(estimate / logged, 4),
                         "every_layer_full_mib": round(naive / MIB, 2)})
    print(json.dumps({"machine": machine(), "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
