"""Closed-loop tuning: prove each change with a measurement, and explore safe alternatives.

``tuner.verify``: before an apply the tuner measures the most-used model (a short run: one
prompt, one request at a time, ``tuner.verify_repeat`` runs of ``tuner.verify_tokens``
tokens after a warm-up), applies, measures again, and rolls back when the second
measurement is slower beyond the noise (``benchmark.judge``). Both go to the history.

``tuner.explore``: once the plan is in place and Ollama has been idle for
``restart_when_idle_for``, the tuner measures the plan, then each safe candidate
(``velod.tuner.explore``), one restart per ``min_restart_interval`` at most and only
while idle (``Applier.gate``), and finally keeps the fastest: a candidate replaces the plan
only when it is faster beyond the noise. The choice is recorded (``explore-kept``) and
re-applied as an override of the plan for as long as the plan itself stays the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from velod.errors import ServiceError
from velod.tuner import explore, planner
from velod.tuner.applier import Outcome, server_environment
from velod.tuner.bench.spec import BenchSpec, judge
from velod.tuner.history import str_map

if TYPE_CHECKING:
    from velod.config import TunerConfig
    from velod.tuner.applier import Applier
    from velod.tuner.bench.service import Benchmarks
    from velod.tuner.journal import Journal
    from velod.tuner.plan import Plan

# Plans the current machine with a policy and extra pins (the tuner's view of both).
Replan = Callable[["planner.Policy", dict[str, str]], "Plan"]


def env_key(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(env.items()))


class ClosedLoop:
    """Verify and explore (the tuner holds its lock while calling in).

    It gets its collaborators, not the tuner: the applier (restart, roll back, idle
    tracking), the benchmarks, the journal of decisions, the current tuner settings, a way
    to plan with extra pins, a way to wake the tuner and one to have it look at the drop-ins
    and at what Ollama runs again (after each restart, so that its status is current).
    """

    def __init__(self, applier: Applier, bench: Benchmarks, journal: Journal,
                 settings: Callable[[], TunerConfig], replan: Replan,
                 trigger: Callable[[str], None], log: logging.Logger,
                 look: Callable[[], Awaitable[None]] | None = None) -> None:
        self.applier = applier
        self.bench = bench
        self.journal = journal
        self._settings = settings
        self._replan = replan
        self._trigger = trigger
        self._look = look
        self.log = log
        self._base: Plan | None = None  # the plan without overrides, as of the last step
        self.session: dict[str, Any] | None = None  # an exploration in progress
        self._begin_after = 0.0  # monotonic time before which a failed start is not retried
        self.kept: dict[str, Any] | None = self._kept_from_history()

    def _kept_from_history(self) -> dict[str, Any] | None:
        try:
            entry = self.journal.history.latest("explore-kept", scan=1000)
        except OSError:
            return None
        base, pins = str_map((entry or {}).get("base")), str_map((entry or {}).get("pins"))
        if entry is None or base is None or pins is None:
            return None  # none, or damaged: explore again
        return {"base": env_key(base), "pins": pins, "message": str(entry.get("message", ""))}

    # ------------------------------------------------------------------ measuring
    async def measure(self, purpose: str) -> dict[str, Any] | None:
        """A short benchmark of the most-used model; None when there is nothing to measure."""
        cfg = self._settings()
        try:
            name, digest = await self.bench.choose_model(None)
            spec = BenchSpec(model=name, prompts=("chat",), concurrency=(1,),
                             repeat=cfg.verify_repeat, gen=cfg.verify_tokens,
                             timeout=cfg.verify_timeout, purpose=purpose)
            result = await self.bench.run(spec, digest)
        except ServiceError as exc:
            self.log.warning("%s benchmark not run: %s", purpose, exc)
            return None
        finally:
            self.applier.idle.rebase()  # velod's own requests are not users' activity
        metrics = result["cases"][0]["metrics"] if result["cases"] else {}
        return {"id": result["id"], "model": name, "gen_tps": metrics.get("gen_tps"),
                "complete": result["complete"], "error": result["error"],
                "loaded": result.get("loaded")}

    @staticmethod
    def speed(m: dict[str, Any] | None) -> dict[str, Any] | None:
        return m.get("gen_tps") if m and m.get("complete") else None

    # ------------------------------------------------------------------ verify
    async def verify(self, before: dict[str, Any], applied: Outcome) -> Outcome:
        """After ``applied``, measure again; keep (``verified``) or roll back."""
        after = await self.measure("verify-after")
        env = applied.details.get("environment")
        tolerance = self._settings().verify_tolerance
        if after is None or not after["complete"]:
            why = after["error"] if after else "no model to measure"
            return await self.applier.rollback(
                f"the benchmark after the change failed ({why})", undone=env,
                before=before, after=after)
        verdict = judge(self.speed(before), self.speed(after), tolerance)
        details = {"before": before, "after": after, "ratio": verdict.ratio,
                   "environment": env}
        if verdict.slower:
            return await self.applier.rollback(
                f"the change made {after['model']} {verdict.message}", undone=env,
                before=before, after=after, ratio=verdict.ratio)
        return self.journal.record(Outcome("verified", f"kept: {after['model']} {verdict.message}",
                                     details))

    # ------------------------------------------------------------------ explore
    def replan_with(self, base_policy: planner.Policy, pins: dict[str, str]) -> Plan:
        return self._replan(base_policy, pins)

    def with_kept(self, base: Plan, policy: planner.Policy) -> Plan:
        """``base``, or the explored override of it when one was kept for this very plan."""
        kept = self.kept
        if not self._settings().explore:
            return base  # turning exploration off returns to the plan
        if not kept or not kept["pins"] or kept["base"] != env_key(server_environment(base)):
            return base
        plan = self.replan_with(policy, kept["pins"])
        if not explore.honours(plan, kept["pins"]):
            return base
        return explore.relabel(plan, kept["pins"], f"explored: {kept['message']}")

    @property
    def active(self) -> bool:
        return self.session is not None

    async def step(self, base: Plan, policy: planner.Policy) -> None:
        """One step of exploration for ``base`` (the plan without overrides)."""
        self._base = base
        base_env = server_environment(base)
        key = env_key(base_env)
        if self.session is None:
            if self.kept is not None and self.kept["base"] == key:
                return  # explored already for this plan
            await self._begin(base, policy, base_env)
        elif self.session["base"] != key:
            self.journal.record(Outcome("explore-aborted", "the plan changed during exploration; "
                                  "back to the plan", {"base": self.session["base_env"]}))
            self.session = None
        elif self.applier.gate() is None:
            if self.session["queue"]:
                await self._try_next()
            else:
                await self._finish()

    async def _begin(self, base: Plan, policy: planner.Policy, base_env: dict[str, str]) -> None:
        idle = self.applier.idle.idle_for()
        cfg = self._settings()
        if idle < cfg.restart_when_idle_for or time.monotonic() < self._begin_after:
            return  # measure only while Ollama is otherwise idle
        candidates = explore.safe_candidates(base, lambda pins: self.replan_with(policy, pins))
        if not candidates:
            self._keep(base_env, {}, [], "no safe alternative to the plan")
            return
        baseline = await self.measure("explore-baseline")
        if self.speed(baseline) is None:
            wait = max(cfg.interval, cfg.min_restart_interval)
            self.log.info("exploration postponed %.0fs: the plan could not be measured", wait)
            self._begin_after = time.monotonic() + wait
            return
        self.session = {"base": env_key(base_env), "base_env": base_env,
                        "queue": candidates, "running": base_env, "started": time.time(),
                        "trials": [{"pins": {}, "environment": base_env,
                                    "measurement": baseline}]}
        self.journal.record(Outcome("explore-trial", f"the plan: {_tps(baseline)}; "
                              f"{len(candidates)} candidate(s) to try",
                              {"pins": {}, "environment": base_env, "measurement": baseline}))

    async def _try_next(self) -> None:
        assert self.session is not None
        pins, plan = self.session["queue"].pop(0)
        env = server_environment(plan)
        changes = plan.changes(self.session["running"])
        outcome = await self.applier.apply(plan, f"exploring {_describe(pins)}", changes)
        self.applier.pending_verification = None  # the trial's measurement checks it
        await self._looked()
        self.journal.announce(outcome)
        if outcome.decision != "applied":
            self.journal.record(Outcome("explore-aborted",
                                        f"exploration stopped: {outcome.message}",
                                        {"pins": pins}))
            self.session = None
            return
        self.session["running"] = env
        measurement = await self.measure("explore-trial")
        loaded = (measurement or {}).get("loaded") or {}
        spills = loaded.get("gpu_percent") is not None and loaded["gpu_percent"] < 100
        trial = {"pins": pins, "environment": env, "measurement": measurement,
                 "spills": spills}
        self.session["trials"].append(trial)
        self.journal.record(Outcome("explore-trial", f"{_describe(pins)}: {_tps(measurement)}"
                              + (" (spilled to the CPU: not a candidate)" if spills else ""),
                              trial))

    async def _finish(self) -> None:
        assert self.session is not None
        tolerance = self._settings().verify_tolerance
        best = self.session["trials"][0]
        for trial in self.session["trials"][1:]:
            if trial.get("spills"):
                continue
            verdict = judge(self.speed(best["measurement"]), self.speed(trial["measurement"]),
                            tolerance)
            if verdict.faster:
                best = trial
        summary = [{"pins": t["pins"], "gen_tps": (self.speed(t["measurement"]) or {})
                    .get("median")} for t in self.session["trials"]]
        message = (f"{_describe(best['pins'])} is the fastest: {_tps(best['measurement'])}"
                   if best["pins"] else f"the plan is the fastest: {_tps(best['measurement'])}")
        if best["environment"] != self.session["running"]:
            queue_plan = self._plan_for(best["pins"])
            outcome = await self.applier.apply(queue_plan, f"exploration kept "
                                                 f"{_describe(best['pins'])}",
                                                 queue_plan.changes(self.session["running"]))
            await self._looked()
            self.journal.announce(outcome)
            if outcome.decision != "applied":
                self.journal.record(Outcome("explore-aborted", "exploration could not apply its "
                                      f"choice: {outcome.message}", {"pins": best["pins"]}))
                self.session = None
                return
        self._keep(self.session["base_env"], best["pins"], summary, message)
        self.session = None
        self._trigger("exploration finished")

    async def _looked(self) -> None:
        if self._look is not None:
            await self._look()

    def _plan_for(self, pins: dict[str, str]) -> Plan:
        policy = planner.Policy.from_config(self._settings())
        assert self._base is not None
        if not pins:
            return self._base
        return explore.relabel(self.replan_with(policy, pins), pins, "explored")

    def _keep(self, base_env: dict[str, str], pins: dict[str, str],
              trials: list[dict[str, Any]], message: str) -> None:
        self.kept = {"base": env_key(base_env), "pins": pins, "message": message}
        self.journal.record(Outcome("explore-kept", message,
                              {"base": base_env, "pins": pins, "trials": trials}))

    def status(self) -> dict[str, Any] | None:
        if self.session is not None:
            return {"state": "exploring", "tried": len(self.session["trials"]) - 1,
                    "left": len(self.session["queue"])}
        if self.kept is not None:
            return {"state": "done", "pins": self.kept["pins"], "message": self.kept["message"]}
        return None


def _describe(pins: dict[str, str]) -> str:
    if not pins:
        return "the plan"
    short = {explore.FLASH: "flash attention", explore.KV: "KV cache",
             explore.CONTEXT: "context"}
    return ", ".join(f"{short.get(k, k)} {v}" for k, v in sorted(pins.items()))


def _tps(m: dict[str, Any] | None) -> str:
    s = ClosedLoop.speed(m)
    if s is None:
        return "not measured" + (f" ({m['error']})" if m and m.get("error") else "")
    return f"{s['median']:.1f} tok/s (+-{s['spread']:.1f})"
