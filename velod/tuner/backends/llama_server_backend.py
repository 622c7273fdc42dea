"""llama.cpp's llama-server as a tuner backend (see ``backends.base.Backend``).

llama-server holds one model from start to stop. velod observes ``/health``, ``/props``,
``/slots`` and ``/metrics`` (when enabled) and reads the served GGUF's header for the
model's shape (``velod.model.gguf_header``); it plans ``LLAMA_ARG_*`` variables
(``llama_server_planner``) and writes them into the unit's drop-in. A flag on the unit's
``ExecStart=`` line wins over a variable, so those settings are ``locked``: planned around,
shown, never written. After a restart ``/props`` must show the planned slots and context per
slot, else the change is rolled back. A benchmark streams ``/completion``; its last event's
``timings`` give llama-server's own prompt and generation rates.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from velod.blocking import run_blocking
from velod.model import catalog
from velod.model.gguf_header import GgufHeaderError, read_geometry
from velod.model.kv import context_per_sequence
from velod.model.metadata import Geometry, UnknownArchitecture
from velod.tuner.backends.base import ServerBadResponse, UnitBackend, Verification
from velod.tuner.backends.llama_server import LlamaServerClient, LlamaServerState
from velod.tuner.backends.llama_server_planner import AUTO_SLOTS
from velod.tuner.backends.llama_server_planner import plan as plan_llama_server
from velod.tuner.backends.llama_server_settings import (
    PLANNED,
    command_line_settings,
    normalize,
)
from velod.tuner.bench.spec import Sample
from velod.tuner.planner import Policy
from velod.tuner.state import ModelInfo, catalog_model

if TYPE_CHECKING:
    from velod.config import Config, LlamaServerConfig, TunerConfig
    from velod.hardware.snapshot import Snapshot
    from velod.tuner.dropin import Effective
    from velod.tuner.plan import Plan

GGUF_READ_TIMEOUT = 30.0


class LlamaServerBackend(UnitBackend):
    """One ``llama_server`` entry of the config."""

    kind = "llama-server"
    variants = False
    state_type = LlamaServerState

    def __init__(self, config: LlamaServerConfig, name: str) -> None:
        self.name = name
        super().__init__(config)
        self._shapes: dict[tuple[str, int, int], tuple[Geometry | None, str | None]] = {}

    def _client(self, config: LlamaServerConfig) -> LlamaServerClient:
        return LlamaServerClient(config.url, config.request_timeout)

    def _section(self, config: Config) -> LlamaServerConfig | None:
        from velod.config import llama_server_names

        index = {n: i for i, n in llama_server_names(config.llama_server)}.get(self.name)
        return None if index is None else config.llama_server[index]

    @property
    def label(self) -> str:
        return "llama-server" if self.name == "llama-server" else f"llama-server {self.name}"

    @property
    def history_file(self) -> str:
        return f"tuner-history-{self.name}.jsonl"

    @property
    def ready_timeout(self) -> float:
        return float(self.config.start_timeout)

    # ------------------------------------------------------------------ observe
    async def fetch_state(self, tuner: TunerConfig) -> LlamaServerState:
        state = await self.client.fetch_state()
        if state.model_path is None:
            return state
        info = await self._model_info(state.model_path, state.alias)
        return dataclasses.replace(state, models=[info])

    async def _model_info(self, path: str, alias: str | None) -> ModelInfo:
        """The served model: its GGUF's shape and size (read once per file version)."""
        name = alias if alias and alias != path else Path(path).name
        try:
            stat = await run_blocking(os.stat, path, timeout=GGUF_READ_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            return ModelInfo(name=name, digest=None, size=0, geometry=None,
                             skip_reason=f"cannot read the served model {path}: {exc} (velod "
                             "reads its GGUF header to size the cache)")
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._shapes:
            try:
                self._shapes[key] = (await run_blocking(read_geometry, path,
                                                        timeout=GGUF_READ_TIMEOUT), None)
            except (GgufHeaderError, UnknownArchitecture, TimeoutError) as exc:
                self._shapes[key] = (None, str(exc) or "reading the GGUF header timed out")
        geometry, reason = self._shapes[key]
        return ModelInfo(name=name, digest=f"{stat.st_size}-{stat.st_mtime_ns}",
                         size=stat.st_size, geometry=geometry, skip_reason=reason,
                         family=geometry.architecture if geometry else None)

    def describe(self, state: LlamaServerState) -> dict[str, Any]:
        return {"model": state.model_path, "slots": state.total_slots,
                "slot_context": state.slot_context, "busy": state.busy,
                "metrics": state.metrics is not None}

    def activity(self, state: LlamaServerState) -> tuple[Any, bool, bool]:
        return state.activity_marker(), state.busy, True

    async def ready(self) -> str:
        await self.client.health()
        props = await self.client.props()
        return str(props.get("build_info") or "unknown build")

    # ------------------------------------------------------------------ plan
    def policy(self, tuner: TunerConfig, effective: Effective | None) -> Policy:
        locked: dict[str, tuple[str, str]] = {}
        notes: list[str] = []
        argv = effective.exec_start if effective is not None else []
        if argv and "llama-server" not in Path(argv[0]).name:
            # A wrapper (a shell, a script): the flags it passes cannot be read here, so
            # only /props after a restart tells what runs.
            notes.append(f"ExecStart= of {self.unit} runs {argv[0]}, not llama-server: "
                         "velod cannot see which flags it passes; a flag there that "
                         "overrides a planned setting is found after the restart (/props) "
                         "and rolled back")
            argv = []
        if argv:
            for name, fixed in command_line_settings(argv).items():
                if name in PLANNED or name in self.config.pin or name == \
                        "LLAMA_ARG_KV_UNIFIED":
                    locked[name] = (fixed.value, f"`{fixed.written}` on the ExecStart= line "
                                    f"of {self.unit} overrides {name}")
        return Policy(profile=tuner.profile, reserve_vram=int(tuner.reserve_vram),
                      pin=dict(self.config.pin), locked=locked, notes=tuple(notes))

    def plan(self, snapshot: Snapshot, state: Any, policy: Policy) -> Plan:
        return plan_llama_server(snapshot, state, policy)

    def what_if_state(self, models: list[str], state: Any) -> LlamaServerState:
        """The served model when a name names it, else the catalog's (not installed)."""
        infos: list[ModelInfo] = []
        for name in models:
            served = state.model(name) if isinstance(state, LlamaServerState) else None
            if served is not None and served.geometry is not None:
                infos.append(served)
                continue
            entry = catalog.lookup(name)
            if entry is not None:
                infos.append(catalog_model(entry))
            else:
                known = ", ".join(catalog.names())
                infos.append(ModelInfo(name=name, digest=None, size=0, geometry=None,
                                       skip_reason=f"not the served model and not in velod's "
                                       f"catalog (known: {known})", source="none"))
        return LlamaServerState(version=state.version, models=infos)

    # ------------------------------------------------------------------ verify
    def expectations(self, plan: Plan) -> dict[str, Any]:
        """Slots and context per slot the restarted server must report in ``/props``."""
        env = {n: r.value for n, r in plan.server.items()}
        model = next(iter(plan.models.values()), None)
        try:
            slots = int(normalize("LLAMA_ARG_N_PARALLEL", env.get("LLAMA_ARG_N_PARALLEL",
                                                                   "-1")))
            total = int(normalize("LLAMA_ARG_CTX_SIZE", env.get("LLAMA_ARG_CTX_SIZE", "0")))
            unified = normalize("LLAMA_ARG_KV_UNIFIED", env["LLAMA_ARG_KV_UNIFIED"]) == "true" \
                if "LLAMA_ARG_KV_UNIFIED" in env else slots == -1
        except ValueError:
            return {}
        slots = AUTO_SLOTS if slots == -1 else slots
        if total == 0:
            per_slot = model.trained_context if model else None
        else:
            per_slot = context_per_sequence(total, slots, unified)
        return {"slots": slots, "slot_context": per_slot}

    def verify(self, state: Any, expected: dict[str, Any]) -> Verification | None:
        """``/props`` after the restart: the planned slot count and context per slot."""
        if not isinstance(state, LlamaServerState) or state.total_slots is None:
            return None
        observed = {"total_slots": state.total_slots, "slot_context": state.slot_context,
                    "model": state.model_path}
        wrong = []
        if expected.get("slots") is not None and state.total_slots != expected["slots"]:
            wrong.append(f"{state.total_slots} slots, not {expected['slots']}")
        want = expected.get("slot_context")
        if want is not None and state.slot_context != want:
            wrong.append(f"{state.slot_context} tokens per slot, not {want}")
        if wrong:
            return Verification(False, f"after the restart {self.label} runs "
                                + " and ".join(wrong), observed)
        return Verification(True, f"{self.label} runs {state.total_slots} slot(s) of "
                            f"{state.slot_context} tokens as planned", observed)

    # ------------------------------------------------------------------ variants
    def installed_names(self) -> set[str]:
        return set()

    async def create_variant(self, variant: str, model: str, params: dict[str, Any]) -> None:
        raise ServerBadResponse("llama-server has no model variants")

    # ------------------------------------------------------------------ measure
    async def bench_models(self) -> list[tuple[str, str | None]]:
        state = await self.fetch_state_quick()
        return [(m.name, m.digest) for m in state.models]

    async def fetch_state_quick(self) -> LlamaServerState:
        props = await self.client.props()
        path, alias = props.get("model_path"), props.get("model_alias")
        if not isinstance(path, str) or not path:
            raise ServerBadResponse(f"{self.label} /props names no model_path")
        info = await self._model_info(path, alias if isinstance(alias, str) else None)
        return LlamaServerState(version=str(props.get("build_info") or ""), models=[info],
                                model_path=path, alias=alias if isinstance(alias, str) else None)

    async def bench_request(self, model: str, prompt: str, gen: int) -> Sample:
        """One streamed ``/completion`` of ``gen`` tokens, greedy, without the prompt cache;
        generation and prompt figures from llama-server's own ``timings``."""
        body = {"prompt": prompt, "n_predict": gen, "temperature": 0, "seed": 42,
                "cache_prompt": False, "ignore_eos": True}
        start = time.perf_counter()
        ttft = None
        timings: dict[str, Any] | None = None
        async for event in self.client.completion_stream(body):
            if ttft is None and (event.get("content") or event.get("tokens")):
                ttft = time.perf_counter() - start
            if event.get("stop") is True:
                timings = event.get("timings") if isinstance(event.get("timings"), dict) \
                    else None
        if timings is None:
            raise ServerBadResponse(f"{self.label} ended the answer without its timings")
        return sample_from_timings(timings, ttft, time.perf_counter() - start)

    async def loaded_info(self, model: str) -> dict[str, Any] | None:
        props = await self.client.props()
        settings = props.get("default_generation_settings")
        return {"slots": props.get("total_slots"),
                "context_length": settings.get("n_ctx") if isinstance(settings, dict) else None,
                "model_path": props.get("model_path")}


def sample_from_timings(timings: dict[str, Any], ttft: float | None, total: float) -> Sample:
    """A benchmark sample from llama-server's ``timings`` (milliseconds)."""
    def number(key: str) -> float:
        value = timings.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
            else 0.0

    return Sample(ttft_s=ttft, total_s=total, eval_count=int(number("predicted_n")),
                  eval_s=number("predicted_ms") / 1000, prompt_count=int(number("prompt_n")),
                  prompt_s=number("prompt_ms") / 1000, load_s=0.0)
