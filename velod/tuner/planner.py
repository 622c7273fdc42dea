"""The Ollama planner: (hardware, Ollama's models, policy) -> settings with reasons + budget.

Pure: no I/O. ``plan()`` searches the profile's (context, parallel slots, KV cache type)
candidates in order of preference and keeps the first with which the models that matter
run fully on the GPU, with a margin, inside ``memory_total - reserve`` of every GPU.

Which models must fit: with ``tuner.models``, the longest prefix of that list that fits
*together* at the smallest candidate is kept resident (and OLLAMA_MAX_LOADED_MODELS says
so); every other listed model must fit *alone*. Without ``tuner.models``, every installed
model must fit alone (Ollama evicts an idle model to load another). A model that does not fit
alone even at the smallest candidate is planned partly on the CPU and named in the notes.
Memory arithmetic and multi-GPU placement live in ``velod.tuner.fitting``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from velod.hardware.snapshot import Cpu, Gpu, Memory, OsInfo, Snapshot
from velod.model import catalog
from velod.model.kv import OLLAMA_CACHE_TYPES, bytes_per_element
from velod.tuner import fitting
from velod.tuner.backends.ollama_settings import (
    NOT_ENVIRONMENT,
    SETTINGS,
    Version,
    default_context_length,
    defaults_for,
    gpu_supports_flash_attention,
    known_for_version,
    normalize,
    parse_version,
)
from velod.tuner.fitting import Footprint, GpuRoom
from velod.tuner.plan import GpuBudget, ModelPlan, Plan, RamBudget, Recommendation
from velod.tuner.state import ModelInfo, OllamaState, catalog_model
from velod.units import format_size

if TYPE_CHECKING:
    from velod.config import TunerConfig

MIB = 1024**2
GIB = 1024**3
PROFILES = ("balanced", "throughput", "long-context", "low-memory")

# (context, parallel slots) in order of preference per profile. Larger first; the search
# keeps the first that fits. GPU lists aim at useful contexts; CPU lists stay modest because
# CPU prompt processing is slow and the KV cache competes with the OS for RAM.
GPU_CANDIDATES: dict[str, list[tuple[int, int]]] = {
    "balanced": [(32768, 2), (32768, 1), (16384, 1), (8192, 1), (4096, 1), (2048, 1)],
    "throughput": [(16384, 8), (8192, 8), (8192, 4), (4096, 4), (4096, 2), (2048, 2),
                   (2048, 1)],
    "long-context": [(131072, 1), (65536, 1), (32768, 1), (16384, 1), (8192, 1), (4096, 1),
                     (2048, 1)],
    "low-memory": [(4096, 1), (2048, 1)],
}
CPU_CANDIDATES: dict[str, list[tuple[int, int]]] = {
    "balanced": [(4096, 1), (2048, 1)],
    "throughput": [(4096, 2), (2048, 2), (2048, 1)],
    "long-context": [(16384, 1), (8192, 1), (4096, 1), (2048, 1)],
    "low-memory": [(2048, 1)],
}
# Contexts at or above this are all tried with an f16 cache before any with q8_0 (a balanced
# plan prefers 8192 tokens at f16 over 32768 at q8_0); below it, each context is tried with
# f16 then q8_0 before the next smaller one (4096 at q8_0 beats 2048 at f16).
CONTEXT_FLOOR = {"balanced": 8192, "throughput": 4096, "long-context": 0, "low-memory": 0}
# A further model of tuner.models joins the resident set only if all fit together with at
# least this context (most compact cache): residency never squeezes the context below it.
RESIDENT_MIN_CONTEXT = {"balanced": 8192, "throughput": 4096, "long-context": 16384,
                        "low-memory": 2048}


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Policy:
    """What the plan optimises for; built from ``tuner`` config by ``from_config``."""

    profile: str = "balanced"
    reserve_vram: int = 512 * MIB
    pin: dict[str, str] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    margin_fraction: float = 0.05  # of each GPU's total memory, for the estimate's error
    min_margin: int = 256 * MIB
    ram_headroom_fraction: float = 0.25  # of RAM left to the OS on CPU-only machines
    num_batch: int = 512  # Ollama's default num_batch
    # Settings the server's command line fixes: name -> (value, why the environment cannot
    # change it). The plan sizes around them and never writes them.
    locked: dict[str, tuple[str, str]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what the backend found while building the policy

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"unknown profile {self.profile!r} (one of {', '.join(PROFILES)})")
        if not 0 <= self.margin_fraction < 0.5:
            raise ValueError("margin_fraction must be in [0, 0.5)")
        if not 0 <= self.ram_headroom_fraction < 1:
            raise ValueError("ram_headroom_fraction must be in [0, 1)")

    @classmethod
    def from_config(cls, tuner: TunerConfig) -> Policy:
        return cls(profile=tuner.profile, reserve_vram=int(tuner.reserve_vram),
                   pin=dict(tuner.pin), models=list(tuner.models))

    def margin_for(self, total: int) -> int:
        return max(self.min_margin, int(total * self.margin_fraction))


@dataclass(frozen=True)
class _Candidate:
    context: int
    parallel: int
    kv_cache_type: str

    def compactness(self) -> float:
        return self.context * self.parallel * bytes_per_element(self.kv_cache_type)


# --------------------------------------------------------------------------- planning


def plan(snapshot: Snapshot, state: OllamaState, policy: Policy) -> Plan:
    """Plan Ollama's settings for ``snapshot``'s hardware and ``state``'s models."""
    version = parse_version(state.version)
    known = known_for_version(version)
    defaults = defaults_for(version, snapshot)
    notes = _version_notes(state, version)
    if not state.reachable:
        notes.append(f"Ollama is not reachable ({state.error or 'no answer'}): planned from "
                     "the last known models")
    models, sources, skipped = _select_models(state, policy, notes)
    pins = _valid_pins(policy.pin, known, notes)
    rooms, gpu_names = gpu_rooms(snapshot, policy, pins, notes)
    for loaded in state.loaded:
        if loaded.spills_to_cpu:
            share = 100 * (1 - loaded.gpu_fraction)
            notes.append(f"{loaded.name} runs {share:.0f}% on the CPU now "
                         f"({format_size(loaded.size_vram)} of {format_size(loaded.size)} "
                         "in VRAM)")
    ctx = _Context(snapshot, policy, version, known, defaults, pins, models, sources, notes)
    result = _plan_gpu(ctx, rooms, gpu_names) if rooms else _plan_cpu(ctx)
    result.skipped.update(skipped)
    return result


@dataclass
class _Context:
    snapshot: Snapshot
    policy: Policy
    version: Version | None
    known: set[str]
    defaults: dict[str, str]
    pins: dict[str, str]
    models: list[ModelInfo]
    sources: dict[str, str]
    notes: list[str]

    def footprint(self, model: ModelInfo, cand: _Candidate, fa: bool) -> Footprint:
        assert model.geometry is not None
        return fitting.footprint(model.name, model.geometry, model.size, cand.context,
                                 cand.parallel, cand.kv_cache_type, fa, self.policy.num_batch)


def _version_notes(state: OllamaState, version: Version | None) -> list[str]:
    if version is not None:
        return []
    if state.version is None:
        why = "Ollama's version is unknown"
    else:
        why = f"Ollama reports version {state.version!r} (a dev build or not a release)"
    return [f"{why}: only settings every release since 0.6 reads are planned"]


def _select_models(state: OllamaState, policy: Policy, notes: list[str]
                   ) -> tuple[list[ModelInfo], dict[str, str], dict[str, str]]:
    chosen: list[ModelInfo] = []
    sources: dict[str, str] = {}
    skipped: dict[str, str] = {}
    if policy.models:
        candidates: list[ModelInfo] = []
        for name in policy.models:
            info = state.model(name)
            if info is not None:
                sources[info.name] = info.source
            else:
                entry = catalog.lookup(name)
                if entry is None:
                    skipped[name] = "not installed and not in velod's catalog"
                    continue
                info = catalog_model(entry)
                sources[info.name] = "catalog"
                notes.append(f"{name} is not installed: planned with the catalog's geometry "
                             f"and {format_size(info.size)} of weights")
            candidates.append(info)
    else:
        candidates = list(state.models)
        sources = {m.name: m.source for m in candidates}
    for info in candidates:
        if info.name in {m.name for m in chosen}:
            continue
        if info.geometry is None:
            skipped[info.name] = info.skip_reason or "architecture unknown to velod"
        elif info.size <= 0:
            skipped[info.name] = "weight size unknown"
        else:
            chosen.append(info)
    return chosen, sources, skipped


def _valid_pins(pin: dict[str, str], known: set[str], notes: list[str]) -> dict[str, str]:
    """Pins the running version reads, normalised; notes for the others."""
    out: dict[str, str] = {}
    for name, value in pin.items():
        if name in NOT_ENVIRONMENT:
            notes.append(f"pin {name} ignored: Ollama reads no such variable; "
                         f"{NOT_ENVIRONMENT[name]} is a model parameter")
        elif name in SETTINGS and name not in known:
            notes.append(f"pin {name} not written: this Ollama version does not read it")
        else:
            try:
                out[name] = normalize(name, value)
            except ValueError as exc:
                notes.append(f"pin {name}={value!r} kept as written, but Ollama will not "
                             f"accept it: {exc}")
                out[name] = value
    return out


def _is_ollama_process(name: str | None) -> bool:
    text = (name or "").lower()
    return "ollama" in text or "llama-server" in text or "llama_server" in text


def gpu_rooms(snapshot: Snapshot, policy: Policy, pins: dict[str, str], notes: list[str]
              ) -> tuple[list[GpuRoom], dict[int, str | None]]:
    """The GPUs' room for the server (reserve, other programs' memory, margin), by index."""
    rooms: list[GpuRoom] = []
    names: dict[int, str | None] = {}
    pinned_overhead = _int_or(pins.get("OLLAMA_GPU_OVERHEAD"), 0)
    for gpu in snapshot.gpus:
        if not gpu.memory_total:
            notes.append(f"GPU {gpu.index} ({gpu.name or gpu.vendor}) reports no memory size"
                         f"{': ' + gpu.error if gpu.error else ''}; left out of the plan")
            continue
        foreign = sum(p.used_memory or 0 for p in gpu.processes
                      if not _is_ollama_process(p.name))
        held = max(policy.reserve_vram, pinned_overhead, foreign)
        if foreign > max(policy.reserve_vram, pinned_overhead):
            notes.append(f"GPU {gpu.index}: other programs use {format_size(foreign)}, more "
                         "than tuner.reserve_vram; planned around them")
        rooms.append(GpuRoom(gpu.index, gpu.memory_total, held,
                             policy.margin_for(gpu.memory_total)))
        names[gpu.index] = gpu.name
    return rooms, names


def _int_or(text: str | None, fallback: int) -> int:
    try:
        return int(text) if text is not None else fallback
    except ValueError:
        return fallback


# --------------------------------------------------------------------------- candidates


def _candidates(ctx: _Context, pairs: list[tuple[int, int]], kv_types: list[str],
                floor: int) -> list[_Candidate]:
    pins = ctx.pins
    max_ctx = max((m.geometry.context_length for m in ctx.models if m.geometry), default=None)
    if "OLLAMA_CONTEXT_LENGTH" in pins:
        pinned = _int_or(pins["OLLAMA_CONTEXT_LENGTH"], 0) or default_context_length(
            ctx.version, ctx.snapshot.vram_total)
        pairs = [(pinned, p) for _, p in pairs]
    elif max_ctx:
        pairs = [(min(c, max_ctx), p) for c, p in pairs]
    if "OLLAMA_NUM_PARALLEL" in pins:
        pinned_p = max(1, _int_or(pins["OLLAMA_NUM_PARALLEL"], 1))
        pairs = [(c, pinned_p) for c, _ in pairs]
    pairs = list(dict.fromkeys(pairs))
    # At or above the floor, every pair is tried unquantized before any is quantized; below
    # it a quantized cache beats halving the context again.
    upper = [_Candidate(c, p, kv) for kv in kv_types for c, p in pairs if c >= floor]
    lower = [_Candidate(c, p, kv) for c, p in pairs if c < floor for kv in kv_types]
    return upper + lower


def _kv_types(ctx: _Context, fa: bool) -> list[str]:
    pinned = ctx.pins.get("OLLAMA_KV_CACHE_TYPE")
    if pinned in OLLAMA_CACHE_TYPES:
        if pinned != "f16" and not fa:
            ctx.notes.append(f"pinned OLLAMA_KV_CACHE_TYPE={pinned} has no effect without flash "
                             "attention: Ollama keeps an f16 cache")
            return ["f16"]
        return [pinned]
    if not fa or "OLLAMA_KV_CACHE_TYPE" not in ctx.known:
        return ["f16"]
    profile = ctx.policy.profile
    if profile == "long-context":
        return ["q8_0"]
    if profile == "low-memory":
        return ["q8_0", "q4_0"]
    return ["f16", "q8_0"]


def _flash_attention(ctx: _Context) -> tuple[bool, str]:
    pinned = ctx.pins.get("OLLAMA_FLASH_ATTENTION")
    if pinned is not None:
        return pinned == "true", "pinned in config"
    if "OLLAMA_FLASH_ATTENTION" not in ctx.known:
        return False, "this Ollama version has no flash attention setting"
    gpus = [g for g in ctx.snapshot.gpus if g.memory_total]
    unsupported = [g for g in gpus if not gpu_supports_flash_attention(g)]
    if unsupported:
        g = unsupported[0]
        cc = ".".join(map(str, g.compute_capability)) if g.compute_capability else "unknown"
        return False, (f"GPU {g.index} ({g.name or g.vendor}, compute capability {cc}) has no "
                       "flash attention in Ollama (needs CUDA >= 6.0, not 7.2)")
    amd = any(g.vendor == "amd" for g in gpus)
    why = ("Ollama supports it on ROCm" if amd else
           "every GPU supports it (CUDA compute capability >= 6.0, not 7.2)")
    return True, f"{why}: smaller compute buffers, and it allows a quantized KV cache"


# --------------------------------------------------------------------------- GPU plan


def _plan_gpu(ctx: _Context, rooms: list[GpuRoom], gpu_names: dict[int, str | None]) -> Plan:
    policy = ctx.policy
    fa, fa_reason = _flash_attention(ctx)
    kv_types = _kv_types(ctx, fa)
    candidates = _candidates(ctx, GPU_CANDIDATES[policy.profile], kv_types,
                             CONTEXT_FLOOR[policy.profile])
    smallest = min(candidates, key=_Candidate.compactness)

    def fits(models: list[ModelInfo], cand: _Candidate) -> bool:
        return fitting.place([ctx.footprint(m, cand, fa) for m in models], rooms).fits

    probe = _Candidate(min(RESIDENT_MIN_CONTEXT[policy.profile], candidates[0].context),
                       smallest.parallel, smallest.kv_cache_type)
    resident, alone, partial = _groups(ctx, smallest, probe, fits)
    chosen = smallest
    if resident or alone:  # else every model is partly on the CPU: the smallest setting
        chosen = next((c for c in candidates if (not resident or fits(resident, c))
                       and all(fits([m], c) for m in alone)), smallest)
    # A model partly on the CPU runs at the smallest context, with the server's cache type.
    shrunk = _Candidate(smallest.context, smallest.parallel, chosen.kv_cache_type)
    if not ctx.models:
        default_ctx = int(ctx.defaults.get("OLLAMA_CONTEXT_LENGTH", "4096"))
        chosen = _Candidate(min(default_ctx, candidates[0].context), 1, kv_types[0])
        ctx.notes.append("no models to plan for: context and slots follow Ollama's defaults; "
                         "velod plans again when a model is pulled")

    model_plans: dict[str, ModelPlan] = {}
    for m in ctx.models:
        if m in partial:
            model_plans[m.name] = _partial_model(ctx, m, shrunk, fa, rooms)
        else:
            fp = ctx.footprint(m, chosen, fa)
            placed = fitting.place([fp], rooms)
            model_plans[m.name] = _model_plan(ctx, m, chosen, fp, placed.gpus_of[m.name],
                                              fp.layers, placed.fits)

    sizing = resident or _largest(ctx, [m for m in ctx.models if m not in partial], chosen, fa)
    if not sizing and partial:
        sizing = [max(partial, key=lambda m: ctx.footprint(m, shrunk, fa).total)]
    sizing_cand = shrunk if sizing and sizing[0] in partial else chosen
    placement = fitting.place([ctx.footprint(m, sizing_cand, fa) for m in sizing], rooms)
    budgets = [GpuBudget(index=load.room.index, name=gpu_names.get(load.room.index),
                         total=load.room.total, reserve=load.room.held_back,
                         weights=load.weights, kv_cache=load.kv_cache, overhead=load.overhead,
                         margin=load.room.margin, free_after=load.free_after,
                         fits=load.free_after >= 0, models=list(load.models))
               for load in placement.loads]

    _sizing_notes(ctx, resident, alone, partial, sizing, chosen, model_plans)
    squeezed = bool(partial) and not (resident or alone)
    server = _server_gpu(ctx, chosen, fa, fa_reason, resident, sizing, squeezed, rooms)
    params = {name: _model_params(ctx, mp, chosen.context, cpu_only=False)
              for name, mp in model_plans.items()}
    return Plan(version=str(ctx.version) if ctx.version else None, profile=policy.profile,
                cpu_only=False, server=server, model_params=params, budgets=budgets,
                models=model_plans, skipped={}, notes=ctx.notes,
                resident=[m.name for m in resident])


def _groups(ctx: _Context, smallest: _Candidate, probe: _Candidate, fits: Any
            ) -> tuple[list[ModelInfo], list[ModelInfo], list[ModelInfo]]:
    """(resident together, each alone, partly on CPU).

    A model that does not fit alone at the smallest candidate is partly on the CPU. With
    tuner.models, the first model that fits is resident; each next one joins while all fit
    together at ``probe`` (and the prefix is unbroken); the rest must fit alone.
    """
    resident: list[ModelInfo] = []
    alone: list[ModelInfo] = []
    partial: list[ModelInfo] = []
    prefix_open = bool(ctx.policy.models)
    for m in ctx.models:
        if not fits([m], smallest):
            partial.append(m)
            prefix_open = False
        elif prefix_open and (not resident or fits([*resident, m], probe)):
            resident.append(m)
        else:
            prefix_open = False
            alone.append(m)
    return resident, alone, partial


def _largest(ctx: _Context, models: list[ModelInfo], cand: _Candidate, fa: bool
             ) -> list[ModelInfo]:
    if not models:
        return []
    return [max(models, key=lambda m: ctx.footprint(m, cand, fa).total)]


def _model_plan(ctx: _Context, m: ModelInfo, cand: _Candidate, fp: Footprint, gpus: list[int],
                gpu_layers: int, fully: bool) -> ModelPlan:
    return ModelPlan(name=m.name, source=ctx.sources.get(m.name, "installed"),
                     context=fp.context, parallel=cand.parallel,
                     kv_cache_type=cand.kv_cache_type, weights=fp.weights,
                     kv_cache=fp.kv_cache, overhead=fp.overhead, gpus=gpus,
                     gpu_layers=gpu_layers, layers=fp.layers, fully_on_gpu=fully,
                     trained_context=m.geometry.context_length if m.geometry else fp.context)


def _partial_model(ctx: _Context, m: ModelInfo, cand: _Candidate, fa: bool,
                   rooms: list[GpuRoom]) -> ModelPlan:
    fp = ctx.footprint(m, cand, fa)
    layers = fitting.gpu_layers_that_fit(fp, rooms)
    usable = sum(r.usable for r in rooms)
    ctx.notes.append(
        f"{m.name} needs {format_size(fp.total)} even at {fp.context} tokens "
        f"({cand.kv_cache_type} cache), more than the {format_size(usable)} of usable VRAM: "
        f"it runs {layers} of {fp.layers} layers on the GPU and the rest on the CPU (slow)")
    gpus = [r.index for r in rooms] if layers else []
    return _model_plan(ctx, m, cand, fp, gpus, layers, False)


def _sizing_notes(ctx: _Context, resident: list[ModelInfo], alone: list[ModelInfo],
                  partial: list[ModelInfo], sizing: list[ModelInfo], chosen: _Candidate,
                  plans: dict[str, ModelPlan]) -> None:
    if ctx.policy.models and resident:
        names = ", ".join(m.name for m in resident)
        ctx.notes.append(f"tuner.models: {names} stay loaded together, fully on the GPU")
        if alone:
            others = ", ".join(m.name for m in alone)
            ctx.notes.append(f"{others}: do not fit alongside them; sized to fit alone")
    elif sizing and not ctx.policy.models and sizing[0] not in partial:
        ctx.notes.append(f"no tuner.models: sized so each installed model fits alone fully on "
                         f"the GPU; the largest at this setting is {sizing[0].name} "
                         "(Ollama unloads idle models to load another)")
    if any(p.kv_cache_type != "f16" and p.fully_on_gpu for p in plans.values()):
        ctx.notes.append(f"KV cache {chosen.kv_cache_type}: needs flash attention, which the "
                         "plan turns on")


def _server_gpu(ctx: _Context, cand: _Candidate, fa: bool, fa_reason: str,
                resident: list[ModelInfo], sizing: list[ModelInfo], squeezed: bool,
                rooms: list[GpuRoom]) -> dict[str, Recommendation]:
    """Server rows for a GPU machine. ``sizing``: the models the budget is for;
    ``squeezed``: none of them fits, so the smallest setting keeps most layers on the GPU."""
    policy = ctx.policy
    who = ", ".join(m.name for m in sizing) or "the models"
    slots = (f"{cand.parallel} slots" if cand.parallel > 1 else "1 slot")
    profile_why = {
        "balanced": "the largest context of the balanced profile",
        "throughput": "throughput profile: the most slots",
        "long-context": "long-context profile: the largest context",
        "low-memory": "low-memory profile: a small context",
    }[policy.profile]
    kv_why = {
        "f16": "f16: fits without quantizing the cache",
        "q8_0": ("q8_0: long-context profile (half the memory of f16, little quality loss)"
                 if policy.profile in ("long-context", "low-memory")
                 else "q8_0: needed to fit (half the memory of f16, little quality loss)"),
        "q4_0": "q4_0: low-memory profile and q8_0 does not fit",
    }[cand.kv_cache_type]
    max_loaded = (str(len(resident)) if policy.models and resident
                  else ctx.defaults.get("OLLAMA_MAX_LOADED_MODELS", "3"))
    loaded_why = (f"the {len(resident)} model(s) of tuner.models that fit together"
                  if policy.models and resident else
                  "Ollama's default (3 per GPU): it unloads idle models when memory is short")
    margin_mib = max(r.margin for r in rooms) // MIB
    context_why = f"{profile_why} that keeps {who} fully on the GPU ({slots})"
    if squeezed:
        context_why = (f"the smallest context: {who} does not fit the GPU even so; this keeps "
                       "the most layers there (see notes)")
        kv_why = f"{cand.kv_cache_type}: the most compact cache the {policy.profile} profile allows"
    rows = [
        ("OLLAMA_CONTEXT_LENGTH", str(cand.context), context_why),
        ("OLLAMA_NUM_PARALLEL", str(cand.parallel),
         f"{slots} of {cand.context} tokens; the KV cache holds context x slots"),
        ("OLLAMA_FLASH_ATTENTION", "true" if fa else "false", fa_reason),
        ("OLLAMA_KV_CACHE_TYPE", cand.kv_cache_type if fa else "f16",
         kv_why if fa else "f16: quantized caches need flash attention"),
        ("OLLAMA_MAX_LOADED_MODELS", max_loaded, loaded_why),
        ("OLLAMA_KEEP_ALIVE", ctx.defaults.get("OLLAMA_KEEP_ALIVE", "5m"), "Ollama's default"),
        ("OLLAMA_GPU_OVERHEAD", str(policy.reserve_vram),
         f"tuner.reserve_vram ({format_size(policy.reserve_vram)}): Ollama's scheduler "
         "leaves it free too"),
        ("OLLAMA_SCHED_SPREAD", "false",
         "Ollama spreads a model over GPUs only when one cannot hold it"),
        ("LLAMA_ARG_FIT_TARGET", str(margin_mib),
         "velod's margin per GPU in MiB, kept free when the engine fits unset options"),
    ]
    return _recommendations(ctx, rows)


def _recommendations(ctx: _Context, rows: list[tuple[str, str, str]]
                     ) -> dict[str, Recommendation]:
    out: dict[str, Recommendation] = {}
    for name, value, reason in rows:
        if name not in ctx.known:
            continue
        out[name] = Recommendation(name, value, reason, ctx.defaults.get(name))
    for name, value in ctx.pins.items():
        default = ctx.defaults.get(name)
        reason = "pinned in config"
        if name not in SETTINGS:
            reason += " (not in velod's table of Ollama settings; passed through)"
        out[name] = Recommendation(name, value, reason, default, pinned=True)
    return out


def _model_params(ctx: _Context, mp: ModelPlan, plan_context: int, cpu_only: bool
                  ) -> dict[str, Recommendation]:
    """num_ctx, num_gpu, num_thread (for CPU layers), num_batch; defaults are what the model
    gets without a variant (num_ctx: the server's OLLAMA_CONTEXT_LENGTH)."""
    cores = ctx.snapshot.cpu.physical_cores or ctx.snapshot.cpu.threads
    if mp.context == plan_context:
        ctx_why = "the plan's context (OLLAMA_CONTEXT_LENGTH)"
    elif mp.context == mp.trained_context:
        ctx_why = "the model's trained context; Ollama caps num_ctx there"
    else:
        ctx_why = "the smallest context, to keep as much of the model on the GPU as possible"
    params: dict[str, Recommendation] = {}
    params["num_ctx"] = Recommendation("num_ctx", str(mp.context), ctx_why, str(plan_context))
    if cpu_only:
        params["num_gpu"] = Recommendation("num_gpu", "0", "no GPU: all layers on the CPU", "-1")
    elif mp.fully_on_gpu:
        params["num_gpu"] = Recommendation(
            "num_gpu", str(mp.layers), f"all {mp.layers} layers on the GPU; the budget fits",
            "-1")
    else:
        params["num_gpu"] = Recommendation(
            "num_gpu", str(mp.gpu_layers),
            f"{mp.gpu_layers} of {mp.layers} layers fit the GPU; the rest run on the CPU", "-1")
    if (cpu_only or not mp.fully_on_gpu) and cores:
        params["num_thread"] = Recommendation(
            "num_thread", str(cores), "one thread per physical core for CPU layers", None)
    params["num_batch"] = Recommendation("num_batch", str(ctx.policy.num_batch),
                                         "Ollama's default prompt batch", "512")
    return params


# --------------------------------------------------------------------------- CPU plan


def _plan_cpu(ctx: _Context) -> Plan:
    policy = ctx.policy
    memory = ctx.snapshot.memory
    reserve = int(memory.total * policy.ram_headroom_fraction)
    usable = memory.total - reserve
    candidates = _candidates(ctx, CPU_CANDIDATES[policy.profile], ["f16"], 0)
    smallest = min(candidates, key=_Candidate.compactness)

    def need(models: list[ModelInfo], cand: _Candidate) -> int:
        return max((ctx.footprint(m, cand, False).total for m in models), default=0)

    fitting_models = [m for m in ctx.models if need([m], smallest) <= usable]
    chosen = next((c for c in candidates if need(fitting_models, c) <= usable), smallest)
    model_plans: dict[str, ModelPlan] = {}
    for m in ctx.models:
        cand = chosen if m in fitting_models else smallest
        fp = ctx.footprint(m, cand, False)
        model_plans[m.name] = _model_plan(ctx, m, cand, fp, [], 0, False)
        if m not in fitting_models:
            ctx.notes.append(f"{m.name} needs {format_size(fp.total)} even at {fp.context} "
                             f"tokens, more than the {format_size(usable)} of RAM velod counts "
                             "on: Ollama may refuse to load it or swap")
    fp = max((ctx.footprint(m, chosen if m in fitting_models else smallest, False)
              for m in ctx.models), key=lambda f: f.total, default=None)
    ram = RamBudget(total=memory.total, reserve=reserve,
                    weights=fp.weights if fp else 0, kv_cache=fp.kv_cache if fp else 0,
                    overhead=fp.overhead if fp else 0,
                    free_after=usable - (fp.total if fp else 0),
                    fits=(fp.total if fp else 0) <= usable)
    ctx.notes.append(f"no usable GPU: CPU-only plan over {format_size(usable)} of RAM "
                     f"({policy.ram_headroom_fraction:.0%} left to the system)")
    slots = f"{chosen.parallel} slots" if chosen.parallel > 1 else "1 slot"
    rows = [
        ("OLLAMA_CONTEXT_LENGTH", str(chosen.context),
         f"a modest context for CPU inference ({policy.profile} profile)"),
        ("OLLAMA_NUM_PARALLEL", str(chosen.parallel),
         f"{slots}: CPU generation is shared by all slots"),
        ("OLLAMA_MAX_LOADED_MODELS",
         "1" if len(policy.models) == 1 else ctx.defaults.get("OLLAMA_MAX_LOADED_MODELS", "3"),
         "tuner.models names one model: keep only it in RAM" if len(policy.models) == 1
         else "Ollama's default; it unloads idle models when memory is short"),
        ("OLLAMA_KEEP_ALIVE", ctx.defaults.get("OLLAMA_KEEP_ALIVE", "5m"), "Ollama's default"),
    ]
    server = _recommendations(ctx, rows)
    params = {name: _model_params(ctx, mp, chosen.context, cpu_only=True)
              for name, mp in model_plans.items()}
    return Plan(version=str(ctx.version) if ctx.version else None, profile=policy.profile,
                cpu_only=True, server=server, model_params=params, budgets=[],
                models=model_plans, skipped={}, notes=ctx.notes, ram=ram)


# --------------------------------------------------------------------------- what-if


def what_if_snapshot(vram: int, gpus: int, ram: int, compute_capability: tuple[int, int] = (8, 9),
                     cores: int = 8) -> Snapshot:
    """A hypothetical machine: ``gpus`` NVIDIA GPUs of ``vram`` bytes each, ``ram`` of RAM."""
    if vram < 0 or gpus < 0 or ram <= 0:
        raise ValueError("what-if machine needs vram >= 0, gpus >= 0 and ram > 0")
    devices = tuple(Gpu(index=i, vendor="nvidia", name=f"what-if GPU {i}", memory_total=vram,
                        memory_used=0, memory_free=vram, compute_capability=compute_capability)
                    for i in range(gpus if vram else 0))
    return Snapshot(time=0.0, gpus=devices,
                    cpu=Cpu(model=None, physical_cores=cores, threads=cores * 2),
                    memory=Memory(total=ram, available=ram),
                    os=OsInfo(system="Linux", kernel="what-if", arch="x86_64"))


def what_if_state(model_names: list[str], version: str | None = None,
                  installed: OllamaState | None = None) -> OllamaState:
    """Ollama as if only ``model_names`` were installed: each from the installed model's
    own metadata (``/api/show``) when ``installed`` has it, else from velod's catalog; the
    models' ``source`` says which."""
    models: list[ModelInfo] = []
    for name in model_names:
        info = installed.model(name) if installed is not None else None
        if info is not None and info.geometry is not None and info.size > 0:
            models.append(info)
            continue
        entry = catalog.lookup(name)
        if entry is not None:
            models.append(catalog_model(entry))
        elif info is not None:
            models.append(info)  # installed, but not sizeable: its skip_reason says why
        else:
            known = ", ".join(catalog.names())
            models.append(ModelInfo(name=name, digest=None, size=0, geometry=None,
                                    skip_reason=f"not installed and not in velod's catalog "
                                    f"(known: {known})", source="none"))
    return OllamaState(version=version, models=models, loaded=[], reachable=True)


__all__ = ["PROFILES", "GpuBudget", "ModelPlan", "Plan", "Policy", "RamBudget",
           "Recommendation", "plan", "what_if_snapshot", "what_if_state"]
