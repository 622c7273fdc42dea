"""The engine's settings: derived once from ``engine:`` in the config, checked once.

:class:`EngineSettings` is everything that decides the model shape, the KV pool and the
scheduler; a change rebuilds the engine. Its checks live in the core types they protect
(:class:`~velod.model.metadata.Geometry`, :class:`~velod.engine.core.scheduler_config.
SchedulerConfig`); ``velod.config`` reports their failures under the config's own key
names by building these settings. Light: no NumPy and no file access, so an idle daemon
and config validation never load it.

``engine.model`` names either a synthetic preset (an attention shape from the catalog, for
kernel benchmarks: :data:`~velod.model.catalog.ENGINE_PRESETS`), ``custom`` (the shape in
``engine.geometry``), or a language model: an Ollama name (``gemma3:270m``) or a path to a
``.gguf``. A model's geometry is read when it is loaded (``with_model``), never here.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from velod.engine.core.errors import EngineConfigError
from velod.engine.core.scheduler_config import SchedulerConfig
from velod.model import catalog
from velod.model.metadata import Geometry, GeometryError
from velod.units import format_size_exact

CUSTOM = "custom"
# A name this close to a preset (difflib ratio) is taken as a typo of it, not an Ollama name.
TYPO_RATIO = 0.9
# What engine.status says the built-in model is (here, not in synthetic.py, to stay NumPy-free).
SYNTHETIC_KIND = "synthetic attention-path workload (not a language model)"


@dataclass(frozen=True)
class EngineSettings:
    """Everything that decides the pool and the scheduler (a change rebuilds the engine).

    ``geometry`` is None for a language model until it is loaded (:meth:`with_model`).
    """

    geometry: Geometry | None
    model: str = CUSTOM  # the preset name, "custom", or the model's Ollama name / path
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
    language_model: bool = False  # ``model`` is a GGUF (an Ollama name or a path)

    @classmethod
    def from_config(cls, engine: Any) -> EngineSettings:
        """From ``velod.config.EngineConfig``; EngineConfigError naming the engine key."""
        language = is_model_reference(engine.model)
        geometry, source = (None, "") if language else _geometry(engine)
        settings = cls(geometry, engine.model, source, engine.dtype, engine.device,
                       engine.kv_cache.bytes, engine.kv_cache.fraction, engine.block_size,
                       engine.max_batch_size, engine.max_tokens_per_step, engine.max_waiting,
                       language_model=language)
        # The scheduler's limits, checked now (a model's context is known once loaded).
        SchedulerConfig(num_blocks=2, block_size=settings.block_size,
                        max_batch_size=settings.max_batch_size,
                        max_tokens_per_step=settings.max_tokens_per_step,
                        max_model_len=geometry.context_length if geometry else 2,
                        max_waiting=settings.max_waiting)
        return settings

    def with_model(self, geometry: Geometry, source: str) -> EngineSettings:
        """These settings with a loaded model's geometry (and where it was read)."""
        return dataclasses.replace(self, geometry=geometry, source=source)

    @property
    def shape(self) -> Geometry:
        """The geometry; EngineConfigError when the model is not loaded yet."""
        if self.geometry is None:
            raise EngineConfigError("model", self.model, "is not loaded yet: its shape is "
                                    "read from the file when the engine starts")
        return self.geometry

    @property
    def window_pool(self) -> bool:
        """Whether the KV cache keeps a second pool for sliding-window layers: a language
        model (the synthetic one attends everything) with both kinds of layers."""
        g = self.geometry
        return self.language_model and g is not None and 0 < g.windowed_layers < g.layers

    def scheduler_config(self, num_blocks: int, vocab_size: int | None = None,
                         window_blocks: int = 0) -> SchedulerConfig:
        """The scheduler's limits for a pool of ``num_blocks`` (and ``window_blocks`` in the
        window pool, when there is one)."""
        g = self.shape
        return SchedulerConfig(num_blocks=num_blocks, block_size=self.block_size,
                               max_batch_size=self.max_batch_size,
                               max_tokens_per_step=self.max_tokens_per_step,
                               max_model_len=g.context_length,
                               max_waiting=self.max_waiting, vocab_size=vocab_size,
                               window=g.sliding_window if self.window_pool else None,
                               window_blocks=window_blocks if self.window_pool else 0)

    def geometry_dict(self) -> dict[str, Any]:
        """The attention shape as ``engine.status`` reports it."""
        g = self.geometry
        if g is None:
            return {"name": self.model, "source": "read from the model when it is loaded"}
        return {"name": self.model, "layers": g.layers, "heads": g.heads,
                "kv_heads": g.kv_heads, "head_dim": g.head_dim, "max_context": g.context_length,
                "sliding_window": g.sliding_window or None,
                "windowed_layers": g.windowed_layers, "source": self.source}

    @property
    def kv_cache_text(self) -> str:
        if self.kv_cache_bytes is not None:
            return format_size_exact(self.kv_cache_bytes)
        return f"{self.kv_cache_fraction:g} of free memory"


def is_model_reference(name: str) -> bool:
    """True when ``engine.model`` names a language model (an Ollama name or a .gguf path)
    rather than a synthetic preset or ``custom``; EngineConfigError for a name that is
    neither (bad syntax, or a near miss of a preset: a typo)."""
    from velod.model.store import looks_like_path, parse_name

    if name == CUSTOM or catalog.engine_preset(name) is not None:
        return False
    if looks_like_path(name):
        return True
    names = sorted(catalog.ENGINE_PRESETS)
    close = difflib.get_close_matches(name, names, n=1, cutoff=TYPO_RATIO)
    if close:
        raise EngineConfigError("model", name, f"is not a known preset ({', '.join(names)}), "
                                f"'custom', an Ollama model name or a .gguf path; did you "
                                f"mean {close[0]!r}?")
    try:
        parse_name(name)
    except ValueError as exc:
        raise EngineConfigError("model", name, f"is not a preset, 'custom', a .gguf path or "
                                f"an Ollama model name: {exc}") from None
    return True


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
