"""The config file under a running velod: bombs and duplicates are refused, a file that becomes
empty or disappears keeps the running config, and only a real config error stops the start."""

import os
import subprocess
import time

import psutil
import pytest
import yaml

from tests.integration.conftest import base_config, deep_merge, velod_command, wait_for
from tests.unit.test_safe_yaml import alias_bomb
from velod import safe_yaml

MiB = 1024**2


def running(daemon, *keys):
    value = daemon.call("config.get")["config"]
    for key in keys:
        value = value[key]
    return value


def config_text(daemon, **sections) -> str:
    return yaml.safe_dump(deep_merge(base_config(daemon.config_path.parent), sections))


def refused_reload(daemon, after: float = 0.0):
    """The next refused reload recorded in status (time > ``after``)."""
    return wait_for(lambda: (r := daemon.call("system.status")["last_reload"])
                    and r["time"] and r["time"] > after and not r["ok"] and r,
                    what="a refused reload")


def with_profile(daemon, profile: str) -> None:
    daemon.write_config(config_text(daemon, tuner={"profile": profile}))
    wait_for(lambda: running(daemon, "tuner", "profile") == profile)


# ------------------------------------------------------------------------------- bombs


def test_an_alias_bomb_written_as_the_config_file_is_refused_cheaply(velod):
    with_profile(velod, "throughput")
    rss = psutil.Process(velod.proc.pid).memory_info().rss
    velod.write_config(alias_bomb())
    reload = refused_reload(velod)
    assert "expands to more than" in reload["error"]
    assert len(reload["error"]) < 4096 and all(len(e) < 4096 for e in reload["errors"])
    assert psutil.Process(velod.proc.pid).memory_info().rss - rss < 100 * MiB
    assert running(velod, "tuner", "profile") == "throughput"
    assert len(velod.log_text()) < 64 * 1024  # the refusal is logged, not the expansion


def test_a_config_file_over_the_size_cap_is_refused(velod):
    velod.write_config("# " + "x" * 300_000 + "\n")
    reload = refused_reload(velod)
    assert f"larger than {safe_yaml.MAX_BYTES} bytes" in reload["error"]


def test_duplicate_sections_are_refused_naming_both_lines(velod, tmp_path):
    with_profile(velod, "throughput")
    text = config_text(velod, tuner={"profile": "throughput"}) + "tuner:\n  profile: low-memory\n"
    first = text.splitlines().index("tuner:") + 1
    last = len(text.splitlines()) - 1  # the appended "tuner:"
    velod.write_config(text)
    reload = refused_reload(velod)
    assert f"duplicate key 'tuner' at lines {first} and {last}" in reload["error"]
    assert running(velod, "tuner", "profile") == "throughput"
    dup = tmp_path / "dup.yaml"
    dup.write_text(text)
    check = subprocess.run([*velod_command(), "--check-config", str(dup)], capture_output=True,
                           text=True)
    assert check.returncode == 1 and "duplicate key 'tuner'" in check.stderr


# ---------------------------------------------------------------------- empty is not defaults


@pytest.mark.parametrize("blank", ["", "\n\n", "# all commented out\n# tuner: {}\n", "~\n"])
def test_a_file_that_becomes_blank_keeps_the_running_config(velod, blank):
    with_profile(velod, "throughput")
    before = time.time()
    velod.write_config(blank)
    reload = refused_reload(velod, before)
    assert "is empty or only comments" in reload["error"]
    assert "write '{}'" in reload["error"]
    assert running(velod, "tuner", "profile") == "throughput"
    status = velod.ctl("status").stdout
    assert "refused, running config kept" in status and "is empty" in status
    assert velod.ctl("reload", check=False).returncode == 1


def test_an_editor_that_truncates_then_writes_never_flips_to_defaults(velod):
    with_profile(velod, "throughput")
    seen: list[str] = []
    with open(velod.config_path, "r+") as f:  # in place: the watcher may see the empty file
        f.truncate()
        f.flush()
        for _ in range(5):
            seen.append(running(velod, "tuner", "profile"))
            time.sleep(0.1)
        f.write(config_text(velod, tuner={"profile": "low-memory"}))
    wait_for(lambda: running(velod, "tuner", "profile") == "low-memory")
    assert set(seen) == {"throughput"}


def test_explicit_braces_mean_the_built_in_defaults(velod):
    with_profile(velod, "throughput")
    velod.write_config("{}\n")
    wait_for(lambda: running(velod, "tuner", "profile") == "balanced")
    assert velod.call("system.status")["last_reload"]["ok"]


def test_a_dangling_symlink_keeps_the_running_config(velod):
    with_profile(velod, "throughput")
    target = velod.config_path.with_name("real.yaml")
    target.write_text(config_text(velod, tuner={"profile": "throughput"}))
    link = velod.config_path.with_name("link.tmp")
    link.symlink_to(target)
    os.replace(link, velod.config_path)
    time.sleep(0.3)
    before = time.time()
    target.unlink()
    velod.proc.send_signal(1)  # SIGHUP: a dangling link's target vanishing is not an event
    reload = refused_reload(velod, before)
    assert "does not exist (or is a dangling symlink)" in reload["error"]
    assert running(velod, "tuner", "profile") == "throughput"


def test_started_without_a_file_it_says_it_runs_on_the_defaults(velod_factory, tmp_path):
    missing = tmp_path / "missing.yaml"
    d = velod_factory(args=["--config", str(missing)])
    assert "does not exist" in d.log_text() and "built-in defaults" in d.log_text()
    status = d.call("system.status")
    assert status["config_source"] == "missing" and status["config_loaded_from"] is None
    text = d.ctl("status").stdout
    assert f"config: built-in defaults ({missing} does not exist)" in text
    assert "loaded at start" not in text
    assert d.ctl("reload").returncode == 0  # still nothing to load: nothing changes
    missing.write_text("tuner: {profile: throughput}\n")
    wait_for(lambda: running(d, "tuner", "profile") == "throughput")
    assert d.call("system.status")["config_loaded_from"] == str(missing)


# ---------------------------------------------------------------------- what validates runs


BAD_BUT_ONCE_ACCEPTED = [
    "hardware: {history_size: 100000000000000000000}\n",
    "ollama: {url: 'ftp://x'}\n",
    "ollama: {dropin: ../evil.conf}\n",
    "tuner: {interval: .inf}\n",
]


@pytest.mark.parametrize("text", BAD_BUT_ONCE_ACCEPTED)
def test_values_that_crashed_the_start_are_refused_by_check_config(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    check = subprocess.run([*velod_command(), "--check-config", str(path)], capture_output=True,
                           text=True)
    assert check.returncode == 1, check.stdout


@pytest.mark.parametrize("text", BAD_BUT_ONCE_ACCEPTED)
def test_values_that_crashed_the_start_are_a_config_error_at_start(velod_factory, text):
    d = velod_factory(text, wait=False)
    assert d.proc.wait(20) == 78
    assert "invalid config" in d.log_text() and "Traceback" not in d.log_text()


@pytest.mark.parametrize("text", BAD_BUT_ONCE_ACCEPTED)
def test_values_that_crashed_the_start_are_refused_on_reload(velod, text):
    velod.write_config(text)
    refused_reload(velod)
    assert velod.alive()


def test_an_unusable_state_directory_leaves_the_daemon_running(velod_factory, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    d = velod_factory({"state_dir": str(blocker / "state")})
    assert d.call("system.ping")["pong"]
    assert "cannot create the state directory" in d.log_text()
    assert d.call("system.status")["state_dir"] == str(blocker / "state")
