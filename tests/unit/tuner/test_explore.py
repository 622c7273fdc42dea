"""Exploration candidates: only settings the planner itself says fit, never the user's pins."""

from __future__ import annotations

import dataclasses

from velod.tuner import planner
from velod.tuner.explore import (
    CONTEXT,
    FLASH,
    KV,
    candidate_pins,
    honours,
    relabel,
    safe_candidates,
)

GIB = 1024**3


def plan_for(vram: int, models: list[str], pin: dict[str, str] | None = None,
             cc: tuple[int, int] = (8, 9), gpus: int = 1) -> tuple[planner.Plan, planner.Policy]:
    snapshot = planner.what_if_snapshot(vram, gpus, 64 * GIB, compute_capability=cc)
    state = planner.what_if_state(models, version="0.33.0")
    policy = planner.Policy(pin=pin or {})
    return planner.plan(snapshot, state, policy), policy


def replanner(vram: int, models: list[str], policy: planner.Policy, cc: tuple[int, int] = (8, 9),
              gpus: int = 1):  # type: ignore[no-untyped-def]
    snapshot = planner.what_if_snapshot(vram, gpus, 64 * GIB, compute_capability=cc)
    state = planner.what_if_state(models, version="0.33.0")
    return lambda pins: planner.plan(snapshot, state, dataclasses.replace(
        policy, pin={**policy.pin, **pins}))


def test_candidates_vary_flash_attention_cache_type_and_context() -> None:
    base, _ = plan_for(24 * GIB, ["llama3.1:8b"])
    fa, kv, ctx = (base.server[k].value for k in (FLASH, KV, CONTEXT))
    assert (fa, kv) == ("true", "f16")
    pins = candidate_pins(base)
    assert {FLASH: fa, KV: kv, CONTEXT: ctx} not in pins  # the plan itself is the baseline
    assert {FLASH: "true", KV: "q8_0", CONTEXT: ctx} in pins
    assert {FLASH: "false", KV: "f16", CONTEXT: ctx} in pins
    assert {FLASH: "true", KV: "f16", CONTEXT: str(int(ctx) // 2)} in pins
    assert all(p[KV] == "f16" for p in pins if p[FLASH] == "false")  # q8_0 needs flash
    assert len(pins) == 5


def test_every_safe_candidate_fits_with_all_models_on_the_gpu() -> None:
    base, policy = plan_for(24 * GIB, ["llama3.1:8b"])
    found = safe_candidates(base, replanner(24 * GIB, ["llama3.1:8b"], policy))
    assert found
    for pins, plan in found:
        assert honours(plan, pins) and plan.fits
        assert not any(plan.server[k].pinned for k in pins)  # shown as velod's, not the user's


def test_a_candidate_that_does_not_fit_is_left_out() -> None:
    # 7 GiB holds llama3.1:8b at 8192 tokens only with a q8_0 cache and flash attention:
    # f16 or flash attention off at that context would spill, so only the 4096 ones remain.
    base, policy = plan_for(7 * GIB, ["llama3.1:8b"])
    assert (base.server[KV].value, base.server[CONTEXT].value) == ("q8_0", "8192")
    found = [pins for pins, _ in safe_candidates(base, replanner(7 * GIB, ["llama3.1:8b"],
                                                                 policy))]
    assert found == [{FLASH: "true", KV: "q8_0", CONTEXT: "4096"},
                     {FLASH: "true", KV: "f16", CONTEXT: "4096"}]
    assert len(candidate_pins(base)) == 5


def test_user_pins_are_never_varied_and_flash_attention_is_never_forced_on() -> None:
    base, _ = plan_for(24 * GIB, ["llama3.1:8b"], pin={"OLLAMA_FLASH_ATTENTION": "false"})
    pins = candidate_pins(base)
    assert pins and all(p[FLASH] == "false" and p[KV] == "f16" for p in pins)
    old_gpu, _ = plan_for(24 * GIB, ["llama3.1:8b"], cc=(5, 2))  # no flash attention there
    assert all(p[FLASH] == "false" for p in candidate_pins(old_gpu))


def test_cpu_only_plans_are_not_explored() -> None:
    base, _ = plan_for(0, ["llama3.2:3b"], gpus=0)
    assert base.cpu_only and candidate_pins(base) == []


def test_relabel_keeps_values_and_says_why() -> None:
    _, policy = plan_for(24 * GIB, ["llama3.1:8b"])
    pinned = replanner(24 * GIB, ["llama3.1:8b"], policy)({KV: "q8_0"})
    shown = relabel(pinned, {KV: "q8_0"}, "explored: faster")
    assert shown.server[KV].value == "q8_0" and shown.server[KV].reason == "explored: faster"
    assert not shown.server[KV].pinned and pinned.server[KV].pinned
