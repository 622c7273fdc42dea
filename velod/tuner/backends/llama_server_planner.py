"""The llama-server planner: (hardware, the served model, policy) -> LLAMA_ARG_* settings.

Pure: no I/O. llama-server serves one model, so the plan is one search: the profile's
(context per slot, slots, KV cache type) candidates in order of preference, the first with
which the model runs fully on the GPU (or, without a GPU, fits the RAM velod counts on),
sized by ``velod.tuner.fitting`` over the one KV-size function. The plan states:

- ``LLAMA_ARG_CTX_SIZE``: the context of all slots together (llama-server splits it equally;
  ``slots x context per slot``), and ``LLAMA_ARG_N_PARALLEL``, the slots;
- ``LLAMA_ARG_CACHE_TYPE_K`` / ``_V`` and ``LLAMA_ARG_FLASH_ATTN`` (on when the cache is
  quantized: llama.cpp refuses a quantized V cache without it; else auto, llama.cpp's own
  probe of the device);
- ``LLAMA_ARG_N_GPU_LAYERS`` on a machine with GPUs: all, or the layers that fit.

Pins (``llama_server[].pin``) and the settings the unit's command line fixes
(``Policy.locked``) are planned around: a fixed context or slot count shapes the rest, and a
locked setting is shown with why velod cannot change it, never written.

On the CPU, llama-server's continuous batching still serves several requests faster together
than one by one (Gemma 3 270M here: 89 tok/s alone, 157 in all at 8 requests) and the cache
lives in RAM, so CPU plans keep several slots where a small context allows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from velod.hardware.snapshot import Snapshot
from velod.model.kv import bytes_per_element, context_per_sequence, is_quantized
from velod.tuner import fitting
from velod.tuner.backends.base import ServerState
from velod.tuner.backends.llama_server_settings import SETTINGS, TABLE, normalize
from velod.tuner.backends.ollama_settings import gpu_supports_flash_attention
from velod.tuner.fitting import Footprint, GpuRoom
from velod.tuner.plan import GpuBudget, ModelPlan, Plan, RamBudget, Recommendation
from velod.tuner.planner import CONTEXT_FLOOR, GPU_CANDIDATES, Policy, gpu_rooms
from velod.tuner.state import ModelInfo
from velod.units import format_size

KIND = "llama-server"
AUTO_SLOTS = 4  # what llama-server makes of --parallel -1
CTX, SLOTS, FLASH = "LLAMA_ARG_CTX_SIZE", "LLAMA_ARG_N_PARALLEL", "LLAMA_ARG_FLASH_ATTN"
CACHE_K, CACHE_V, GPU_LAYERS = ("LLAMA_ARG_CACHE_TYPE_K", "LLAMA_ARG_CACHE_TYPE_V",
                                "LLAMA_ARG_N_GPU_LAYERS")
# (context per slot, slots), most preferred first, for machines without a usable GPU.
CPU_CANDIDATES: dict[str, list[tuple[int, int]]] = {
    "balanced": [(8192, 4), (4096, 4), (4096, 2), (2048, 2), (2048, 1)],
    "throughput": [(4096, 8), (4096, 4), (2048, 4), (2048, 2), (2048, 1)],
    "long-context": [(32768, 1), (16384, 1), (8192, 1), (4096, 1), (2048, 1)],
    "low-memory": [(2048, 1)],
}
KV_TYPES = {"balanced": ["f16", "q8_0"], "throughput": ["f16", "q8_0"],
            "long-context": ["q8_0"], "low-memory": ["q8_0", "q4_0"]}


@dataclass(frozen=True)
class _Shape:
    """Fixed parts of the server's shape (pins and command line), as numbers."""

    slots: int | None
    total_context: int | None  # LLAMA_ARG_CTX_SIZE; 0 = the trained context per slot
    unified: bool | None
    flash: str | None
    cache_k: str | None
    cache_v: str | None
    ubatch: int


@dataclass(frozen=True)
class _Candidate:
    context: int  # per slot
    slots: int
    kv: str

    def compactness(self) -> float:
        return self.context * self.slots * bytes_per_element(self.kv)


def plan(snapshot: Snapshot, state: ServerState, policy: Policy) -> Plan:
    """Plan llama-server's settings for ``snapshot``'s hardware and the model it serves."""
    notes: list[str] = list(policy.notes)
    if not state.reachable:
        notes.append(f"llama-server is not reachable ({state.error or 'no answer'}): "
                     "planned from the last known model")
    fixed = _fixed(policy, notes)
    shape = _shape(fixed)
    model, skipped = _served_model(state, notes)
    rooms, gpu_names = gpu_rooms(snapshot, policy, {}, notes)
    if model is None or model.geometry is None:
        notes.append("no model to plan for: velod plans llama-server once it can read the "
                     "served model's GGUF")
        return _plan(policy, _fixed_rows(policy, fixed, []), {}, [], None, notes, skipped,
                     cpu_only=not rooms)
    unified = shape.unified if shape.unified is not None else shape.slots == -1
    fa_ok = (not rooms or all(gpu_supports_flash_attention(g) for g in snapshot.gpus
                              if g.memory_total)) and shape.flash != "off"
    candidates = _candidates(policy, shape, model, rooms, fa_ok, notes)
    usable_ram = int(snapshot.memory.total * (1 - policy.ram_headroom_fraction))

    def footprint(c: _Candidate) -> Footprint:
        assert model is not None and model.geometry is not None
        return fitting.footprint(model.name, model.geometry, model.size, c.context, c.slots,
                                 c.kv, is_quantized(c.kv) or shape.flash == "on",
                                 shape.ubatch, unified)

    def fits(c: _Candidate) -> bool:
        if rooms:
            return fitting.place([footprint(c)], rooms).fits
        return footprint(c).total <= usable_ram

    chosen = next((c for c in candidates if fits(c)), None)
    fully = chosen is not None
    chosen = chosen or min(candidates, key=_Candidate.compactness)
    fp = footprint(chosen)
    layers = fp.layers
    budgets: list[GpuBudget] = []
    ram = None
    gpus: list[int] = []
    if rooms:
        placement = fitting.place([fp], rooms)
        if not fully:
            layers = fitting.gpu_layers_that_fit(fp, rooms)
            notes.append(f"{model.name} needs {format_size(fp.total)} even at {fp.context} "
                         f"tokens per slot, more than the usable VRAM: {layers} of "
                         f"{fp.layers} layers on the GPU, the rest on the CPU (slow)")
        gpus = placement.gpus_of.get(model.name, []) if fully else [r.index for r in rooms]
        budgets = [GpuBudget(index=load.room.index, name=gpu_names.get(load.room.index),
                             total=load.room.total, reserve=load.room.held_back,
                             weights=load.weights, kv_cache=load.kv_cache,
                             overhead=load.overhead, margin=load.room.margin,
                             free_after=load.free_after, fits=load.free_after >= 0,
                             models=list(load.models)) for load in placement.loads]
    else:
        reserve = snapshot.memory.total - usable_ram
        ram = RamBudget(total=snapshot.memory.total, reserve=reserve, weights=fp.weights,
                        kv_cache=fp.kv_cache, overhead=fp.overhead,
                        free_after=usable_ram - fp.total, fits=fp.total <= usable_ram)
        notes.append(f"no usable GPU: CPU-only plan over {format_size(usable_ram)} of RAM "
                     f"({policy.ram_headroom_fraction:.0%} left to the system)")
        if not fully:
            notes.append(f"{model.name} needs {format_size(fp.total)} even at {fp.context} "
                         f"tokens, more than the RAM velod counts on: it may swap")
    if unified:
        notes.append(f"one unified KV pool of {fp.context} tokens shared by "
                     f"{chosen.slots} slots (LLAMA_ARG_KV_UNIFIED or automatic slots)")
    mp = ModelPlan(name=model.name, source=model.source, context=fp.context,
                   parallel=chosen.slots, kv_cache_type=chosen.kv, weights=fp.weights,
                   kv_cache=fp.kv_cache, overhead=fp.overhead, gpus=gpus,
                   gpu_layers=layers if rooms else 0, layers=fp.layers,
                   fully_on_gpu=bool(rooms) and fully,
                   trained_context=model.geometry.context_length)
    rows = _fixed_rows(policy, fixed,
                       _rows(policy, chosen, fp, unified, bool(rooms), fully, layers, model.name))
    return _plan(policy, rows, {model.name: mp}, budgets, ram, notes, skipped,
                 cpu_only=not rooms)


def _plan(policy: Policy, rows: dict[str, Recommendation], models: dict[str, ModelPlan],
          budgets: list[GpuBudget], ram: RamBudget | None, notes: list[str],
          skipped: dict[str, str], cpu_only: bool) -> Plan:
    for name, (_, why) in sorted(policy.locked.items()):
        notes.append(f"{name} cannot be changed through the environment: {why}; velod plans "
                     "around it (remove the flag to let velod manage it)")
    return Plan(version=None, profile=policy.profile, cpu_only=cpu_only, server=rows,
                model_params={}, budgets=budgets, models=models, skipped=skipped,
                notes=notes, ram=ram, table=TABLE, kind=KIND)


def _fixed(policy: Policy, notes: list[str]) -> dict[str, str]:
    """Pins and command-line values, normalised (a value llama-server refuses is noted)."""
    out: dict[str, str] = {}
    for name, value in {**policy.pin, **{n: v for n, (v, _) in policy.locked.items()}}.items():
        try:
            out[name] = normalize(name, value)
        except ValueError as exc:
            notes.append(f"{name}={value!r} is not a value llama-server accepts ({exc}); "
                         "planned as if it were unset")
    return out


def _shape(fixed: dict[str, str]) -> _Shape:
    def number(name: str) -> int | None:
        return int(fixed[name]) if name in fixed else None

    unified = fixed.get("LLAMA_ARG_KV_UNIFIED")
    return _Shape(slots=number(SLOTS), total_context=number(CTX),
                  unified=None if unified is None else unified == "true",
                  flash=fixed.get(FLASH), cache_k=fixed.get(CACHE_K), cache_v=fixed.get(CACHE_V),
                  ubatch=number("LLAMA_ARG_UBATCH") or 512)


def _served_model(state: ServerState, notes: list[str]
                  ) -> tuple[ModelInfo | None, dict[str, str]]:
    skipped: dict[str, str] = {}
    usable = [m for m in state.models if m.geometry is not None and m.size > 0]
    for m in state.models:
        if m.geometry is None or m.size <= 0:
            skipped[m.name] = m.skip_reason or "shape or size unknown to velod"
    if len(usable) > 1:
        notes.append(f"llama-server serves one model: planned for {usable[0].name}")
        for m in usable[1:]:
            skipped[m.name] = f"llama-server serves one model ({usable[0].name})"
    return (usable[0] if usable else None), skipped


def _candidates(policy: Policy, shape: _Shape, model: ModelInfo, rooms: list[GpuRoom],
                fa_ok: bool, notes: list[str]) -> list[_Candidate]:
    assert model.geometry is not None
    trained = model.geometry.context_length
    pairs = (GPU_CANDIDATES if rooms else CPU_CANDIDATES)[policy.profile]
    if shape.slots is not None:
        slots = AUTO_SLOTS if shape.slots == -1 else shape.slots
        pairs = [(c, slots) for c, _ in pairs]
    if shape.total_context is not None:
        unified = shape.unified if shape.unified is not None else shape.slots == -1
        pairs = [(_per_slot(shape.total_context, p, unified, trained), p) for _, p in pairs]
    else:
        pairs = [(min(c, trained), p) for c, p in pairs]
    pairs = list(dict.fromkeys(pairs))
    if shape.cache_k or shape.cache_v:
        kv_types = [shape.cache_k or shape.cache_v or "f16"]
    elif not rooms:
        kv_types = ["f16"]  # on the CPU a quantized cache saves RAM that is rarely short
    elif fa_ok:
        kv_types = KV_TYPES[policy.profile]
    else:
        kv_types = ["f16"]
        notes.append("a quantized KV cache needs flash attention, which a GPU here lacks: "
                     "f16 only")
    floor = CONTEXT_FLOOR[policy.profile]
    upper = [_Candidate(c, p, kv) for kv in kv_types for c, p in pairs if c >= floor]
    lower = [_Candidate(c, p, kv) for c, p in pairs if c < floor for kv in kv_types]
    return upper + lower


def _per_slot(total: int, slots: int, unified: bool, trained: int) -> int:
    if total == 0:
        return trained  # -c 0: each slot gets the model's trained context
    return context_per_sequence(total, slots, unified)


def _rows(policy: Policy, c: _Candidate, fp: Footprint, unified: bool, gpu: bool,
          fully: bool, layers: int, name: str) -> list[tuple[str, str, str]]:
    slots = f"{c.slots} slots" if c.slots > 1 else "1 slot"
    where = "fully on the GPU" if gpu else "in RAM"
    why = {"balanced": "the largest context of the balanced profile",
           "throughput": "throughput profile: the most slots",
           "long-context": "long-context profile: the largest context",
           "low-memory": "low-memory profile: a small context"}[policy.profile]
    context_why = (f"{why} that keeps {name} {where}: {slots} of {fp.context} tokens"
                   if fully else f"the smallest context: {name} does not fit even so")
    total = fp.context if unified else fp.context * c.slots
    quantized = is_quantized(c.kv)
    rows = [
        (CTX, str(total), context_why),
        (SLOTS, str(c.slots), f"{slots}: requests served at once, batched together; "
         "llama-server splits the context equally" if not unified else
         f"{slots} sharing one pool"),
        (FLASH, "on" if quantized else "auto",
         "a quantized V cache needs flash attention" if quantized else
         "llama-server turns it on where the device supports it"),
        (CACHE_K, c.kv, f"{c.kv}: " + ("fits without quantizing the cache" if c.kv == "f16"
                                       else "half the memory of f16, little quality loss"
                                       if c.kv == "q8_0" else "the most compact cache")),
        (CACHE_V, c.kv, "the same type as K"),
    ]
    if gpu:
        rows.append((GPU_LAYERS, "all" if fully else str(layers),
                     "every layer fits the GPU with the cache" if fully else
                     f"{layers} of {fp.layers} layers fit; the rest run on the CPU"))
    return rows


def _fixed_rows(policy: Policy, fixed: dict[str, str], rows: list[tuple[str, str, str]]
                ) -> dict[str, Recommendation]:
    """Planned rows, then pins over them, then what the command line fixes over both."""
    out = {n: Recommendation(n, v, r, TABLE.defaults.get(n)) for n, v, r in rows}
    for name, value in policy.pin.items():
        reason = "pinned in config" + ("" if name in SETTINGS else
                                       " (not in velod's table of llama-server settings; "
                                       "passed through)")
        out[name] = Recommendation(name, fixed.get(name, value), reason,
                                   TABLE.defaults.get(name), pinned=True)
    for name, (value, why) in policy.locked.items():
        out[name] = Recommendation(name, fixed.get(name, value), why,
                                   TABLE.defaults.get(name), pinned=name in policy.pin,
                                   locked=why)
    return out
