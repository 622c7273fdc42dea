"""The engine's settings: derived once from ``engine:`` in the config, checked once.

:class:`EngineSettings` is everything that decides the model shape, the KV pool and the
scheduler; a change rebuilds the engine. Its checks live in the core types they protect
(:class:`~velod.model.metadata.Geometry`, :class:`~velod.engine.core.scheduler_config.
SchedulerConfig`); ``velod.config`` reports their failures under the config's own key
names by building these settings. Light: no NumPy, so an idle daemon and config
validation never load it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from velod.engine.core.errors import EngineConfigError
from velod.engine.core.scheduler_config import SchedulerConfig
from velod.model import catalog
from velod.model.metadata import Geometry, GeometryError
from velod.units import format_size_exact

CUSTOM = "custom"
# What engine.status says the built-in model is (here, not in synthetic.py, to stay NumPy-free).
SYNTHETIC_KIND = "synthetic attention-path workload (not a language model)"


@dataclass(frozen=True)
class EngineSettings:
    """Everything that decides the pool and the scheduler (a change rebuilds the engine)."""

    geometry: Geometry
    model: str = CUSTOM  # the preset name, or "custom"
    source: str = ""  # where the geometry comes from
    dtype: str = "float16"
    device: str = "auto"
    kv_cache_bytes: int | None = 1024**3
    kv_cache_fraction: float | None = None
    block_size: int = 16
    max_batch_size: int = 64
    max_tokens_per_step: int = 2048
    max_waiting: int = 4096
    # "all": every token's attention, as a real model needs. "last": only rows that are
    # sampled (decode tokens, a prompt's last token); other prompt tokens only write their
    # K/V. A benchmark shortcut for backends without a prefill kernel (see bench/engine.py).
    prefill_attention: str = "all"

    @classmethod
    def from_config(cls, engine: Any) -> EngineSettings:
        """From ``velod.config.EngineConfig``; EngineConfigError naming the engine key."""
        geometry, source = _geometry(engine)
        settings = cls(geometry, engine.model, source, engine.dtype, engine.device,
                       engine.kv_cache.bytes, engine.kv_cache.fraction, engine.block_size,
                       engine.max_batch_size, engine.max_tokens_per_step, engine.max_waiting)
        settings.scheduler_config(num_blocks=2)  # the scheduler's limits, checked now
        return settings

    def scheduler_config(self, num_blocks: int, vocab_size: int | None = None) -> SchedulerConfig:
        """The scheduler's limits for a pool of ``num_blocks``."""
        return SchedulerConfig(num_blocks=num_blocks, block_size=self.block_size,
                               max_batch_size=self.max_batch_size,
                               max_tokens_per_step=self.max_tokens_per_step,
                               max_model_len=self.geometry.context_length,
                               max_waiting=self.max_waiting, vocab_size=vocab_size)

    def geometry_dict(self) -> dict[str, Any]:
        """The attention shape as ``engine.status`` reports it."""
        g = self.geometry
        return {"name": self.model, "layers": g.layers, "heads": g.heads,
                "kv_heads": g.kv_heads, "head_dim": g.head_dim, "max_context": g.context_length,
                "source": self.source}

    @property
    def kv_cache_text(self) -> str:
        if self.kv_cache_bytes is not None:
            return format_size_exact(self.kv_cache_bytes)
        return f"{self.kv_cache_fraction:g} of free memory"


def preset_geometry(name: str) -> tuple[Geometry, str]:
    """The geometry and source of engine preset ``name``; EngineConfigError with a hint."""
    entry = catalog.engine_preset(name)
    if entry is None:
        names = sorted(catalog.ENGINE_PRESETS)
        hint = difflib.get_close_matches(name, names, n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise EngineConfigError("model", name, f"is not a known preset ({', '.join(names)}) "
                                f"or 'custom'{extra}")
    try:
        entry.geometry.head_dim  # noqa: B018 - the kernels need one head size
    except GeometryError as exc:
        raise EngineConfigError("model", name, str(exc)) from None
    return entry.geometry, entry.source


def _geometry(engine: Any) -> tuple[Geometry, str]:
    if engine.model != CUSTOM:
        return preset_geometry(engine.model)
    g = engine.geometry
    if g is None:
        raise EngineConfigError("geometry", None, "required when engine.model is 'custom'")
    try:
        geometry = Geometry.attention_only(g.layers, g.heads, g.kv_heads, g.head_dim,
                                           g.max_context)
    except GeometryError as exc:
        raise EngineConfigError(f"geometry.{_CONFIG_KEYS.get(exc.field, exc.field)}",
                                getattr(g, _CONFIG_KEYS.get(exc.field, exc.field), None),
                                str(exc).split(": ", 1)[-1]) from None
    return geometry, "engine.geometry in the config"


# Geometry field -> engine.geometry key, where they differ.
_CONFIG_KEYS = {"key_length": "head_dim", "value_length": "head_dim",
                "context_length": "max_context", "embedding_length": "head_dim"}
