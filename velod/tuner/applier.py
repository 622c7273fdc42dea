"""Apply a plan to a server safely: drop-in, daemon-reload, restart when idle, verify, roll back.

Everything server-specific goes through the server's backend (``velod.tuner.backends.base``).
The order of one apply is: the tuner asks :meth:`Applier.gate` (idle long enough? restart
allowed yet?); :meth:`Applier.apply` records an ``applying`` entry (so that a crash from
here on is finished or undone at the next start: ``velod.tuner.recovery``), writes velod's
drop-in atomically (keeping the old one), runs ``systemctl daemon-reload`` and
``systemctl restart <unit>``, waits (bounded) for the backend's readiness probe (Ollama:
``/api/version``; llama-server: ``/health``) and checks that the service runs the new
environment (``velod.tuner.running``). When the restart fails, the server does not come back
or runs other values, the previous drop-in is restored, systemd reloaded and the server
restarted again. Afterwards :meth:`Applier.verify` asks the backend whether the server runs
what was planned (Ollama, at the next model load: no spill to the CPU; llama-server: the
planned slots and context in ``/props``) and rolls the change back when not. Ollama's model
parameters become derived models (``<name><suffix>`` through ``/api/create``); the user's
models are never edited.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from velod.blocking import run_blocking
from velod.model.names import normalize_name
from velod.tuner.backends.base import Backend, ServerError
from velod.tuner.backends.ollama import variant_name
from velod.tuner.dropin import DropinError
from velod.tuner.history import History
from velod.tuner.running import Running, read_running

if TYPE_CHECKING:
    from velod.config import TunerConfig
    from velod.hardware.snapshot import Snapshot
    from velod.tuner.planner import Plan

BUSY_GPU_UTILIZATION = 10.0  # % above which a GPU with the server's models counts as busy
SYSTEMCTL_TIMEOUT = 90.0  # systemd's own default start timeout is 90 s


class ApplyError(Exception):
    """A step of applying failed; the message says which and why."""


class SystemctlMissing(ApplyError):
    """The configured systemctl cannot be run at all (not found, not executable)."""


@dataclass
class IdleTracker:
    """When the server was last seen working, from what its backend reports of use and GPU
    utilization.

    The backend gives a marker that changes with every request (Ollama: each loaded model's
    ``expires_at`` in ``/api/ps``, moved to now + keep-alive when a request finishes;
    llama-server: each slot's last task and the token counters) and whether a request is in
    flight now. Any change between two polls is activity. A long request on an Ollama model
    that has served before leaves ``expires_at`` still, which is why GPU utilization counts
    too (only while the server has a model in memory, so another program's GPU work does not
    keep it from ever being tuned).
    """

    last_active: float = field(default_factory=time.monotonic)
    _marker: Any = None
    _seen: bool = False

    def observe(self, marker: Any, busy: bool, has_model: bool, snapshot: Snapshot | None,
                now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if (self._seen and marker != self._marker) or busy:
            self.last_active = now
        self._marker, self._seen = marker, True
        if has_model and snapshot is not None and any(
                (g.utilization_gpu or 0.0) >= BUSY_GPU_UTILIZATION for g in snapshot.gpus):
            self.last_active = now

    def mark_active(self, now: float | None = None) -> None:
        self.last_active = time.monotonic() if now is None else now
        self._seen = False

    def rebase(self) -> None:
        """Forget the last view without counting it as activity (after velod's own requests,
        which move the marker too)."""
        self._seen = False

    def idle_for(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.last_active


@dataclass(frozen=True)
class Outcome:
    """What an apply or rollback did; ``decision`` is the history kind recorded."""

    decision: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"decision": self.decision, "message": self.message, **self.details}


def server_environment(plan: Plan) -> dict[str, str]:
    """The variables velod's drop-in should set for ``plan`` (every managed one that the
    server's command line does not fix)."""
    return plan.environment()


def model_parameters(recommendations: dict[str, Any]) -> dict[str, Any]:
    """``/api/create`` parameters from a model's recommendations ("8192" -> 8192)."""
    out: dict[str, Any] = {}
    for name, rec in recommendations.items():
        value = rec.value
        try:
            out[name] = int(value)
        except ValueError:
            try:
                out[name] = float(value)
            except ValueError:
                out[name] = value
    return out


class Applier:
    """The I/O of changing one server through its backend; records every decision in
    ``history``."""

    def __init__(self, backend: Backend, tuner: TunerConfig, history: History,
                 log: logging.Logger | None = None) -> None:
        self.backend = backend
        self.tuner = tuner
        self.history = history
        self.log = log or logging.getLogger("velod.tuner.applier")
        self.idle = IdleTracker()
        self.pending_verification: dict[str, Any] | None = None
        self.on_step: Callable[[str, str], None] = lambda action, step: None
        try:
            recent = history.last(1000)
        except OSError as exc:
            self.log.warning("cannot read the tuner history %s: %s", history.path, exc)
            recent = []
        # The rate limit holds across daemon restarts: the last restart is in the history.
        restarts = [e["time"] for e in recent if e.get("restarted")]
        self.last_restart: float | None = restarts[-1] if restarts else None
        self.variants: dict[str, dict[str, Any]] = {}
        for entry in recent:
            if (entry["decision"] == "applied" and entry.get("target") == "variant"
                    and isinstance(entry.get("variant"), str)
                    and isinstance(entry.get("parameters"), dict)):
                self.variants[entry["variant"]] = entry["parameters"]

    def reconfigure(self, tuner: TunerConfig) -> None:
        self.tuner = tuner

    @property
    def dropins(self) -> Any:
        """The server unit's drop-in directory (follows the backend's config)."""
        return self.backend.dropins

    @property
    def ready_timeout(self) -> float:
        """How long the server may take to answer again after a restart."""
        return float(self.backend.ready_timeout)

    # ------------------------------------------------------------------ gate
    def gate(self, force: bool = False) -> Outcome | None:
        """None when a restart may happen now, else the skip decision with its reason."""
        if force:
            return None
        if self.last_restart is not None:
            since = time.time() - self.last_restart
            if since < self.tuner.min_restart_interval:
                wait = self.tuner.min_restart_interval - since
                return Outcome("skipped-rate-limited",
                               f"{self.backend.label} was restarted {since:.0f}s ago; next "
                               "restart allowed "
                               f"in {wait:.0f}s (tuner.min_restart_interval)",
                               {"retry_in": round(wait, 3)})
        idle = self.idle.idle_for()
        if idle < self.tuner.restart_when_idle_for:
            return Outcome("skipped-busy",
                           f"{self.backend.label} was busy {idle:.1f}s ago; restarting needs "
                           f"{self.tuner.restart_when_idle_for:g}s idle "
                           "(tuner.restart_when_idle_for)",
                           {"idle_for": round(idle, 3)})
        return None

    # ------------------------------------------------------------------ systemctl
    def systemctl_problem(self) -> str | None:
        """Why the server's ``systemctl`` cannot be run (not found on PATH, not executable),
        or None. Checked before anything is written, so a machine without systemd changes
        nothing."""
        if shutil.which(self.backend.systemctl) is None:
            return (f"systemctl not found: {self.backend.systemctl!r} is not an executable "
                    f"file nor on PATH (velod restarts {self.backend.label} through systemd; "
                    f"set the systemctl of {self.backend.name} in the config, or use "
                    "tuner.mode: observe)")
        return None

    async def systemctl(self, *args: str) -> str:
        """Run ``systemctl args``; raise ApplyError with its stderr on failure or timeout
        (SystemctlMissing when it cannot be run at all)."""
        argv = [self.backend.systemctl, *args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except (FileNotFoundError, PermissionError) as exc:
            raise SystemctlMissing(f"systemctl not found: cannot run {self.backend.systemctl}: "
                                   f"{exc} (set the systemctl of {self.backend.name})"
                                   ) from None
        except OSError as exc:
            raise ApplyError(f"cannot run {self.backend.systemctl}: {exc} "
                             f"(set the systemctl of {self.backend.name})") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(), SYSTEMCTL_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ApplyError(f"`{' '.join(argv)}` did not finish in {SYSTEMCTL_TIMEOUT:g}s") \
                from None
        if proc.returncode != 0:
            detail = (err or out).decode("utf-8", "replace").strip() or "no message"
            raise ApplyError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {detail}")
        return out.decode("utf-8", "replace")

    async def running(self) -> Running:
        """What the server's unit runs now; unknown (``environment`` None, with the reason
        in ``note``) when systemctl cannot tell."""
        try:
            return await read_running(self.systemctl, self.backend.unit)
        except ApplyError as exc:
            return Running(None, note=str(exc))

    async def daemon_reload(self, action: str) -> None:
        self.on_step(action, "systemctl daemon-reload")
        await self.systemctl("daemon-reload")

    async def _restart_and_wait(self, action: str) -> None:
        await self.daemon_reload(action)
        self.last_restart = time.time()
        self.on_step(action, f"restarting {self.backend.unit}")
        await self.systemctl("restart", self.backend.unit)
        self.idle.mark_active()  # a fresh start is not idle time
        self.on_step(action, f"waiting for {self.backend.label} to answer")
        await self.wait_ready()

    async def wait_ready(self) -> str:
        """Probe the server until it answers; ApplyError after ``ready_timeout``."""
        deadline = time.monotonic() + self.ready_timeout
        delay, last = 0.05, "no answer"
        while True:
            try:
                return await self.backend.ready()
            except ServerError as exc:
                last = str(exc)
            if time.monotonic() + delay > deadline:
                raise ApplyError(f"{self.backend.label} did not answer within "
                                 f"{self.ready_timeout:g}s of "
                                 f"the restart: {last}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    # ------------------------------------------------------------------ apply
    async def apply(self, plan: Plan, reason: str, changes: dict[str, Any]) -> Outcome:
        """Write the drop-in for ``plan``, reload, restart, wait and check what the server
        runs; roll back on failure.

        The caller has checked ``gate``. Records ``applying``, then ``applied``,
        ``rolled-back`` or ``error``. When the drop-in already says ``plan`` but the server
        runs other values (it was not restarted since), only the restart is done.
        """
        env = server_environment(plan)
        problem = self.systemctl_problem()
        if problem:
            return self.record(Outcome("error", f"{problem}; nothing was changed",
                                        {"stage": "systemctl"}))
        try:
            unchanged = await run_blocking(self.dropins.says, env, timeout=10)
        except (DropinError, OSError, TimeoutError) as exc:
            return self.record(Outcome("error", f"cannot read the drop-in: {exc}",
                                        {"stage": "write"}))
        if unchanged and (await self.running()).runs(env) is not False:
            return Outcome("skipped", "velod's drop-in already sets these values")
        expect = self.backend.expectations(plan)
        self._record_applying("apply", env, reason=reason, expect=expect)
        if not unchanged:
            self.on_step("apply", f"writing {self.dropins.path}")
            comment = f"Profile {plan.profile}; {reason}"
            try:
                await run_blocking(self.dropins.write, env, comment, timeout=10)
            except PermissionError as exc:
                return self.record(Outcome(
                    "error", f"cannot write the drop-in: {exc} (apply mode needs write access "
                    "to the unit's drop-in directory: run velod as root or set the "
                    f"systemd_dir of {self.backend.name})", {"stage": "write"}))
            except (DropinError, OSError, TimeoutError) as exc:
                return self.record(Outcome("error", f"cannot write the drop-in: {exc}",
                                            {"stage": "write"}))
        details = {"environment": env, "changes": changes, "reason": reason,
                   "dropin": str(self.dropins.path)}
        try:
            await self._restart_and_wait("apply")
        except ApplyError as exc:
            self.log.warning("applying failed, rolling back: %s", exc)
            return await self._roll_back(f"apply failed: {exc}", failed=env)
        return await self.confirm(env, expect, details,
                                  f"{self.backend.label} restarted with {len(changes)} "
                                  "changed setting(s)")

    async def confirm(self, env: dict[str, str], expect: dict[str, Any],
                      details: dict[str, Any], message: str) -> Outcome:
        """After a restart onto ``env``: ``applied`` (with ``message``) when the service runs
        it, or when that cannot be told; else roll back. ``expect`` is what the backend
        checks at :meth:`verify`."""
        self.on_step("apply", f"checking what {self.backend.label} runs")
        running = await self.running()
        wrong = running.differences(env)
        if wrong:
            listing = ", ".join(f"{k}={v[0] if v[0] is not None else '(unset)'} (not {v[1]})"
                                for k, v in sorted(wrong.items()))
            return await self._roll_back(f"after the restart {self.backend.label} does not run "
                                         f"the new settings: {listing}", failed=env)
        checked = {"running": running.source or f"not checked: {running.note}"}
        self.pending_verification = {"environment": env, "since": time.time(),
                                     "expect": expect}
        return self.record(Outcome("applied", message,
                                   {**details, **checked, "restarted": True}))

    def _record_applying(self, action: str, env: dict[str, str], **details: Any) -> None:
        """Say what is about to change before touching anything (see velod.tuner.recovery).
        ``monotonic`` and ``boot_id`` let the next start tell whether the server restarted
        after this moment."""
        self.record(Outcome("applying", f"{action}: {len(env)} setting(s)", {
            "action": action, "environment": env, "monotonic": time.monotonic(),
            "boot_id": boot_id(), **details}))

    async def verify(self, state: Any) -> Outcome | None:
        """After an apply, ask the backend whether ``state`` runs the plan (None while there
        is nothing to judge yet, e.g. no model loaded); roll back when it does not."""
        pending = self.pending_verification
        if pending is None:
            return None
        verdict = self.backend.verify(state, pending.get("expect") or {})
        if verdict is None:
            return None
        self.pending_verification = None
        if not verdict.ok:
            return await self._roll_back(verdict.message, failed=pending["environment"],
                                         loaded=verdict.observed)
        return self.record(Outcome("verified", verdict.message, {"loaded": verdict.observed}))

    async def rollback(self, reason: str, undone: dict[str, str] | None = None,
                       **extra: Any) -> Outcome:
        """Restore the previous drop-in (admin request, or a change measured slower) and
        restart the server.

        ``undone`` (the settings rolled away from) is recorded as ``failed`` so that the
        tuner does not apply them again by itself, also after a daemon restart; ``extra``
        goes to the history entry (the measurements before and after, say).
        """
        return await self._roll_back(reason, failed=undone, **extra)

    async def _roll_back(self, reason: str, failed: dict[str, str] | None,
                         **extra: Any) -> Outcome:
        self.pending_verification = None
        self._record_applying("rollback", failed or {}, reason=reason, failed=failed)
        self.on_step("rollback", "restoring the previous drop-in")
        try:
            restored = await run_blocking(self.dropins.rollback, timeout=10)
        except (DropinError, OSError, TimeoutError) as exc:
            return self.record(Outcome("error", f"{reason}; and the rollback failed: {exc}",
                                        {"stage": "rollback", "failed": failed, **extra}))
        return await self.restart_restored(reason, {"reason": reason, "restored": restored,
                                                    "failed": failed, **extra})

    async def restart_restored(self, reason: str, details: dict[str, Any]) -> Outcome:
        """Restart the server onto the drop-in a rollback restored; record how it went."""
        try:
            await self._restart_and_wait("rollback")
        except SystemctlMissing as exc:
            return self.record(Outcome("error", f"{reason}; previous drop-in restored, but "
                                        f"{self.backend.label} was not restarted: {exc}",
                                        {"stage": "rollback-restart", **details}))
        except ApplyError as exc:
            return self.record(Outcome("error", f"{reason}; previous drop-in restored but "
                                        f"{self.backend.label} did not come back: {exc}",
                                        {"stage": "rollback-restart", **details,
                                         "restarted": True}))
        return self.record(Outcome("rolled-back", f"{reason}; previous settings restored",
                                    {**details, "restarted": True}))

    # ------------------------------------------------------------------ variants
    async def apply_variants(self, plan: Plan, installed: set[str]) -> list[Outcome]:
        """Create or update ``<model><suffix>`` for each model with planned parameters
        (servers with per-model variants only: Ollama)."""
        outcomes: list[Outcome] = []
        if not self.backend.variants:
            return outcomes
        for model, recs in sorted(plan.model_params.items()):
            if not recs or plan.models.get(model, None) is None:
                continue
            params = model_parameters(recs)
            variant = variant_name(model, self.tuner.variant_suffix)
            exists = normalize_name(variant) in installed
            if exists and self.variants.get(variant) == params:
                continue
            try:
                await self.backend.create_variant(variant, model, params)
            except ServerError as exc:
                outcomes.append(self.record(Outcome(
                    "error", f"cannot create {variant}: {exc}",
                    {"target": "variant", "variant": variant, "model": model})))
                continue
            self.variants[variant] = params
            outcomes.append(self.record(Outcome(
                "applied", f"{variant} created from {model}",
                {"target": "variant", "variant": variant, "model": model,
                 "parameters": params})))
        return outcomes

    def record(self, outcome: Outcome) -> Outcome:
        try:
            self.history.append(outcome.decision, message=outcome.message, **outcome.details)
        except OSError as exc:
            self.log.error("cannot write the tuner history: %s", exc)
        return outcome


@functools.cache
def boot_id() -> str:
    """This boot's ID (``/proc/sys/kernel/random/boot_id``); "" where there is none.
    CLOCK_MONOTONIC times compare only within one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return ""
