"""Control methods of the engine: ``engine.status|submit|abort|bench|load|unload|generate``.

Each function reads and checks its params, then calls one verb of
:class:`~velod.engine.service.EngineService`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from velod.control.registry import CallContext, RpcError, param, rpc
from velod.engine.generation import GenerationResult

if TYPE_CHECKING:
    from velod.engine.generation import GenerationRequest
    from velod.engine.runtime.workload import Workload
    from velod.engine.service import EngineService

MAX_BENCH_REQUESTS = 4096
MAX_VERIFY = 32


@rpc("engine.status", summary="Backend, geometry, pool, queue, tokens/s, step time, "
     "preemptions, prefix-cache hits")
async def status(engine: EngineService, params: dict[str, Any], ctx: CallContext) -> Any:
    return engine.report()


@rpc("engine.submit", admin=True, summary="Queue a request (prompt token ids or "
     "prompt_length, max_new_tokens, priority) -> id")
async def submit(engine: EngineService, params: dict[str, Any], ctx: CallContext) -> Any:
    prompt = _read_prompt(params)
    max_new = param(params, "max_new_tokens", int,
                    check=lambda v: None if v >= 1 else "must be at least 1")
    return await engine.submit(prompt, max_new, priority=param(params, "priority", int, 0),
                               seed=param(params, "seed", int, 0))


@rpc("engine.abort", admin=True, summary="Abort a request (id) or everything (all: true)")
async def abort(engine: EngineService, params: dict[str, Any], ctx: CallContext) -> Any:
    everything = param(params, "all", bool, False)
    return await engine.abort(None if everything else param(params, "id", int))


@rpc("engine.bench", admin=True, summary="Run a workload (requests, prompt, gen, "
     "shared_prefix, priority, verify) and report")
async def bench(engine: EngineService, params: dict[str, Any], ctx: CallContext) -> Any:
    return await engine.run_bench(_read_workload(params))


def _read_prompt(params: dict[str, Any]) -> list[int] | int:
    has_ids = params.get("prompt") is not None
    has_length = params.get("prompt_length") is not None
    if has_ids == has_length:
        raise RpcError("invalid_params", "give exactly one of 'prompt' (token ids) or "
                       "'prompt_length'", {"field": "prompt"})
    if has_length:
        return param(params, "prompt_length", int,
                     check=lambda v: None if v >= 1 else "must be at least 1")
    prompt = param(params, "prompt", list,
                   check=lambda v: None if v else "must hold at least one token id")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        raise RpcError("invalid_params", "parameter 'prompt' must be a list of integer token "
                       "ids", {"field": "prompt"})
    return prompt


def _read_workload(params: dict[str, Any]) -> Workload:
    from velod.engine.runtime.workload import Workload

    def at_least(n: int) -> Any:
        return lambda v: None if v >= n else f"must be at least {n}"

    requests = param(params, "requests", int, 64, check=lambda v: None if 1 <= v <=
                     MAX_BENCH_REQUESTS else f"must be in [1, {MAX_BENCH_REQUESTS}]")
    shared = param(params, "shared_prefix", float, 0.0,
                   check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)")
    verify = param(params, "verify", int, 0, check=lambda v: None if 0 <= v <= MAX_VERIFY
                   else f"must be in [0, {MAX_VERIFY}]")
    return Workload(requests=requests, prompt=param(params, "prompt", int, 512, check=at_least(1)),
                    gen=param(params, "gen", int, 128, check=at_least(1)), shared_prefix=shared,
                    priority=param(params, "priority", bool, False), verify=verify,
                    seed=param(params, "seed", int, 0))


@rpc("engine.load", admin=True, summary="Load a language model (model: an Ollama name or a "
     "GGUF path; chat_template) -> what it is")
async def load(engine: EngineService, params: dict[str, Any], ctx: CallContext) -> Any:
    return await engine.load(param(params, "model", str, check=_non_empty),
                             param(params, "chat_template", str, None))


@rpc("engine.unload", admin=True, summary="Unload the language model and free its KV pool")
async def unload(engine: EngineService, params: dict[str, Any], ctx: CallContext) -> Any:
    return await engine.unload()


@rpc("engine.generate", admin=True, summary="Generate text (prompt, messages or token_ids; "
     "model, options, chat_template); streams engine.token, replies with text, tokens, counts, "
     "timings and finish reason")
async def generate(engine: EngineService, params: dict[str, Any], ctx: CallContext) -> Any:
    request = _read_generation(params)
    stream = param(params, "stream", bool, True)
    async with contextlib.aclosing(engine.generate(request, load=True)) as events:
        async for event in events:
            if isinstance(event, GenerationResult):
                return {"done": True, **event.to_dict()}
            if stream and event.text and not ctx.notify("engine.token", [
                    {"text": event.text, "token": event.token, "logprob": event.logprob}]):
                # The caller is gone or does not read: closing the events aborts the request.
                raise RpcError("unavailable", "the client stopped reading the token stream")
    raise RpcError("internal", "the generation ended without a result")


def _non_empty(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def _read_generation(params: dict[str, Any]) -> GenerationRequest:
    """A GenerationRequest from engine.generate's params; invalid_params naming the field."""
    from velod.engine.core.errors import InvalidRequest
    from velod.engine.generation import GenerationRequest
    from velod.engine.models.sampling import SamplingParams

    options = param(params, "options", dict, {})
    try:
        sampling = SamplingParams.from_options(options)
        return GenerationRequest(
            prompt=param(params, "prompt", str, None),
            messages=param(params, "messages", list, None),
            token_ids=param(params, "token_ids", list, None),
            model=param(params, "model", str, None),
            sampling=sampling, chat_template=param(params, "chat_template", str, None),
            priority=param(params, "priority", int, 0))
    except InvalidRequest as exc:
        raise RpcError("invalid_params", str(exc), {"field": exc.field}) from None
    except TypeError as exc:  # a value of the wrong kind inside options
        raise RpcError("invalid_params", f"options: {exc}", {"field": "options"}) from None
