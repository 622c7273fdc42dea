"""An apply cut short by a crash is finished or undone by what Ollama actually runs, and an
apply is only called applied once Ollama runs it (the fake systemctl and the fake Ollama are
real processes; velod's steps are replayed up to the crash)."""

from __future__ import annotations

import pytest

from tests.unit.tuner.test_applier import UNIT, Rig, make_plan
from velod.config import OllamaConfig
from velod.tuner import recovery
from velod.tuner.applier import Applier, server_environment
from velod.tuner.backends.ollama_backend import OllamaBackend

pytestmark = pytest.mark.asyncio

OLD = {"OLLAMA_NUM_PARALLEL": "1"}
NEW = {"OLLAMA_NUM_PARALLEL": "2", "OLLAMA_CONTEXT_LENGTH": "8192"}


def restarts(rig: Rig) -> int:
    return sum(1 for c in rig.calls() if c[0] == "restart")


async def crash_after(rig: Rig, step: str) -> Applier:
    """Replay an apply of NEW over OLD up to ``step``, then start over as a new velod
    would: a fresh Applier on the same history."""
    applied = await rig.applier.apply(make_plan(OLD), "before", {})
    assert applied.decision == "applied"
    applier = rig.applier
    applier._record_applying("apply", NEW, reason="test",
                             expect={"expect_on_gpu": ["llama3.1:8b"]})
    if step in ("write", "daemon-reload", "restart"):
        applier.dropins.write(NEW)
    if step in ("daemon-reload", "restart"):
        await applier.systemctl("daemon-reload")
    if step == "restart":
        await applier.systemctl("restart", UNIT)
    return Applier(rig.backend, rig.tuner, rig.history)


async def settle(applier: Applier) -> recovery.Outcome:
    entry = recovery.interrupted(applier.history.last(100))
    assert entry is not None, "the crash must leave an applying entry without an outcome"
    outcome = await recovery.settle(applier, entry)
    assert recovery.interrupted(applier.history.last(100)) is None  # settled for good
    return outcome


@pytest.mark.parametrize("step", ["write", "daemon-reload"])
async def test_an_apply_cut_short_before_the_restart_is_undone_without_a_restart(
        rig: Rig, step: str) -> None:
    applier = await crash_after(rig, step)
    before = restarts(rig)
    outcome = await settle(applier)
    assert outcome.decision == "rolled-back", outcome.message
    assert "before Ollama restarted" in outcome.message and outcome.details["interrupted"]
    assert outcome.details["restored"] == OLD
    assert applier.dropins.read_velod() == OLD  # the drop-in says what Ollama runs again
    assert (await rig.ollama_env())["OLLAMA_NUM_PARALLEL"] == "1"
    assert restarts(rig) == before  # Ollama kept running, untouched
    assert rig.calls()[-1] == ["daemon-reload"]  # systemd's view follows the files
    assert outcome.details.get("failed") is None  # not a failure: the tuner may apply again


async def test_an_apply_cut_short_before_the_write_has_nothing_to_undo(rig: Rig) -> None:
    applier = await crash_after(rig, "applying")
    outcome = await settle(applier)
    assert outcome.decision == "rolled-back" and "nothing to undo" in outcome.message
    assert applier.dropins.read_velod() == OLD


async def test_an_entry_written_before_backends_is_still_verified_for_spills(
        rig: Rig) -> None:
    await rig.applier.apply(make_plan(OLD), "before", {})
    rig.applier._record_applying("apply", NEW, reason="test", expect_on_gpu=["llama3.1:8b"])
    rig.applier.dropins.write(NEW)
    await rig.applier.systemctl("daemon-reload")
    await rig.applier.systemctl("restart", UNIT)
    applier = Applier(rig.backend, rig.tuner, rig.history)
    outcome = await settle(applier)
    assert outcome.decision == "applied", outcome.message
    assert applier.pending_verification is not None
    assert applier.pending_verification["expect"] == {"expect_on_gpu": ["llama3.1:8b"]}


async def test_an_apply_cut_short_after_the_restart_is_finished_without_another(
        rig: Rig) -> None:
    applier = await crash_after(rig, "restart")
    before = restarts(rig)
    outcome = await settle(applier)
    assert outcome.decision == "applied", outcome.message
    assert outcome.details["interrupted"] and outcome.details["running"] == "process"
    assert restarts(rig) == before
    assert applier.pending_verification is not None  # the next load is still checked
    assert applier.pending_verification["expect"] == {"expect_on_gpu": ["llama3.1:8b"]}
    assert (await rig.ollama_env())["OLLAMA_CONTEXT_LENGTH"] == "8192"


async def test_a_rollback_cut_short_is_finished(rig: Rig) -> None:
    await rig.applier.apply(make_plan(OLD), "first", {})
    await rig.applier.apply(make_plan(NEW), "second", {})
    rig.applier._record_applying("rollback", NEW, reason="slower", failed=NEW)
    applier = Applier(rig.backend, rig.tuner, rig.history)  # crash: restart velod
    outcome = await settle(applier)
    assert outcome.decision == "rolled-back", outcome.message
    assert outcome.details["failed"] == NEW  # still not to be applied again by itself
    assert applier.dropins.read_velod() == OLD and not applier.dropins.has_backup()
    assert (await rig.ollama_env())["OLLAMA_NUM_PARALLEL"] == "1"


async def test_an_interrupted_entry_without_its_settings_is_an_error_recorded_once(
        rig: Rig) -> None:
    rig.history.append("applying", action="apply")  # damaged: no environment
    outcome = await settle(rig.applier)
    assert outcome.decision == "error" and "does not say which" in outcome.message


async def test_apply_checks_what_ollama_runs_after_the_restart(rig: Rig) -> None:
    # A drop-in that sorts after velod's overrides it: the restart does not give Ollama the
    # new value, so the apply is not called applied.
    rig.applier.dropins.directory.mkdir(parents=True, exist_ok=True)
    (rig.applier.dropins.directory / "90-admin.conf").write_text(
        '[Service]\nEnvironment="OLLAMA_NUM_PARALLEL=8"\n')
    outcome = await rig.applier.apply(make_plan(NEW), "test", {})
    assert outcome.decision == "rolled-back", outcome.message
    assert "does not run the new settings: OLLAMA_NUM_PARALLEL=8 (not 2)" in outcome.message


async def test_a_drop_in_ollama_was_not_restarted_for_gets_the_restart_only(rig: Rig) -> None:
    plan = make_plan(NEW)
    rig.applier.dropins.write(server_environment(plan))  # written, never restarted
    outcome = await rig.applier.apply(plan, "test", {})
    assert outcome.decision == "applied", outcome.message
    assert (await rig.ollama_env())["OLLAMA_NUM_PARALLEL"] == "2"
    again = await rig.applier.apply(plan, "test", {})
    assert again.decision == "skipped"  # runs it now


async def test_a_missing_systemctl_changes_nothing_and_says_so(rig: Rig) -> None:
    missing = OllamaConfig(url=rig.url, systemd_dir=str(rig.systemd_dir),
                           systemctl=str(rig.tmp / "no" / "systemctl"))
    applier = Applier(OllamaBackend(missing), rig.tuner, rig.history)
    outcome = await applier.apply(make_plan(NEW), "test", {})
    assert outcome.decision == "error" and "systemctl not found" in outcome.message
    assert "did not come back" not in outcome.message and "nothing was changed" in \
        outcome.message
    assert not applier.dropins.path.exists()
    assert [e["decision"] for e in rig.history.last(5)] == ["error"]
