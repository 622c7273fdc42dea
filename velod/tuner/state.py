"""Plain data about an inference server: its installed and loaded models, and its state.

A backend's I/O layer parses the server's answers (Ollama: ``/api/tags``, ``/api/show``,
``/api/ps``, ``/api/version``) into these types; the planner reads only these types. A
model's shape is :class:`velod.model.metadata.Geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from velod.model.catalog import CatalogModel
from velod.model.metadata import Geometry
from velod.model.names import normalize_name


@dataclass(frozen=True)
class ModelInfo:
    """An installed model: ``size`` is the bytes of its weights as ``/api/tags`` reports."""

    name: str
    digest: str | None
    size: int
    geometry: Geometry | None
    skip_reason: str | None = None  # why geometry is None (e.g. UnknownArchitecture's text)
    family: str | None = None
    parameter_size: str | None = None  # "8.0B"
    quantization: str | None = None  # "Q4_K_M"
    # Where the shape and size come from: "installed" (the server's own metadata: Ollama's
    # /api/show, a served GGUF's header) or "catalog" (velod's catalog, for what-if plans).
    source: str = "installed"


@dataclass(frozen=True)
class LoadedModel:
    """A model in memory per ``/api/ps``; ``size_vram < size`` means part runs on the CPU."""

    name: str
    size: int
    size_vram: int
    context_length: int | None
    expires_at: str | None = None

    @property
    def spills_to_cpu(self) -> bool:
        return self.size_vram < self.size

    @property
    def gpu_fraction(self) -> float:
        """Share of the loaded model held in VRAM (1.0 = all on the GPU)."""
        return self.size_vram / self.size if self.size else 1.0


@dataclass(frozen=True)
class OllamaState:
    """What velod observed of Ollama at one moment; ``reachable=False`` carries ``error``."""

    version: str | None
    models: list[ModelInfo] = field(default_factory=list)
    loaded: list[LoadedModel] = field(default_factory=list)
    reachable: bool = True
    error: str | None = None

    def model(self, name: str) -> ModelInfo | None:
        """The installed model called ``name`` (``llama3.1:8b``; ``:latest`` may be omitted)."""
        wanted = normalize_name(name)
        return next((m for m in self.models if normalize_name(m.name) == wanted), None)


def catalog_model(entry: CatalogModel, source: str = "catalog") -> ModelInfo:
    """A catalog entry as if ``/api/tags`` and ``/api/show`` had reported it."""
    return ModelInfo(name=entry.name, digest=None, size=entry.size, geometry=entry.geometry,
                     family=entry.family, parameter_size=entry.parameter_size, source=source)
