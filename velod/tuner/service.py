"""One server's tuner: watch it and the hardware, plan, and (in apply mode) apply.

``velod.tuner.servers`` (the ``tuner`` component) runs one :class:`Tuner` per managed server;
each speaks to its server only through its backend (``velod.tuner.backends.base``): Ollama,
or a llama.cpp llama-server. Below, "the server" is that one.

One loop polls the server every ``tuner.interval`` (with exponential back-off while it does not
answer) and re-plans; triggers wake it early: start-up, ``hardware.changed``, a config
reload, a model with CPU spill in ``/api/ps``, a newly pulled or served model. A changed plan must
stay the same for ``tuner.settle`` before it is applied (hysteresis); a plan that was rolled
back is not retried by itself until the plan changes. ``observe`` mode never writes or
restarts anything. Every decision goes to the history and out as event ``tuner.decision``.
Before its first cycle the loop settles an apply that velod was stopped in the middle of
(``velod.tuner.recovery``); "runs the recommended settings" is said only of what the server's
service runs (``velod.tuner.running``), not of what its drop-ins say.

Manual apply (``tuner.apply``, admin) works in both modes: it skips the settle wait, but is
refused (error ``busy``, nothing changed) while the server is busy or within
``min_restart_interval``; ``now: true`` skips those checks too and restarts it at once
(requests in flight are cut off).

The verbs ``velod.tuner.rpc`` calls — ``ollama_status``, ``show``, ``what_if``, ``apply``,
``rollback``, ``history``, ``bench_run|list|show|compare`` — are at the end of the class.
``velodctl tune plan`` end to end: ``velod/tuner/cli.py`` (cmd_plan) sends ``tuner.plan``;
``velod/tuner/rpc.py`` reads the params and calls the service's ``what_if``, which calls
:meth:`Tuner.what_if` of each server: its backend's pure planner (``velod/tuner/planner.py``
for Ollama) over a snapshot and the models' metadata.

Closed loop (``velod.tuner.closedloop``): with ``tuner.verify`` each apply is measured
before and after and rolled back when slower; with ``tuner.explore`` (apply mode) the
settled plan is compared with safe alternatives while the server is idle and the fastest kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from velod.blocking import run_blocking
from velod.component import Component, Context
from velod.config import OllamaConfig
from velod.errors import Busy, InvalidParams, NotFound, Unavailable
from velod.hardware.snapshot import Snapshot
from velod.model.names import normalize_name
from velod.tuner import planner, recovery
from velod.tuner.applier import Applier, Outcome, server_environment
from velod.tuner.backends.base import Backend, ServerError
from velod.tuner.backends.ollama_backend import OllamaBackend
from velod.tuner.bench.service import Benchmarks
from velod.tuner.bench.spec import BenchSpec, compare
from velod.tuner.bench.store import BenchNotFound, BenchStore, server_of, summary
from velod.tuner.closedloop import ClosedLoop
from velod.tuner.dropin import DropinError, Effective
from velod.tuner.history import History, str_map
from velod.tuner.journal import Journal, plain
from velod.tuner.running import Running

if TYPE_CHECKING:
    from velod.bus import Event
    from velod.config import Config

MAX_BACKOFF_S = 300.0
RUNNING_MAX_AGE_S = 60.0  # what the server runs is asked again after this, or when files change
PROGRESS = "tuner.progress"


def backoff(interval: float, failures: int) -> float:
    """Seconds before the next poll after ``failures`` failed polls in a row."""
    if failures <= 0:
        return interval
    cap = max(interval, min(MAX_BACKOFF_S, 32 * interval))
    return min(interval * 2 ** failures, cap)


def env_key(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(env.items()))


class Tuner(Component):
    """The tuner of one server (its ``backend``; Ollama's by default)."""

    name = "tuner"

    def __init__(self, ctx: Context, backend: Backend | None = None) -> None:
        super().__init__(ctx)
        self.backend: Backend = backend or OllamaBackend(ctx.config.ollama)
        self.log = ctx.log.getChild(f"tuner.{self.backend.name}")
        self.history = History(ctx.state_dir, self.backend.history_file)
        self.journal = Journal(self.history, self._publish, self.log)
        self.applier = Applier(self.backend, ctx.config.tuner, self.history, self.log)
        self.applier.on_step = lambda action, step: self._publish(
            PROGRESS, {"action": action, "step": step})
        self.snapshot: Snapshot | None = None
        self.ollama: Any = None  # the server's last good poll (its backend's state type)
        self.last_poll: float | None = None
        self.last_ok: float | None = None
        self.ollama_error: str | None = None
        self.failures = 0
        self.next_poll_at: float | None = None
        self.plan: planner.Plan | None = None  # with an explored override, if one was kept
        self.base_plan: planner.Plan | None = None  # the planner's own
        self.effective: Effective | None = None
        self.running: Running | None = None  # what the server's service runs, as last asked
        self._running_asked: tuple[Any, float] | None = None  # (drop-ins then, monotonic)
        self.pending: dict[str, Any] | None = None  # changed plan waiting to settle
        # A plan velod will not apply again by itself (rolled back, or failed to write),
        # until the plan changes, the config is reloaded or an admin runs tuner.apply.
        self.blocked: dict[str, Any] | None = self._blocked_from_history()
        self._skips_recorded: set[tuple[str, Any]] = set()
        self._digests: frozenset[tuple[str, str | None]] | None = None
        self._spilling: frozenset[str] = frozenset()
        self._triggers: list[str] = ["start-up"]
        self.observed: list[str] = []
        self._wake: asyncio.Event | None = None
        self._urgent = False
        self.lock: asyncio.Lock | None = None
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Any = None
        self.usage: Counter[str] = Counter()  # polls in which a loaded model had been used
        self._expiry_seen: dict[str, str | None] = {}
        self.bench = Benchmarks(BenchStore(ctx.state_dir), lambda: self.backend,
                                ctx.bus.publish, self._server_settings, self.most_used_model,
                                self.log)
        self.loop = ClosedLoop(self.applier, self.bench, self.journal, lambda: self.config.tuner,
                               self._plan_with, self.trigger, self.log,
                               lambda: self.look(force=True))
        skipped = self.history.skipped  # as the readers above found it
        self.history_warning = skipped.describe(self.history.path) if skipped.count else None
        if self.history_warning:
            self.log.warning("%s", self.history_warning)

    def _report_state(self) -> None:
        """Tell the tuner service (``ctx.on_state_change``) of a change of state, without
        logging it: the service logs and reports the component's state once, for all its
        servers."""
        self._report_pending = False
        old, new = self._reported, self._state
        if old != new:
            self._reported = new
            if self.ctx.on_state_change is not None:
                self.ctx.on_state_change(self, old, new)

    def _publish(self, topic: str, data: dict[str, Any]) -> Any:
        """Publish on the bus with the server's name, so subscribers can tell servers apart."""
        return self.ctx.bus.publish(topic, {**data, "server": self.backend.name})

    def _blocked_from_history(self) -> dict[str, Any] | None:
        try:
            entries = self.history.last(1000)
        except OSError:
            return None  # the applier logs it
        server = [e for e in entries if e["decision"] in ("applied", "rolled-back")
                  and e.get("target") != "variant"]
        last = server[-1] if server else None
        failed = str_map(last.get("failed")) if last else None
        if last and last["decision"] == "rolled-back" and failed is not None:
            return {"key": env_key(failed), "decision": "rolled-back",
                    "message": str(last.get("message", "rolled back"))}
        return None

    def block(self, key: tuple[tuple[str, str], ...], outcome: Outcome) -> None:
        self.blocked = {"key": key, "decision": outcome.decision, "message": outcome.message}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self.lock = asyncio.Lock()
        self._unsubscribe = self.ctx.bus.subscribe(["hardware.snapshot", "hardware.changed"],
                                                   self._on_event)
        self._task = asyncio.create_task(self._run(), name="tuner")
        self.state = "running"

    async def stop(self) -> None:
        self.state = "stopping"
        if self._unsubscribe:
            self._unsubscribe()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 2.0)
        await self.backend.close()
        self.state = "stopped"

    async def reconfigure(self, config: Config) -> None:
        old_url = self.backend.url
        self.config = config
        await self.backend.reconfigure(config)
        if self.backend.url != old_url:
            # Another server: the failures of the old address say nothing about it.
            self.failures, self.ollama_error, self.next_poll_at = 0, None, None
            self.ollama, self._digests, self._expiry_seen = None, None, {}
            self.state, self.error = "running", None
        self.applier.reconfigure(config.tuner)
        self.pending = None
        self.blocked = None
        self.trigger("reconfigure", urgent=True)

    def _on_event(self, event: Event) -> None:
        if event.topic == "hardware.snapshot":
            try:
                self.snapshot = Snapshot.from_dict(event.data["snapshot"])
            except (KeyError, TypeError, ValueError) as exc:
                self.log.warning("ignoring a malformed hardware snapshot: %s", exc)
                return
            if self.plan is None:
                self.trigger("hardware snapshot")
        elif event.topic == "hardware.changed":
            self.trigger("hardware.changed")

    def trigger(self, reason: str, urgent: bool = False) -> None:
        """Wake the loop for a re-plan now, noting why (``urgent`` also ends a back-off)."""
        self._urgent = self._urgent or urgent
        if reason not in self._triggers:
            self._triggers.append(reason)
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        assert self._wake is not None and self.lock is not None
        async with self.lock:  # before any verb: this task takes the lock first
            await self._recover()
        while True:
            self._wake.clear()
            try:
                async with self.lock:
                    await self._cycle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the tuner must never take the daemon down
                self.log.exception("tuner cycle failed")
                self.state, self.error = "degraded", f"tuner cycle failed: {exc}"
            await self._sleep(self._next_delay())

    async def _recover(self) -> None:
        """Settle an apply or rollback that velod was stopped in (velod.tuner.recovery)."""
        try:
            entries = await run_blocking(self.history.last, 1000, timeout=10)
        except (OSError, TimeoutError) as exc:
            self.log.error("cannot read the tuner history %s: %s", self.history.path, exc)
            return
        entry = recovery.interrupted(entries)
        if entry is None:
            return
        self.log.warning("%s an %s; settling it", recovery.STOPPED, entry.get("action"))
        try:
            outcome = await recovery.settle(self.applier, entry)
        except Exception as exc:  # the tuner must never take the daemon down
            self.log.exception("settling an interrupted apply failed")
            self.state, self.error = "degraded", f"settling an interrupted apply failed: {exc}"
            return
        failed = outcome.details.get("failed")
        if outcome.decision in ("rolled-back", "error") and isinstance(failed, dict):
            self.block(env_key(failed), outcome)
        await self.look(force=True)
        self.journal.announce(outcome)

    async def _sleep(self, delay: float) -> None:
        """Wait ``delay`` s or until triggered; while the server is failing only an urgent
        trigger (a config reload) cuts the back-off short."""
        assert self._wake is not None
        self.next_poll_at = deadline = time.monotonic() + delay
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
            if not self.failures or self._urgent:
                break
            self._wake.clear()
        self._urgent = False

    def _next_delay(self) -> float:
        tuner = self.config.tuner
        delay = backoff(tuner.interval, self.failures)
        if self.failures:
            return delay
        if self.pending is not None:
            waited = time.monotonic() - self.pending["since"]
            delay = min(delay, max(0.05, tuner.settle - waited + 0.01))
            if self.pending.get("retry_in") is not None:
                delay = min(delay, max(0.05, self.pending["retry_in"]))
        return delay

    async def poll(self) -> Any:
        """Ask the server for its state; on failure count it and keep the error for status."""
        self.last_poll = time.time()
        try:
            state = await self.backend.fetch_state(self.config.tuner)
        except ServerError as exc:
            self.failures += 1
            self.ollama_error = str(exc)
            self.state, self.error = "degraded", f"{self.backend.label} unreachable: {exc}"
            return None
        if self.failures:
            self.log.info("%s answers again at %s", self.backend.label, self.backend.url)
        self.failures, self.ollama_error = 0, None
        self.state, self.error = "running", None
        self.ollama, self.last_ok = state, time.time()
        marker, busy, has_model = self.backend.activity(state)
        self.applier.idle.observe(marker, busy, has_model, self.snapshot)
        seen = {normalize_name(m.name): m.expires_at for m in state.loaded}
        self.usage.update(n for n, e in seen.items() if self._expiry_seen.get(n) != e)
        self._expiry_seen = seen
        self.observed = []  # triggers seen in the server's state, for this cycle
        digests = frozenset((m.name, m.digest) for m in state.models)
        if self._digests is not None and digests != self._digests:
            self.observed.append("model installed or changed")
        self._digests = digests
        spilling = frozenset(m.name for m in state.loaded if m.spills_to_cpu)
        if spilling - self._spilling:
            self.observed.append("CPU spill in /api/ps: "
                                 + ", ".join(sorted(spilling - self._spilling)))
        self._spilling = spilling
        return state

    def planning_state(self) -> Any:
        if self.ollama is not None and not self.failures:
            return self.ollama
        return self.backend.unreachable_state(self.ollama, self.ollama_error or "not polled")

    def policy(self) -> planner.Policy:
        """The planning policy for this server, with what its unit's command line fixes."""
        return self.backend.policy(self.config.tuner, self.effective)

    async def replan(self) -> planner.Plan | None:
        """A fresh plan for this machine from the latest snapshot and server state."""
        if self.snapshot is None or not self.config.tuner.enabled:
            return None
        await self.look()  # first: the unit's command line may fix settings (policy.locked)
        policy = self.policy()
        base = self.backend.plan(self.snapshot, self.planning_state(), policy)
        plan = self.loop.with_kept(base, policy)
        self.base_plan, self.plan = base, plan  # with the view it was compared against
        return plan

    async def look(self, force: bool = False) -> None:
        """Read the drop-ins, and what the server's service runs when they changed since the
        last time, that was a while ago (a restart by someone else shows within
        RUNNING_MAX_AGE_S) or ``force``; both change together, so that a status never
        pairs new files with an old process."""
        try:
            effective = await run_blocking(self.applier.dropins.effective, timeout=10)
        except (OSError, TimeoutError) as exc:
            effective = Effective({}, {}, {}, errors=[f"cannot read drop-ins: {exc}"])
        files = env_key(effective.environment)
        asked = self._running_asked
        if force or asked is None or asked[0] != files \
                or time.monotonic() - asked[1] >= RUNNING_MAX_AGE_S:
            self.running = await self.applier.running()
            self._running_asked = (files, time.monotonic())
        self.effective = effective

    async def _cycle(self) -> None:
        # Triggers that arrive during this cycle (a reload, say) belong to the next one.
        reasons, self._triggers = self._triggers, []
        state = await self.poll()
        if state is None:
            self._triggers = reasons + [r for r in self._triggers if r not in reasons]
            return  # back off; never act on a stale view of the server
        if self.applier.pending_verification is not None:
            outcome = await self.applier.verify(state)
            if outcome is not None:
                failed = outcome.details.get("failed")
                if outcome.decision in ("rolled-back", "error") and isinstance(failed, dict):
                    self.block(env_key(failed), outcome)  # not retried by itself
                self.journal.announce(outcome)
        plan = await self.replan()
        reasons += self.observed
        if plan is None:
            self._triggers = reasons + [r for r in self._triggers if r not in reasons]
            return
        tuner = self.config.tuner
        policy = self.policy()
        if self.loop.active and self.base_plan is not None:
            await self.loop.step(self.base_plan, policy)  # exploration drives the settings
            return
        await self._decide(plan, ", ".join(reasons) or "periodic check")
        settled = self.effective is not None and not plan.changes(self.effective.environment)
        if (tuner.mode == "apply" and tuner.explore and settled and self.pending is None
                and self.base_plan is not None):
            await self.loop.step(self.base_plan, policy)
            if self.loop.active:
                return
        if tuner.mode == "apply" and tuner.model_variants and settled and self.backend.variants:
            # Model parameters go with the server settings they were planned for, so the
            # variants follow once Ollama runs those.
            for outcome in await self.applier.apply_variants(plan,
                                                             self.backend.installed_names()):
                self.journal.announce(outcome)

    def _delta(self, plan: planner.Plan) -> dict[str, Any] | None:
        """What applying ``plan`` would change, or None when there is nothing to do: the server
        runs it already, or velod's file already says it and another file overrides it (a
        conflict shown by tuner.show; restarting would not help). When the drop-ins say the
        plan but the server runs other values (not restarted since), those are the changes."""
        assert self.effective is not None
        changes = plan.changes(self.effective.environment)
        if changes:
            return None if self.effective.velod == server_environment(plan) else changes
        return self._not_running(plan) or None

    def _not_running(self, plan: planner.Plan) -> dict[str, Any]:
        """Planned settings the drop-ins say but the server does not run ({}: runs them all,
        or unknown)."""
        running = self.running
        if running is None or running.environment is None:
            return {}
        return plan.changes(running.environment)

    async def _decide(self, plan: planner.Plan, reason: str) -> None:
        assert self.effective is not None
        changes = self._delta(plan)
        if changes is None:
            self.pending = None
            return
        key = env_key(server_environment(plan))
        if self.blocked is not None and key == self.blocked["key"]:
            self.pending = None
            return
        if self.effective.errors and self.config.tuner.mode == "apply":
            # Without every drop-in readable the effective environment is a guess.
            self.block(key, self.journal.record(Outcome(
                "error", "not applying while a drop-in cannot be read: "
                + "; ".join(self.effective.errors), {"stage": "read"})))
            return
        now = time.monotonic()
        if self.pending is None or self.pending["key"] != key:
            self.pending = {"key": key, "since": now, "changes": changes, "reason": reason}
            self._skips_recorded.clear()
            self.journal.record(Outcome("planned", f"{len(changes)} setting(s) to change",
                                 {"changes": changes, "reason": reason,
                                  "mode": self.config.tuner.mode}))
        if self.config.tuner.mode != "apply":
            return
        if now - self.pending["since"] < self.config.tuner.settle:
            return
        await self.apply_plan(plan, self.pending["reason"], changes, force=False)

    async def apply_plan(self, plan: planner.Plan, reason: str, changes: dict[str, Any],
                     force: bool) -> Outcome:
        skip = self.applier.gate(force=force)
        if skip is not None:
            if self.pending is not None:
                self.pending["retry_in"] = skip.details.get("retry_in") or min(
                    self.config.tuner.interval, max(0.05, self.config.tuner.restart_when_idle_for
                                                    - skip.details.get("idle_for", 0.0)))
            if (skip.decision, self.pending and self.pending["key"]) not in self._skips_recorded:
                self._skips_recorded.add((skip.decision, self.pending and self.pending["key"]))
                self.journal.record(skip)
            return skip
        before = None
        if (self.config.tuner.verify and self.applier.idle.idle_for()
                >= self.config.tuner.restart_when_idle_for):
            before = await self.loop.measure("verify-before")  # only while otherwise idle
        outcome = await self.applier.apply(plan, reason, changes)
        if outcome.decision == "applied" and self.loop.speed(before) is not None:
            assert before is not None
            self.journal.announce(outcome)
            outcome = await self.loop.verify(before, outcome)
        self.pending = None
        if outcome.decision in ("rolled-back", "error"):
            self.block(env_key(server_environment(plan)), outcome)
        if outcome.decision != "skipped":
            await self.look(force=True)  # the status shows the new state at once
        self.journal.announce(outcome)
        return outcome

    def most_used_model(self, installed: list[str]) -> str | None:
        """The installed model used most while velod watched; ties go to ``tuner.models``
        order, then to a loaded model, then by name."""
        names = [normalize_name(n) for n in installed]
        if not names:
            return None
        wanted = [normalize_name(n) for n in self.config.tuner.models]
        loaded = {normalize_name(m.name) for m in (self.ollama.loaded if self.ollama else [])}
        return min(names, key=lambda n: (-self.usage.get(n, 0),
                                         wanted.index(n) if n in wanted else len(wanted),
                                         n not in loaded, n))


    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        tuner = self.config.tuner
        retry = (max(0.0, self.next_poll_at - time.monotonic())
                 if self.failures and self.next_poll_at else None)
        changes = (len(self.plan.changes(self.effective.environment)
                       or self._not_running(self.plan)) if self.plan and self.effective
                   else None)
        return {"state": self.state, "error": self.error, "mode": tuner.mode,
                "summary": self._summary(changes, retry),
                "enabled": tuner.enabled, "profile": tuner.profile,
                "server": {"name": self.backend.name, "kind": self.backend.kind,
                           "url": self.backend.url, "reachable": self.reachable(),
                           "version": self.ollama.version if self.ollama else None,
                           "error": self.ollama_error, "failures": self.failures,
                           "retry_in": round(retry, 3) if retry is not None else None},
                "pending": self.pending_dict(),
                "changes": changes, "last_decision": self.journal.last,
                "verify": tuner.verify, "explore": self.loop.status() if tuner.explore else None,
                "bench": self.bench.running,
                "running": self.running.to_dict() if self.running else None,
                "history": {"path": str(self.history.path), "warning": self.history_warning}}

    def _summary(self, changes: int | None, retry: float | None) -> str:
        text = self._state_summary(changes, retry)
        if self.history_warning:
            text += f" (history: {self.history.skipped.count} damaged line(s) skipped)"
        return text

    def _state_summary(self, changes: int | None, retry: float | None) -> str:
        mode = self.config.tuner.mode
        label = self.backend.label
        if not self.config.tuner.enabled:
            return "disabled (tuner.enabled: false)"
        if self.failures:
            when = f", retrying in {retry:.0f}s" if retry is not None else ""
            return f"{mode}; {label} not reachable{when}"
        if self.last_poll is None:
            return f"{mode}; starting"
        version = self.ollama.version if self.ollama else "?"
        if changes is None:
            return f"{mode}; {label} {version}; waiting for a hardware snapshot"
        if not changes:
            if self.running is not None and self.running.environment is None:
                return (f"{mode}; {label} {version}: its drop-ins set the recommended settings "
                        f"(what it runs cannot be checked: {self.running.note})")
            return f"{mode}; {label} {version} runs the recommended settings"
        if self.plan and self.effective and not self.plan.changes(self.effective.environment):
            return (f"{mode}; {label} {version} was not restarted since its drop-ins changed: "
                    f"{changes} recommended setting(s) not running yet")
        if self.blocked:
            return (f"{mode}; {changes} change(s) recommended, not retried after "
                    f"{self.blocked['decision']}")
        return f"{mode}; {label} {version}; {changes} change(s) recommended"

    def reachable(self) -> bool | None:
        if self.last_poll is None:
            return None
        return self.failures == 0

    def pending_dict(self) -> dict[str, Any] | None:
        if self.pending is None:
            return None
        waited = time.monotonic() - self.pending["since"]
        return {"changes": plain(self.pending["changes"]), "reason": self.pending["reason"],
                "settled_in": round(max(0.0, self.config.tuner.settle - waited), 3)}

    # ------------------------------------------------------------------ helpers of verbs
    def _plan_with(self, base_policy: planner.Policy, pins: dict[str, str]) -> planner.Plan:
        """This machine's plan under ``base_policy`` with ``pins`` added (for exploring)."""
        assert self.snapshot is not None
        policy = dataclasses.replace(base_policy, pin={**base_policy.pin, **pins})
        return self.backend.plan(self.snapshot, self.planning_state(), policy)

    async def _server_settings(self) -> dict[str, str]:
        """The environment systemd gives the server (unit file and drop-ins) as velod reads
        it."""
        try:
            effective = await run_blocking(self.applier.dropins.effective, timeout=10)
        except (OSError, TimeoutError):
            return {}
        return dict(effective.environment)

    async def _locked(self, fn: Any) -> Any:
        assert self.lock is not None
        async with self.lock:
            return await fn()

    def _unit_found(self) -> bool:
        dropins = self.applier.dropins
        return dropins.unit_file.exists() or dropins.directory.exists()

    # ------------------------------------------------------------------ verbs
    async def ollama_status(self) -> dict[str, Any]:
        """Is Ollama reachable; its version; loaded models with their CPU/GPU split."""
        if self.last_poll is None:
            await self._locked(self.poll)
        state = self.ollama
        loaded = [{"name": m.name, "size": m.size, "size_vram": m.size_vram,
                   "gpu_percent": round(100 * m.gpu_fraction, 1),
                   "cpu_percent": round(100 * (1 - m.gpu_fraction), 1),
                   "spills_to_cpu": m.spills_to_cpu, "context_length": m.context_length,
                   "expires_at": m.expires_at} for m in (state.loaded if state else [])]
        return {"url": self.backend.url, "reachable": self.reachable(),
                "version": state.version if state else None, "error": self.ollama_error,
                "failures": self.failures, "last_ok": self.last_ok,
                "last_poll": self.last_poll, "stale": bool(self.failures and state),
                "models": [m.name for m in state.models] if state else [], "loaded": loaded,
                "idle_for": round(self.applier.idle.idle_for(), 1)}

    async def show(self) -> dict[str, Any]:
        """Current vs recommended settings with reasons, and the memory budget."""
        if not self.config.tuner.enabled:
            raise Unavailable("the tuner is disabled (tuner.enabled: false)")
        if self.snapshot is None:
            raise Unavailable("no hardware snapshot yet (is the hardware monitor enabled?); "
                              "try again in a few seconds")
        plan = self.plan or await self._locked(self.replan)
        eff = self.effective or Effective({}, {}, {})
        changes = plan.changes(eff.environment)
        not_running = {} if changes else self._not_running(plan)
        running = self.running.to_dict() if self.running else {"active": None, "note": None}
        rows = []
        for name, rec in plan.server.items():
            # A setting the unit's command line fixes runs with the flag's value.
            current = rec.value if rec.locked else eff.environment.get(name)
            source = f"ExecStart= of {self.backend.unit}" if rec.locked else eff.sources.get(name)
            rows.append({"name": name, "current": current, "source": source,
                         "default": rec.default, "recommended": rec.value, "reason": rec.reason,
                         "pinned": rec.pinned, "locked": rec.locked, "change": name in changes})
        return {"mode": self.config.tuner.mode, "profile": plan.profile,
                "server": {"name": self.backend.name, "kind": self.backend.kind,
                           "label": self.backend.label, "url": self.backend.url,
                           "reachable": self.reachable(),
                           "version": self.ollama.version if self.ollama else plan.version,
                           "error": self.ollama_error,
                           "observed": self.backend.describe(self.ollama) if self.ollama
                           else None},
                "settings": rows, "changes": plain(changes or not_running),
                "up_to_date": not changes and not not_running,
                "running": {**running, "known": bool(self.running and
                                                     self.running.environment is not None),
                            "not_running": plain(not_running)},
                "conflicts": [c.to_dict() | {"message": c.describe()} for c in eff.conflicts],
                "dropin": str(self.applier.dropins.path), "dropin_errors": eff.errors,
                "unit_found": self._unit_found(), "service": self.backend.unit,
                "systemd_dir": self.backend.systemd_dir,
                "exec_start": eff.exec_start,
                "pending": self.pending_dict(),
                "blocked": ({"decision": self.blocked["decision"],
                             "message": self.blocked["message"]} if self.blocked else None),
                "plan": plan.to_dict()}

    async def what_if(self, vram: int | None = None, gpus: int | None = None,
                      ram: int | None = None, models: list[str] | None = None,
                      profile: str | None = None) -> dict[str, Any]:
        """A plan for this machine, or for another one (``vram``/``gpus``/``ram``) and other
        models; what is not given comes from this machine."""
        if self.snapshot is None and vram is None and gpus is None and ram is None:
            raise Unavailable("no hardware snapshot yet; give vram/gpus/ram to plan for "
                              "another machine")
        snapshot = self.snapshot
        if vram is not None or gpus is not None or ram is not None:
            here = self.snapshot
            count = gpus if gpus is not None else (len(here.gpus) if here and here.gpus else 1)
            size = vram if vram is not None else (
                max((g.memory_total or 0) for g in here.gpus) if here and here.gpus else 0)
            memory = ram if ram is not None else (here.memory.total if here else 64 * 1024**3)
            try:
                snapshot = planner.what_if_snapshot(size, count, memory)
            except ValueError as exc:
                raise InvalidParams(str(exc)) from None
        state = self.planning_state()
        policy = dataclasses.replace(self.policy(), profile=profile or self.config.tuner.profile)
        if models is not None:
            # Exactly these models, each from the server's own metadata when it has it.
            state = self.backend.what_if_state(models, state)
            policy = dataclasses.replace(policy, models=[])
        assert snapshot is not None
        result = self.backend.plan(snapshot, state, policy)
        what_if = snapshot is not self.snapshot or models is not None
        return {"what_if": what_if, "plan": result.to_dict(), "server": self.backend.name,
                "kind": self.backend.kind}

    async def apply(self, now: bool = False) -> dict[str, Any]:
        """Apply the current plan without waiting for it to settle (``now``: also while
        the server is busy or was restarted recently)."""
        assert self.lock is not None
        async with self.lock:
            if await self.poll() is None:
                raise Unavailable(f"{self.backend.label} is not reachable: {self.ollama_error}")
            plan = await self.replan()
            if plan is None:
                raise Unavailable("no plan yet (tuner disabled or no hardware snapshot)")
            assert self.effective is not None
            if self.effective.errors and not now:
                raise Unavailable("a drop-in cannot be read, so the effective settings are "
                                  "unknown: " + "; ".join(self.effective.errors)
                                  + " (fix it, or use --now to apply anyway)")
            self.blocked = None
            changes = self._delta(plan)
            if changes is None:
                return {"decision": "nothing", "message": f"{self.backend.label} already runs "
                        "the plan"
                        + ("" if not self.effective.conflicts else
                           " as far as velod's drop-in goes (see conflicts in tune show)")}
            outcome = await self.apply_plan(plan, "requested by admin", changes, force=now)
        if outcome.decision.startswith("skipped-"):
            raise Busy(outcome.message + " — use --now to restart anyway",
                       plain(outcome.to_dict()))
        return plain(outcome.to_dict())

    async def rollback(self) -> dict[str, Any]:
        """Restore the previous drop-in and restart the server."""
        assert self.lock is not None
        async with self.lock:
            try:
                current = await run_blocking(self.applier.dropins.read_velod, timeout=10)
            except DropinError as exc:
                raise Unavailable(str(exc)) from None
            if not self.applier.dropins.has_backup():
                raise NotFound(f"nothing to roll back to: no {self.applier.dropins.backup.name} "
                               f"(velod has not changed {self.backend.label}'s settings since "
                               "the last rollback)")
            problem = self.applier.systemctl_problem()
            if problem:  # restoring the file without a restart would leave them apart
                raise Unavailable(f"{problem}; nothing was changed")
            outcome = await self.applier.rollback("requested by admin", undone=current)
            self.pending = None
            if outcome.decision == "rolled-back":
                self.block(env_key(current), outcome)  # do not re-apply it by ourselves
            await self.look(force=True)
            self.journal.announce(outcome)
        return plain(outcome.to_dict())

    async def decisions(self, limit: int) -> dict[str, Any]:
        """The last ``limit`` decisions of the history, oldest first."""
        entries = await run_blocking(self.history.last, limit, timeout=10)
        skipped = self.history.skipped
        return {"entries": entries, "path": str(self.history.path),
                "skipped": skipped.count,
                "warning": skipped.describe(self.history.path) if skipped.count else None}

    async def bench_run(self, model: str | None, url: str | None = None,
                        **spec: Any) -> dict[str, Any]:
        """Benchmark ``model`` (default: the most used) through the server, or through the
        Ollama-compatible server at ``url`` (velod's own engine), and save the result."""
        if self.bench.running is not None:
            raise Busy(f"benchmark {self.bench.running['id']} is running; wait for it")
        if url is not None:
            other = OllamaBackend(OllamaConfig(url=url,
                                               request_timeout=self.backend.request_timeout),
                                  name=url, label=f"the server at {url}")
            try:
                bench = self.bench.through(other)
                name, digest = await bench.choose_model(model)
                return await bench.run(BenchSpec(model=name, **spec), digest)
            finally:
                await other.close()
        assert self.lock is not None
        async with self.lock:  # no tuner restart while measuring
            name, digest = await self.bench.choose_model(model)
            result = await self.bench.run(BenchSpec(model=name, **spec), digest)
        self.applier.idle.mark_active()  # a benchmark is use, like any client's
        return result

    async def bench_list(self, limit: int) -> dict[str, Any]:
        """Saved benchmark results, newest first, and the run under way."""
        results, damaged = await run_blocking(self.bench.store.summaries, limit, timeout=30)
        return {"results": results, "damaged": damaged,
                "directory": str(self.bench.store.directory), "running": self.bench.running}

    async def bench_show(self, ref: str) -> dict[str, Any]:
        """One saved result (an id, ``last`` or ``last~N``)."""
        try:
            return await run_blocking(self.bench.store.load, ref, timeout=10)
        except BenchNotFound as exc:
            raise NotFound(str(exc)) from None

    async def bench_compare(self, a_ref: str, b_ref: str) -> dict[str, Any]:
        """Two results per metric, and what differed between the runs."""
        a, b = await self.bench_show(a_ref), await self.bench_show(b_ref)
        sa, sb = a.get("server_settings") or {}, b.get("server_settings") or {}
        changed = {k: [sa.get(k), sb.get(k)] for k in sorted(set(sa) | set(sb))
                   if sa.get(k) != sb.get(k)}
        notes = []
        if (a.get("model") or {}).get("digest") != (b.get("model") or {}).get("digest"):
            notes.append("the two runs measured different models (or model digests)")
        if a.get("spec", {}).get("gen") != b.get("spec", {}).get("gen") or \
                a.get("spec", {}).get("prompt_tokens") != b.get("spec", {}).get("prompt_tokens"):
            notes.append("the two runs used different prompt or generation lengths")
        sa_server, sb_server = server_of(a), server_of(b)
        if sa_server.get("kind", "ollama") != sb_server.get("kind", "ollama"):
            notes.append("the two runs measured different kinds of server")
        elif sa_server.get("version") != sb_server.get("version"):
            notes.append("the two runs measured different server versions")
        rows = compare(a, b)
        if any(not row["spread_known"] for row in rows):
            notes.append("a run measured a case only once (--repeat 1): its spread is "
                         "unknown, so no difference is called better or worse (run with "
                         "--repeat 3 or more)")
        return {"a": summary(a), "b": summary(b), "rows": rows,
                "settings_changed": changed, "notes": notes}
