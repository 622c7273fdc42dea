"""Candidate server settings for exploration, each one the planner considers safe.

Pure. A candidate is a set of pins over the dimensions that change speed but not what the
user's models can do much: flash attention on/off, KV cache f16/q8_0, and the plan's
context or half of it. Each is planned again with those pins (``replan``); it is kept only
when that plan still fits, honours the pins, and keeps every planned model fully on the GPU.
Settings the user pinned in ``tuner.pin`` are never varied.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

from velod.tuner.backends.ollama_settings import normalize
from velod.tuner.plan import Plan, Recommendation

FLASH = "OLLAMA_FLASH_ATTENTION"
KV = "OLLAMA_KV_CACHE_TYPE"
CONTEXT = "OLLAMA_CONTEXT_LENGTH"
MIN_CONTEXT = 2048

Pins = dict[str, str]


def _value(plan: Plan, name: str) -> str | None:
    rec = plan.server.get(name)
    return normalize(name, rec.value) if rec is not None else None


def candidate_pins(base: Plan) -> list[Pins]:
    """Pin sets to try, base first excluded; the plan's own choice first in each dimension."""
    if base.cpu_only:
        return []  # CPU-only: flash attention and the cache type change little
    fa, kv, ctx = _value(base, FLASH), _value(base, KV), _value(base, CONTEXT)
    if fa is None or kv is None or ctx is None:
        return []  # this Ollama version does not read them all

    def free(name: str) -> bool:
        return not base.server[name].pinned

    # Turning flash attention on where the planner said off could break an unsupported GPU.
    fa_options = [fa] + (["false"] if fa == "true" and free(FLASH) else [])
    contexts = [ctx]
    if free(CONTEXT) and int(ctx) // 2 >= MIN_CONTEXT:
        contexts.append(str(int(ctx) // 2))
    out: list[Pins] = []
    for flash, context in itertools.product(fa_options, contexts):
        kv_options = [kv if flash == "true" else "f16"]
        if flash == "true" and free(KV):
            kv_options += [k for k in ("f16", "q8_0") if k not in kv_options]
        for cache in kv_options:
            pins = {FLASH: flash, KV: cache, CONTEXT: context}
            if pins != {FLASH: fa, KV: kv, CONTEXT: ctx}:
                out.append(pins)
    return out


def honours(plan: Plan, pins: Pins) -> bool:
    """True when ``plan`` fits with every planned model fully on the GPU and sets ``pins``."""
    return (plan.fits and all(m.fully_on_gpu for m in plan.models.values())
            and all(_value(plan, k) == normalize(k, v) for k, v in pins.items()))


def safe_candidates(base: Plan, replan: Callable[[Pins], Plan]) -> list[tuple[Pins, Plan]]:
    """The candidates whose plan (from ``replan(pins)``) is safe, in order."""
    out = []
    for pins in candidate_pins(base):
        plan = replan(pins)
        if honours(plan, pins):
            out.append((pins, relabel(plan, pins, "exploration candidate")))
    return out


def relabel(plan: Plan, pins: Pins, reason: str) -> Plan:
    """``plan`` with the explored pins shown as velod's choice, not as the user's pins."""
    server = dict(plan.server)
    for name in pins:
        rec = server.get(name)
        if rec is not None:
            server[name] = Recommendation(name, rec.value, reason, rec.default, pinned=False)
    return dataclasses.replace(plan, server=server)
