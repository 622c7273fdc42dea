"""What decides the engine's pool and scheduler, read from the config without NumPy.

The daemon's engine component compares specs on every reload; keeping this module light
means an idle daemon never imports NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from velod.engine.geometry import ModelGeometry, from_engine_config

# What engine.status says the built-in model is (here, not in synthetic.py, to stay NumPy-free).
SYNTHETIC_KIND = "synthetic attention-path workload (not a language model)"


@dataclass(frozen=True)
class EngineSpec:
    """Everything that decides the pool and the scheduler (a change rebuilds the engine)."""

    geometry: ModelGeometry
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
    def from_config(cls, engine: Any) -> EngineSpec:
        """From ``velod.config.EngineConfig``; GeometryError for an unknown preset."""
        return cls(from_engine_config(engine), engine.dtype, engine.device,
                   engine.kv_cache.bytes, engine.kv_cache.fraction, engine.block_size,
                   engine.max_batch_size, engine.max_tokens_per_step, engine.max_waiting)

    @property
    def kv_cache_text(self) -> str:
        if self.kv_cache_bytes is not None:
            from velod.config import format_size_exact

            return format_size_exact(self.kv_cache_bytes)
        return f"{self.kv_cache_fraction:g} of free memory"
