"""Config reload: by in-place edit, by rename, by sed -i, by SIGHUP and by velodctl reload.
A broken config is refused, the running one stays, and status says why."""

import json
import os
import signal
import subprocess

import yaml

from tests.integration.conftest import base_config, deep_merge, wait_for


def running(daemon, *keys):
    value = daemon.call("config.get")["config"]
    for key in keys:
        value = value[key]
    return value


def config_text(daemon, **sections):
    return yaml.safe_dump(deep_merge(base_config(daemon.config_path.parent), sections))


def test_in_place_edit_is_picked_up(velod):
    with open(velod.config_path, "r+") as f:  # same inode, like `echo >` or nano
        f.write(config_text(velod, tuner={"profile": "throughput"}))
        f.truncate()
    wait_for(lambda: running(velod, "tuner", "profile") == "throughput")
    assert velod.call("system.status")["last_reload"]["trigger"] == "file change"


def test_write_to_temp_and_rename_is_picked_up(velod):
    tmp = velod.config_path.with_name(".velod.yaml.swp")
    tmp.write_text(config_text(velod, tuner={"profile": "low-memory"}))
    os.replace(tmp, velod.config_path)
    wait_for(lambda: running(velod, "tuner", "profile") == "low-memory")


def test_sed_in_place_is_picked_up(velod):
    velod.write_config(config_text(velod, log={"level": "info"}))
    wait_for(lambda: velod.call("system.status")["last_reload"]["time"])
    subprocess.run(["sed", "-i", "s/level: info/level: debug/", str(velod.config_path)],
                   check=True)
    wait_for(lambda: running(velod, "log", "level") == "debug")


def test_a_broken_edit_keeps_the_running_config_and_status_says_why(velod):
    velod.write_config(config_text(velod, tuner={"profile": "throughput"}))
    wait_for(lambda: running(velod, "tuner", "profile") == "throughput")

    velod.write_config(config_text(velod, tuner={"profile": "throughput", "mode": "aply"}))
    reload = wait_for(lambda: (r := velod.call("system.status")["last_reload"])
                      and not r["ok"] and r)
    assert any("tuner.mode" in e and "did you mean 'apply'" in e for e in reload["errors"])
    assert running(velod, "tuner", "mode") == "observe"
    assert running(velod, "tuner", "profile") == "throughput"
    assert "tuner.mode" in velod.ctl("status").stdout
    assert "refused" in velod.log_text()

    result = velod.ctl("reload", check=False)
    assert result.returncode == 1 and "tuner.mode" in result.stderr

    velod.write_config(config_text(velod, tuner={"mode": "observe", "profile": "balanced"}))
    wait_for(lambda: velod.call("system.status")["last_reload"]["ok"])
    assert running(velod, "tuner", "profile") == "balanced"


def test_yaml_syntax_errors_are_refused_too(velod):
    velod.write_config("tuner: {profile: [\n")
    reload = wait_for(lambda: (r := velod.call("system.status")["last_reload"])
                      and not r["ok"] and r)
    assert "YAML syntax error" in reload["error"]
    assert velod.alive()


def test_sighup_reloads(velod):
    velod.proc.send_signal(signal.SIGHUP)
    reload = wait_for(lambda: (r := velod.call("system.status")["last_reload"])
                      and r["trigger"] == "SIGHUP" and r)
    assert reload["ok"]


def test_velodctl_reload_returns_once_the_new_config_is_active(velod):
    # Written so the watcher cannot have seen it yet (no wait), then reloaded at once.
    velod.write_config(config_text(velod, hardware={"interval": "2s"}))
    result = velod.ctl("reload")
    assert "config reloaded" in result.stdout
    assert running(velod, "hardware", "interval") == "2s"
    status = json.loads(velod.ctl("status", "--json").stdout)
    assert status["last_reload"]["ok"]


def test_deleting_the_file_keeps_the_running_config_and_status_says_so(velod):
    velod.write_config(config_text(velod, tuner={"profile": "throughput"}))
    wait_for(lambda: running(velod, "tuner", "profile") == "throughput")
    velod.config_path.unlink()
    reload = wait_for(lambda: (r := velod.call("system.status")["last_reload"])
                      and not r["ok"] and r)
    assert "does not exist" in reload["error"] and "keeping the running config" in reload["error"]
    assert running(velod, "tuner", "profile") == "throughput"
    assert "does not exist" in velod.ctl("status").stdout
