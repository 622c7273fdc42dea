"""Control methods of the tuner: ``ollama.status``, ``tuner.*`` and ``bench.*``.

Each function reads and checks its params, then calls one verb of
:class:`~velod.tuner.servers.TunerService`, which routes it to one managed server's
:class:`~velod.tuner.service.Tuner` (``server``: its name, as ``velodctl --server`` gives it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from velod.control.registry import CallContext, RpcError, param, rpc
from velod.tuner import planner
from velod.tuner.bench.spec import PROMPTS, BenchSpec, BenchSpecError
from velod.units import parse_size

if TYPE_CHECKING:
    from velod.tuner.servers import TunerService as Tuner

BACKENDS = ("ollama", "llama-server")


@rpc("ollama.status", summary="Is Ollama reachable; version; loaded models with CPU/GPU "
     "split and context")
async def ollama_status(tuner: Tuner, params: dict[str, Any], ctx: CallContext) -> Any:
    return await tuner.ollama_status()


@rpc("tuner.show", summary="Current vs recommended settings with reasons, and the memory "
     "budget")
async def show(tuner: Tuner, params: dict[str, Any], ctx: CallContext) -> Any:
    return await tuner.show(server=_server(params))


@rpc("tuner.plan", summary="Plan for this machine or a what-if one (vram, gpus, ram, models, "
     "profile, server)")
async def plan(tuner: Tuner, params: dict[str, Any], ctx: CallContext) -> Any:
    models = param(params, "models", list, None)
    if models is not None and not all(isinstance(m, str) and m for m in models):
        raise RpcError("invalid_params", "parameter 'models' must be a list of model names",
                       {"field": "models"})
    return await tuner.what_if(
        server=_server(params), vram=_size_param(params, "vram"), ram=_size_param(params, "ram"),
        gpus=param(params, "gpus", int, None, check=lambda v: None if 0 <= v <= 64
                   else "must be between 0 and 64"),
        models=models,
        profile=param(params, "profile", str, None, check=lambda v: None
                      if v in planner.PROFILES else f"must be one of "
                      f"{', '.join(planner.PROFILES)}"))


@rpc("tuner.apply", admin=True, summary="Apply the current plan now (now: also while busy or "
     "rate-limited; server: which one)")
async def apply(tuner: Tuner, params: dict[str, Any], ctx: CallContext) -> Any:
    return await tuner.apply(now=param(params, "now", bool, False), server=_server(params))


@rpc("tuner.rollback", admin=True, summary="Restore the previous drop-in and restart the "
     "server (server: which one)")
async def rollback(tuner: Tuner, params: dict[str, Any], ctx: CallContext) -> Any:
    return await tuner.rollback(server=_server(params))


@rpc("tuner.history", summary="The last decisions (limit; server: one server's only)")
async def history(tuner: Tuner, params: dict[str, Any], ctx: CallContext) -> Any:
    return await tuner.decisions(_limit(params, 20), server=_server(params))


@rpc("bench.run", admin=True, summary="Benchmark a server (backend or server, model, prompts, "
     "prompt_tokens, gen, concurrency, repeat, timeout); saves it")
async def bench_run(tuner: Tuner, params: dict[str, Any], ctx: CallContext) -> Any:
    prompts = param(params, "prompts", (list, str), list(PROMPTS))
    if isinstance(prompts, str):
        prompts = [p for p in prompts.split(",") if p]
    levels = param(params, "concurrency", (list, int), [1])
    levels = [levels] if isinstance(levels, int) else levels
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in levels):
        raise RpcError("invalid_params", "parameter 'concurrency' must be a list of integers",
                       {"field": "concurrency"})
    if not all(isinstance(p, str) for p in prompts):
        raise RpcError("invalid_params", f"parameter 'prompts' must name prompts "
                       f"({', '.join(PROMPTS)})", {"field": "prompts"})
    spec = dict(prompts=tuple(prompts), concurrency=tuple(levels),
                repeat=param(params, "repeat", int, 3), gen=param(params, "gen", int, 128),
                prompt_tokens=param(params, "prompt_tokens", int, None),
                timeout=float(param(params, "timeout", (int, float), 600.0)))
    try:
        BenchSpec(model="check", **spec)  # fail on bad fields before asking Ollama
    except BenchSpecError as exc:
        raise RpcError("invalid_params", str(exc)) from None
    backend = param(params, "backend", str, None, check=lambda v: None if v in BACKENDS
                    else f"must be one of {', '.join(BACKENDS)}")
    url = param(params, "url", str, None, check=lambda v: None if v.startswith(
        ("http://", "https://")) else "must be an http:// or https:// URL")
    return await tuner.bench_run(param(params, "model", str, None), server=_server(params),
                                 backend=backend, url=url, **spec)


@rpc("bench.list", summary="Saved benchmark results, newest first")
async def bench_list(tuner: Tuner, params: dict[str, Any], ctx: CallContext) -> Any:
    return await tuner.bench_list(_limit(params, 50))


@rpc("bench.show", summary="One saved benchmark result (id)")
async def bench_show(tuner: Tuner, params: dict[str, Any], ctx: CallContext) -> Any:
    return await tuner.bench_show(param(params, "id", str, "last"))


@rpc("bench.compare", summary="Two results per metric: A, B, ratio, and whether the "
     "difference beats run-to-run spread")
async def bench_compare(tuner: Tuner, params: dict[str, Any], ctx: CallContext) -> Any:
    return await tuner.bench_compare(param(params, "a", str, "last~1"),
                                     param(params, "b", str, "last"))


def _server(params: dict[str, Any]) -> str | None:
    return param(params, "server", str, None, check=lambda v: None if v else "must not be empty")


def _limit(params: dict[str, Any], default: int) -> int:
    return param(params, "limit", int, default, check=lambda v: None if 1 <= v <= 1000
                 else "must be between 1 and 1000")


def _size_param(params: dict[str, Any], key: str) -> int | None:
    value = param(params, key, (int, str), None)
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise RpcError("invalid_params", f"parameter '{key}': {exc}", {"field": key}) from None
