"""Finish or undo an apply (or rollback) that velod was stopped in the middle of.

The applier records ``applying`` (``action`` apply or rollback, the ``environment`` it
applies or rolls away from, ``monotonic`` time and ``boot_id``) before it touches the
server's drop-in, and ``applied``, ``rolled-back`` or ``error`` when it is done. An ``applying``
entry with none of those after it means velod died in between (a crash, SIGKILL, power
loss), and the drop-in may say something the server (Ollama, a llama-server) does not run.
At the next start, before anything else, the tuner settles it by what the server actually
runs (``velod.tuner.running``):

- an apply after which the server runs the new settings is finished: it must answer, then
  it is ``applied`` and verified at the next model load (rolled back if it does not answer);
- an apply that the server was not restarted for is undone: velod's previous drop-in is put
  back and systemd reloaded, without a restart (it runs those values already); the tuner then
  plans again as usual, so in apply mode the change comes back through the normal gate;
- a rollback is finished: the previous drop-in restored, the server restarted onto it unless it
  runs it already.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from velod.blocking import run_blocking
from velod.tuner.applier import ApplyError, Outcome, boot_id
from velod.tuner.dropin import DropinError
from velod.tuner.history import str_map

if TYPE_CHECKING:
    from velod.tuner.applier import Applier
    from velod.tuner.running import Running

SERVER_DECISIONS = ("applying", "applied", "rolled-back", "error")
STOPPED = "velod was stopped in the middle of"


def interrupted(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The ``applying`` entry that no outcome followed, among ``entries`` (oldest first)."""
    for entry in reversed(entries):
        if entry["decision"] in SERVER_DECISIONS and entry.get("target") != "variant":
            return entry if entry["decision"] == "applying" else None
    return None


def started_after(running: Running, entry: dict[str, Any]) -> bool | None:
    """Whether the server's main process started after ``entry`` was written; None when that
    cannot be told (no start time, another boot, an entry without its clock)."""
    mono = entry.get("monotonic")
    if (running.started is None or not isinstance(mono, int | float)
            or not boot_id() or entry.get("boot_id") != boot_id()):
        return None
    return running.started >= mono


def runs(running: Running, entry: dict[str, Any], env: dict[str, str]) -> bool | None:
    """Whether the server runs ``env`` now. systemd's view of the unit moves at
    ``daemon-reload``, before the restart: a process older than ``entry`` does not run it."""
    answer = running.runs(env)
    if answer and running.source == "systemd" and started_after(running, entry) is False:
        return False
    return answer


async def settle(applier: Applier, entry: dict[str, Any]) -> Outcome:
    """Finish or undo the interrupted ``entry``; the outcome is recorded in the history."""
    env = str_map(entry.get("environment"))
    action = entry.get("action")
    if env is None or action not in ("apply", "rollback"):
        return applier.record(Outcome(
            "error", f"{STOPPED} a change, but its history entry does not say which; "
            "nothing was undone (see `velodctl tune show`)",
            {"stage": "recovery", "interrupted": True}))
    try:
        if action == "rollback":
            return await _finish_rollback(applier, entry, env)
        return await _settle_apply(applier, entry, env)
    except (DropinError, OSError, TimeoutError) as exc:
        return applier.record(Outcome("error", f"{STOPPED} an {action}, and settling it "
                                      f"failed: {exc}",
                                      {"stage": "recovery", "interrupted": True,
                                       "environment": env}))


async def _settle_apply(applier: Applier, entry: dict[str, Any],
                        env: dict[str, str]) -> Outcome:
    label = applier.backend.label
    running = await applier.running()
    if runs(running, entry, env):
        try:
            await applier.wait_ready()
        except ApplyError as exc:
            return await applier.rollback(f"{STOPPED} an apply; {label} runs the new settings "
                                          f"but does not answer: {exc}", undone=env,
                                          interrupted=True)
        expect = entry.get("expect")
        if not isinstance(expect, dict):  # entries written before backends: Ollama's list
            old = entry.get("expect_on_gpu")
            names = [n for n in old if isinstance(n, str)] if isinstance(old, list) else []
            expect = {"expect_on_gpu": names}
        return await applier.confirm(env, expect, {
            "environment": env, "interrupted": True, "reason": entry.get("reason"),
            "dropin": str(applier.dropins.path)},
            f"{STOPPED} an apply after {label} restarted: it runs the new settings")
    details: dict[str, Any] = {"interrupted": True, "environment": env,
                               "running": running.source or running.note}
    if not await run_blocking(applier.dropins.says, env, timeout=10):
        return applier.record(Outcome("rolled-back", f"{STOPPED} an apply before it changed "
                                      "the drop-in; nothing to undo", details))
    if not await run_blocking(applier.dropins.has_backup, timeout=10):
        return applier.record(Outcome("error", f"{STOPPED} an apply before {label} restarted, "
                                      f"and the previous drop-in's backup is gone; {label} "
                                      "does not run what the drop-in says",
                                      {**details, "stage": "recovery"}))
    details["restored"] = await run_blocking(applier.dropins.rollback, timeout=10)
    message = (f"{STOPPED} an apply before {label} restarted; velod's previous drop-in is back, "
               f"as {label} still runs it")
    try:
        if applier.systemctl_problem() is None:
            await applier.daemon_reload("rollback")  # systemd's view back to the files
    except ApplyError as exc:
        message += f" (systemctl daemon-reload failed: {exc})"
    return applier.record(Outcome("rolled-back", message, details))


async def _finish_rollback(applier: Applier, entry: dict[str, Any],
                           env: dict[str, str]) -> Outcome:
    reason = f"{STOPPED} a rollback ({entry.get('reason') or 'no reason recorded'})"
    if await run_blocking(applier.dropins.has_backup, timeout=10):
        restored = await run_blocking(applier.dropins.rollback, timeout=10)
    else:
        restored = await run_blocking(applier.dropins.read_velod, timeout=10)
    details = {"reason": reason, "restored": restored, "failed": str_map(entry.get("failed")),
               "interrupted": True}
    running = await applier.running()
    if env and runs(running, entry, env) is False:
        return applier.record(Outcome("rolled-back", f"{reason}; {applier.backend.label} had "
                                      "restarted onto the previous settings", details))
    return await applier.restart_restored(reason, details)
