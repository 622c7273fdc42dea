"""Read-only for everyone, changes for admins: root, velod's own user, or the admin group.
CI runs as root, so a forked child drops to 'nobody' to be an ordinary peer."""

import grp
import json
import os
import pwd
import tempfile
from pathlib import Path

import pytest

from velod.control.client import Client, RemoteError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


def as_user(socket_path: Path, uid: int, gid: int, calls: list[tuple[str, dict]]) -> list:
    """Fork, drop to uid/gid, run the calls, return [(ok, result-or-error-code)]."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            out = []
            with Client.connect(str(socket_path), timeout=10) as client:
                for method, params in calls:
                    try:
                        out.append([True, client.call(method, params)])
                    except RemoteError as exc:
                        out.append([False, exc.code, exc.message])
            os.write(write_fd, json.dumps(out, default=str).encode())
        except BaseException as exc:  # report, never return into pytest
            os.write(write_fd, json.dumps([["crash", repr(exc)]]).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@pytest.fixture
def public_socket():
    directory = Path(tempfile.mkdtemp(prefix="velod-perm-", dir="/tmp"))
    directory.chmod(0o755)
    return directory / "velod.sock"


def test_ordinary_users_read_but_cannot_change(velod_factory, public_socket):
    d = velod_factory(socket=public_socket)
    nobody = pwd.getpwnam("nobody")
    results = as_user(public_socket, nobody.pw_uid, nobody.pw_gid, [
        ("system.ping", {}), ("system.status", {}), ("config.get", {}),
        ("config.reload", {}), ("system.shutdown", {}),
    ])
    assert [r[0] for r in results] == [True, True, True, False, False], results
    assert results[3][1] == "permission_denied"
    assert "velod" in results[3][2]  # names the admin group to join
    hello = as_user(public_socket, nobody.pw_uid, nobody.pw_gid, [("system.hello", {})])
    assert hello[0][1]["admin"] is False
    assert d.alive()


def test_members_of_the_admin_group_may_change_things(velod_factory, public_socket):
    group = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    d = velod_factory({"control": {"admin_group": group}}, socket=public_socket)
    nobody = pwd.getpwnam("nobody")
    results = as_user(public_socket, nobody.pw_uid, nobody.pw_gid, [("config.reload", {})])
    assert results[0][0] is True and results[0][1]["applied"], results
    assert d.call("system.status")["last_reload"]["trigger"] == "control request"


def test_root_is_admin(velod):
    assert velod.call("system.hello")["admin"] is True
