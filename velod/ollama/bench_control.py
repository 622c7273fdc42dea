"""Control methods ``bench.run|list|show|compare``; progress goes out as ``bench.progress``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from velod.blocking import run_blocking
from velod.control.registry import CallContext, Method, RpcError, param
from velod.ollama.bench_service import BenchError
from velod.ollama.bench_store import BenchNotFound, summary
from velod.ollama.benchmark import PROMPTS, BenchSpec, BenchSpecError, compare

if TYPE_CHECKING:
    from velod.ollama.tuner import Tuner


class BenchMethods:
    def __init__(self, tuner: Tuner) -> None:
        self.t = tuner

    @property
    def bench(self) -> Any:
        return self.t.bench

    def methods(self) -> list[Method]:
        return [
            Method("bench.run", self.m_run, admin=True, summary="Benchmark Ollama (model, "
                   "prompts, prompt_tokens, gen, concurrency, repeat, timeout); saves it"),
            Method("bench.list", self.m_list, summary="Saved benchmark results, newest first"),
            Method("bench.show", self.m_show, summary="One saved benchmark result (id)"),
            Method("bench.compare", self.m_compare, summary="Two results per metric: A, B, "
                   "ratio, and whether the difference beats run-to-run spread"),
        ]

    async def m_run(self, params: dict[str, Any], ctx: CallContext) -> Any:
        prompts = param(params, "prompts", (list, str), list(PROMPTS))
        if isinstance(prompts, str):
            prompts = [p for p in prompts.split(",") if p]
        levels = param(params, "concurrency", (list, int), [1])
        levels = [levels] if isinstance(levels, int) else levels
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in levels):
            raise RpcError("invalid_params", "parameter 'concurrency' must be a list of "
                           "integers", {"field": "concurrency"})
        if not all(isinstance(p, str) for p in prompts):
            raise RpcError("invalid_params", f"parameter 'prompts' must name prompts "
                           f"({', '.join(PROMPTS)})", {"field": "prompts"})
        model = param(params, "model", str, None)
        try:
            spec_args = dict(
                prompts=tuple(prompts), concurrency=tuple(levels),
                repeat=param(params, "repeat", int, 3), gen=param(params, "gen", int, 128),
                prompt_tokens=param(params, "prompt_tokens", int, None),
                timeout=float(param(params, "timeout", (int, float), 600.0)))
            BenchSpec(model="check", **spec_args)  # fail on bad fields before asking Ollama
        except BenchSpecError as exc:
            raise RpcError("invalid_params", str(exc)) from None
        if self.bench.running is not None:
            raise RpcError("busy", f"benchmark {self.bench.running['id']} is running; wait "
                           "for it")
        assert self.t.lock is not None
        try:
            async with self.t.lock:  # no tuner restart while measuring
                name, digest = await self.bench.choose_model(model)
                result = await self.bench.run(BenchSpec(model=name, **spec_args), digest)
        except BenchError as exc:
            raise RpcError(exc.code, str(exc), exc.data) from None
        self.t.applier.idle.mark_active()  # a benchmark is use, like any client's
        return result

    async def m_list(self, params: dict[str, Any], ctx: CallContext) -> Any:
        limit = param(params, "limit", int, 50, check=lambda v: None if 1 <= v <= 1000
                      else "must be between 1 and 1000")
        results = await run_blocking(self.bench.store.summaries, limit, timeout=30)
        running = self.bench.running
        return {"results": results, "directory": str(self.bench.store.directory),
                "running": running}

    async def _load(self, ref: str) -> dict[str, Any]:
        try:
            return await run_blocking(self.bench.store.load, ref, timeout=10)
        except BenchNotFound as exc:
            raise RpcError("not_found", str(exc)) from None

    async def m_show(self, params: dict[str, Any], ctx: CallContext) -> Any:
        return await self._load(param(params, "id", str, "last"))

    async def m_compare(self, params: dict[str, Any], ctx: CallContext) -> Any:
        a = await self._load(param(params, "a", str, "last~1"))
        b = await self._load(param(params, "b", str, "last"))
        sa, sb = a.get("server_settings", {}), b.get("server_settings", {})
        changed = {k: [sa.get(k), sb.get(k)] for k in sorted(set(sa) | set(sb))
                   if sa.get(k) != sb.get(k)}
        notes = []
        if (a.get("model") or {}).get("digest") != (b.get("model") or {}).get("digest"):
            notes.append("the two runs measured different models (or model digests)")
        if a.get("spec", {}).get("gen") != b.get("spec", {}).get("gen") or \
                a.get("spec", {}).get("prompt_tokens") != b.get("spec", {}).get("prompt_tokens"):
            notes.append("the two runs used different prompt or generation lengths")
        if (a.get("ollama") or {}).get("version") != (b.get("ollama") or {}).get("version"):
            notes.append("the two runs measured different Ollama versions")
        return {"a": summary(a), "b": summary(b), "rows": compare(a, b),
                "settings_changed": changed, "notes": notes}
