"""Ollama as a tuner backend: its client, settings and planner behind the Backend seam.

Ollama serves many models and loads them on demand, so what the tuner sees of use is
``/api/ps`` (``expires_at`` moves with every request), what it verifies after a restart is
the first model load (a model planned fully on the GPU must not spill to the CPU), and a
benchmark streams ``/api/generate``, whose last chunk carries Ollama's own counters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from velod.model.names import normalize_name
from velod.tuner import planner
from velod.tuner.backends.base import ServerBadResponse, UnitBackend, Verification
from velod.tuner.backends.ollama import OllamaClient, resolve_url
from velod.tuner.bench.spec import Sample
from velod.tuner.state import OllamaState

if TYPE_CHECKING:
    from velod.config import Config, OllamaConfig, TunerConfig
    from velod.hardware.snapshot import Snapshot
    from velod.tuner.dropin import Effective
    from velod.tuner.plan import Plan


class OllamaBackend(UnitBackend):
    """The Ollama server of ``ollama:`` in the config (see ``backends.base.Backend``), or,
    named otherwise, another server of Ollama's API that velod only measures
    (``velodctl bench --url``)."""

    kind = "ollama"
    history_file = "tuner-history.jsonl"
    variants = True

    unit_key = "service"
    state_type = OllamaState

    def __init__(self, config: OllamaConfig, name: str = "ollama",
                 label: str = "Ollama") -> None:
        self.name, self.label = name, label
        super().__init__(config)

    def _client(self, config: OllamaConfig) -> OllamaClient:
        return OllamaClient(resolve_url(config.url), config.request_timeout)

    def _section(self, config: Config) -> OllamaConfig:
        return config.ollama

    @property
    def ready_timeout(self) -> float:
        """How long Ollama may take to answer again after a restart."""
        return max(2.0, 5 * self.config.request_timeout)

    # ------------------------------------------------------------------ observe
    async def fetch_state(self, tuner: TunerConfig) -> OllamaState:
        return await self.client.fetch_state(skip=(tuner.variant_suffix,))

    def describe(self, state: OllamaState) -> dict[str, Any]:
        return {"installed": len(state.models), "loaded": [m.name for m in state.loaded]}

    def activity(self, state: OllamaState) -> tuple[Any, bool, bool]:
        # Ollama moves a model's expires_at when a request finishes (see IdleTracker).
        return {m.name: m.expires_at for m in state.loaded}, False, bool(state.loaded)

    async def ready(self) -> str:
        return await self.client.version()

    # ------------------------------------------------------------------ plan
    def policy(self, tuner: TunerConfig, effective: Effective | None) -> planner.Policy:
        return planner.Policy.from_config(tuner)

    def plan(self, snapshot: Snapshot, state: Any, policy: planner.Policy) -> Plan:
        return planner.plan(snapshot, state, policy)

    def what_if_state(self, models: list[str], state: Any) -> OllamaState:
        return planner.what_if_state(models, version=state.version, installed=state)

    # ------------------------------------------------------------------ verify
    def expectations(self, plan: Plan) -> dict[str, Any]:
        return {"expect_on_gpu": [m.name for m in plan.models.values() if m.fully_on_gpu]}

    def verify(self, state: Any, expected: dict[str, Any]) -> Verification | None:
        """After the first model load: a model the plan put on the GPU must not spill."""
        loaded = state.loaded
        if not loaded:
            return None
        wanted = {normalize_name(n) for n in expected.get("expect_on_gpu", [])}
        spilling = [m for m in loaded if m.spills_to_cpu and normalize_name(m.name) in wanted]
        observed = [{"name": m.name, "size": m.size, "size_vram": m.size_vram,
                     "context_length": m.context_length} for m in loaded]
        if spilling:
            names = ", ".join(f"{m.name} ({100 * (1 - m.gpu_fraction):.0f}% on CPU)"
                              for m in spilling)
            return Verification(False, f"after the change {names} spilled to the CPU",
                                observed)
        return Verification(True, "loaded models run as planned", observed)

    # ------------------------------------------------------------------ variants
    def installed_names(self) -> set[str]:
        return self.client.tag_names

    async def create_variant(self, variant: str, model: str, params: dict[str, Any]) -> None:
        await self.client.create(variant, model, params)

    # ------------------------------------------------------------------ measure
    async def bench_models(self) -> list[tuple[str, str | None]]:
        tags = await self.client.tags()
        out = []
        for t in tags:
            name = t.get("name") or t.get("model")
            if isinstance(name, str):
                digest = t.get("digest")
                out.append((normalize_name(name), digest if isinstance(digest, str) else None))
        return out

    async def bench_request(self, model: str, prompt: str, gen: int) -> Sample:
        """One streamed ``/api/generate``; figures from Ollama's final chunk."""
        import time

        body = {"model": model, "prompt": prompt,
                "options": {"num_predict": gen, "temperature": 0, "seed": 42}}
        start = time.perf_counter()
        ttft = None
        final: dict[str, Any] | None = None
        async for chunk in self.client.generate_stream(body):
            if ttft is None and chunk.get("response"):
                ttft = time.perf_counter() - start
            if chunk.get("done"):
                final = chunk
        if final is None:
            raise ServerBadResponse("Ollama ended the answer without its final chunk")
        return Sample.from_final(final, ttft, time.perf_counter() - start)

    async def loaded_info(self, model: str) -> dict[str, Any] | None:
        for m in await self.client.loaded():
            if normalize_name(m.name) == normalize_name(model):
                return {"size": m.size, "size_vram": m.size_vram,
                        "context_length": m.context_length,
                        "gpu_percent": round(100 * m.gpu_fraction, 1)}
        return None
