"""Default locations: system paths for root, XDG for users, a private /tmp fallback."""

import os

import pytest

from velod import paths


@pytest.fixture
def as_user(monkeypatch):
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    return monkeypatch


def test_root_gets_the_system_paths(monkeypatch):
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    assert paths.default_socket() == "/run/velod/velod.sock"
    assert paths.default_config() == "/etc/velod/velod.yaml"
    assert paths.default_state_dir() == "/var/lib/velod"


def test_users_get_xdg_paths(as_user, tmp_path):
    as_user.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    as_user.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    as_user.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert paths.default_socket() == str(tmp_path / "run/velod/velod.sock")
    assert paths.default_config() == str(tmp_path / "cfg/velod/velod.yaml")
    assert paths.default_state_dir() == str(tmp_path / "state/velod")


def test_without_xdg_runtime_dir_the_socket_goes_to_a_per_user_tmp_dir(as_user):
    as_user.delenv("XDG_RUNTIME_DIR", raising=False)
    assert paths.default_socket() == "/tmp/velod-1000/velod.sock"


def test_the_fallback_dir_is_created_private_and_refused_when_not_ours(tmp_path):
    mine = tmp_path / "mine"
    paths.ensure_private_dir(str(mine))
    assert mine.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        paths.ensure_private_dir(str(shared))
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(PermissionError, match="belongs to uid 65534"):
            paths.ensure_private_dir(str(theirs))
