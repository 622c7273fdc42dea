"""The tuner's control methods: ``ollama.status`` and ``tuner.show|plan|apply|rollback|history``.

Handlers read the :class:`~velod.ollama.tuner.Tuner`'s state and call its actions; the
loop, the decisions and the status live in ``tuner.py``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from velod.blocking import run_blocking
from velod.control.registry import CallContext, Method, RpcError, param
from velod.ollama import planner
from velod.ollama.applier import server_environment
from velod.ollama.dropin import DropinError, Effective
from velod.ollama.tuner import env_key, plain
from velod.units import parse_size

if TYPE_CHECKING:
    from velod.ollama.tuner import Tuner


class TunerMethods:
    """The handlers, bound to one tuner."""

    def __init__(self, tuner: Tuner) -> None:
        self.t = tuner

    def methods(self) -> list[Method]:
        return [
            Method("ollama.status", self.m_ollama_status, summary="Is Ollama reachable; "
                   "version; loaded models with CPU/GPU split and context"),
            Method("tuner.show", self.m_show, summary="Current vs recommended settings with "
                   "reasons, and the memory budget"),
            Method("tuner.plan", self.m_plan, summary="Plan for this machine or a what-if one "
                   "(vram, gpus, ram, models, profile)"),
            Method("tuner.apply", self.m_apply, admin=True, summary="Apply the current plan "
                   "now (now: also while busy or rate-limited)"),
            Method("tuner.rollback", self.m_rollback, admin=True,
                   summary="Restore the previous drop-in and restart Ollama"),
            Method("tuner.history", self.m_history, summary="The last decisions (limit)"),
        ]

    async def m_ollama_status(self, params: dict[str, Any], ctx: CallContext) -> Any:
        if self.t.last_poll is None:
            await self._locked(self.t.poll)
        state = self.t.ollama
        loaded = [{"name": m.name, "size": m.size, "size_vram": m.size_vram,
                   "gpu_percent": round(100 * m.gpu_fraction, 1),
                   "cpu_percent": round(100 * (1 - m.gpu_fraction), 1),
                   "spills_to_cpu": m.spills_to_cpu, "context_length": m.context_length,
                   "expires_at": m.expires_at} for m in (state.loaded if state else [])]
        return {"url": self.t.client.base_url, "reachable": self.t.reachable(),
                "version": state.version if state else None, "error": self.t.ollama_error,
                "failures": self.t.failures, "last_ok": self.t.last_ok,
                "last_poll": self.t.last_poll,
                "stale": bool(self.t.failures and state),
                "models": [m.name for m in state.models] if state else [], "loaded": loaded,
                "idle_for": round(self.t.applier.idle.idle_for(), 1)}

    async def _locked(self, fn: Any) -> Any:
        assert self.t.lock is not None
        async with self.t.lock:
            return await fn()

    async def m_show(self, params: dict[str, Any], ctx: CallContext) -> Any:
        if not self.t.config.tuner.enabled:
            raise RpcError("unavailable", "the tuner is disabled (tuner.enabled: false)")
        if self.t.snapshot is None:
            raise RpcError("unavailable", "no hardware snapshot yet (is the hardware monitor "
                           "enabled?); try again in a few seconds")
        plan = self.t.plan or await self._locked(self.t.replan)
        eff = self.t.effective or Effective({}, {}, {})
        changes = plan.changes(eff.environment)
        rows = []
        for name, rec in plan.server.items():
            current = eff.environment.get(name)
            rows.append({"name": name, "current": current, "source": eff.sources.get(name),
                         "default": rec.default, "recommended": rec.value, "reason": rec.reason,
                         "pinned": rec.pinned, "change": name in changes})
        return {"mode": self.t.config.tuner.mode, "profile": plan.profile,
                "ollama": {"reachable": self.t.reachable(), "version": plan.version,
                           "error": self.t.ollama_error},
                "settings": rows, "changes": plain(changes), "up_to_date": not changes,
                "conflicts": [c.to_dict() | {"message": c.describe()} for c in eff.conflicts],
                "dropin": str(self.t.applier.dropins.path), "dropin_errors": eff.errors,
                "unit_found": self._unit_found(), "service": self.t.config.ollama.service,
                "systemd_dir": self.t.config.ollama.systemd_dir,
                "pending": self.t.pending_dict(),
                "blocked": ({"decision": self.t.blocked["decision"],
                             "message": self.t.blocked["message"]} if self.t.blocked else None),
                "plan": plan.to_dict()}

    def _unit_found(self) -> bool:
        dropins = self.t.applier.dropins
        return dropins.unit_file.exists() or dropins.directory.exists()

    async def m_plan(self, params: dict[str, Any], ctx: CallContext) -> Any:
        if self.t.snapshot is None and not any(k in params for k in ("vram", "gpus", "ram")):
            raise RpcError("unavailable", "no hardware snapshot yet; give vram/gpus/ram to "
                           "plan for another machine")
        vram = _size_param(params, "vram")
        ram = _size_param(params, "ram")
        gpus = param(params, "gpus", int, None, check=lambda v: None if 0 <= v <= 64
                     else "must be between 0 and 64")
        models = param(params, "models", list, None)
        if models is not None and not all(isinstance(m, str) and m for m in models):
            raise RpcError("invalid_params", "parameter 'models' must be a list of model names",
                           {"field": "models"})
        profile = param(params, "profile", str, self.t.config.tuner.profile,
                        check=lambda v: None if v in planner.PROFILES
                        else f"must be one of {', '.join(planner.PROFILES)}")
        snapshot = self.t.snapshot
        if vram is not None or gpus is not None or ram is not None:
            here = self.t.snapshot
            count = gpus if gpus is not None else (len(here.gpus) if here and here.gpus else 1)
            size = vram if vram is not None else (
                max((g.memory_total or 0) for g in here.gpus) if here and here.gpus else 0)
            memory = ram if ram is not None else (here.memory.total if here else 64 * 1024**3)
            try:
                snapshot = planner.what_if_snapshot(size, count, memory)
            except ValueError as exc:
                raise RpcError("invalid_params", str(exc)) from None
        state = self.t.planning_state()
        if models is not None:
            state = planner.what_if_state(models, version=state.version)
        policy = dataclasses.replace(planner.Policy.from_config(self.t.config.tuner),
                                     profile=profile)
        assert snapshot is not None
        result = planner.plan(snapshot, state, policy)
        what_if = snapshot is not self.t.snapshot or models is not None
        return {"what_if": what_if, "plan": result.to_dict()}

    async def m_apply(self, params: dict[str, Any], ctx: CallContext) -> Any:
        now = param(params, "now", bool, False)
        assert self.t.lock is not None
        async with self.t.lock:
            state = await self.t.poll()
            if state is None:
                raise RpcError("unavailable", f"Ollama is not reachable: {self.t.ollama_error}")
            plan = await self.t.replan()
            if plan is None:
                raise RpcError("unavailable", "no plan yet (tuner disabled or no hardware "
                               "snapshot)")
            assert self.t.effective is not None
            changes = plan.changes(self.t.effective.environment)
            desired = server_environment(plan)
            if self.t.effective.errors and not now:
                raise RpcError("unavailable", "a drop-in cannot be read, so the effective "
                               "settings are unknown: " + "; ".join(self.t.effective.errors)
                               + " (fix it, or use --now to apply anyway)")
            self.t.blocked = None
            if not changes or self.t.effective.velod == desired:
                return {"decision": "nothing", "message": "Ollama already runs the plan"
                        + ("" if not self.t.effective.conflicts else
                           " as far as velod's drop-in goes (see conflicts in tune show)")}
            outcome = await self.t.apply_plan(plan, "requested by admin", changes, force=now)
        if outcome.decision.startswith("skipped-"):
            raise RpcError("busy", outcome.message + " — use --now to restart anyway",
                           plain(outcome.to_dict()))
        return plain(outcome.to_dict())

    async def m_rollback(self, params: dict[str, Any], ctx: CallContext) -> Any:
        assert self.t.lock is not None
        async with self.t.lock:
            try:
                current = await run_blocking(self.t.applier.dropins.read_velod, timeout=10)
            except DropinError as exc:
                raise RpcError("unavailable", str(exc)) from None
            if not self.t.applier.dropins.has_backup():
                raise RpcError("not_found", f"nothing to roll back to: no "
                               f"{self.t.applier.dropins.backup.name} (velod has not changed "
                               "Ollama's settings since the last rollback)")
            outcome = await self.t.applier.rollback("requested by admin", undone=current)
            self.t.pending = None
            if outcome.decision == "rolled-back":
                self.t.block(env_key(current), outcome)  # do not re-apply it by ourselves
            self.t.announce(outcome)
        return plain(outcome.to_dict())

    async def m_history(self, params: dict[str, Any], ctx: CallContext) -> Any:
        limit = param(params, "limit", int, 20, check=lambda v: None if 1 <= v <= 1000
                      else "must be between 1 and 1000")
        entries = await run_blocking(self.t.history.last, limit, timeout=10)
        return {"entries": entries, "path": str(self.t.history.path)}


def _size_param(params: dict[str, Any], key: str) -> int | None:
    value = param(params, key, (int, str), None)
    if value is None:
        return None
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise RpcError("invalid_params", f"parameter '{key}': {exc}", {"field": key}) from None
    return size
