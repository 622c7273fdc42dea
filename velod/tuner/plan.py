"""The planner's output: settings with reasons, memory budgets, and what would change.

Plain data; ``Plan.to_dict()`` gives msgpack/JSON-ready maps. Built by
``velod.tuner.planner.plan``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from velod.tuner.backends.base import SettingsTable
from velod.tuner.backends.ollama_settings import TABLE as OLLAMA_TABLE


@dataclass(frozen=True)
class Recommendation:
    """One setting's planned value, why, the server's default for it, whether it is pinned,
    and, when the server's command line fixes it, why it cannot be applied (``locked``)."""

    name: str
    value: str
    reason: str
    default: str | None
    pinned: bool = False
    locked: str | None = None


@dataclass(frozen=True)
class GpuBudget:
    """Bytes on one GPU: ``free_after = total - reserve - weights - kv - overhead - margin``."""

    index: int
    name: str | None
    total: int
    reserve: int
    weights: int
    kv_cache: int
    overhead: int
    margin: int
    free_after: int
    fits: bool
    models: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RamBudget:
    """The CPU-only counterpart of GpuBudget, over system RAM."""

    total: int
    reserve: int
    weights: int
    kv_cache: int
    overhead: int
    free_after: int
    fits: bool


@dataclass(frozen=True)
class ModelPlan:
    """How one model runs under the plan."""

    name: str
    source: str  # "installed" | "catalog"
    context: int
    parallel: int
    kv_cache_type: str
    weights: int
    kv_cache: int
    overhead: int
    gpus: list[int]
    gpu_layers: int
    layers: int
    fully_on_gpu: bool
    trained_context: int


@dataclass
class Plan:
    """The recommendation: server settings, model parameters, budgets, skipped, notes."""

    version: str | None
    profile: str
    cpu_only: bool
    server: dict[str, Recommendation]
    model_params: dict[str, dict[str, Recommendation]]
    budgets: list[GpuBudget]
    models: dict[str, ModelPlan]
    skipped: dict[str, str]
    notes: list[str]
    resident: list[str] = field(default_factory=list)
    ram: RamBudget | None = None
    table: SettingsTable = OLLAMA_TABLE
    kind: str = "ollama"

    @property
    def fits(self) -> bool:
        """True when every budget fits and every planned model runs fully on its device."""
        budgets_fit = all(b.fits for b in self.budgets) and (self.ram is None or self.ram.fits)
        return budgets_fit and all(m.fully_on_gpu or self.cpu_only for m in self.models.values())

    def changes(self, current: dict[str, str]) -> dict[str, tuple[str | None, str]]:
        """Settings whose planned value differs from ``current`` (the server's environment).

        Effective values compare, so nothing restarts the server for a mere respelling: a
        variable absent from ``current``, or set to the server's own "use the default" value
        (OLLAMA_CONTEXT_LENGTH=0, OLLAMA_MAX_LOADED_MODELS=0, an empty
        OLLAMA_FLASH_ATTENTION), is worth the server's default for this machine; values
        compare normalised ("1" equals "true"). Settings the server's command line fixes
        (``locked``) are not changes: the environment cannot change them. Maps name ->
        (current or None, planned).
        """
        out: dict[str, tuple[str | None, str]] = {}
        for name, rec in self.server.items():
            if rec.locked:
                continue
            now = current.get(name)
            means_default = now is None or self.table.means_default(name, now)
            effective = rec.default if means_default else now
            if effective is None or not self.table.same(name, effective, rec.value):
                out[name] = (now, rec.value)
        return out

    def environment(self) -> dict[str, str]:
        """The variables the server's drop-in should set for this plan (every managed one
        the command line does not fix)."""
        return {name: rec.value for name, rec in self.server.items() if not rec.locked}

    def is_noop(self, current: dict[str, str]) -> bool:
        """True when the server already runs with every planned setting."""
        return not self.changes(current)

    def verdict(self, current: dict[str, str]) -> str:
        """One line for humans: nothing to change, or which settings change and how."""
        changes = self.changes(current)
        if not changes:
            return "nothing to change: the server already runs with every planned setting"
        parts = [f"{name} {now if now is not None else '(unset)'} -> {new}"
                 for name, (now, new) in sorted(changes.items())]
        return f"{len(changes)} setting(s) to change: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (msgpack/JSON)."""
        return {
            "kind": self.kind,
            "version": self.version, "profile": self.profile, "cpu_only": self.cpu_only,
            "fits": self.fits, "resident": list(self.resident),
            "server": {k: asdict(v) for k, v in self.server.items()},
            "model_params": {m: {k: asdict(v) for k, v in p.items()}
                             for m, p in self.model_params.items()},
            "budgets": [asdict(b) for b in self.budgets],
            "ram": asdict(self.ram) if self.ram else None,
            "models": {k: asdict(v) for k, v in self.models.items()},
            "skipped": dict(self.skipped), "notes": list(self.notes),
        }
