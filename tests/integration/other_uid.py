"""Clients that really are another user: a forked child calls setuid() before it connects, so
velod reads that uid with SO_PEERCRED. Needs root (CI runs as root). Used by the
integration tests and by bench/abuse.py."""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack

from velod.control import protocol

NOBODY = 65534
OTHER = 65533  # a second unprivileged uid; it needs no passwd entry


def shared_socket_dir() -> Path:
    """A directory other users may traverse (pytest's own tmp dirs are 0700 to root)."""
    path = Path(tempfile.mkdtemp(prefix="velod-uid-", dir="/tmp"))
    path.chmod(0o755)
    return path


@contextlib.contextmanager
def as_user(uid: int, fn: Callable[..., Any], *args: Any) -> Iterator[Any]:
    """Run ``fn(*args)`` in a child process running as ``uid``; yield what it returned.

    The child stays alive (holding whatever ``fn`` opened) until the block ends.
    """
    result_r, result_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(result_r)
            os.close(release_w)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                outcome: Any = ("ok", fn(*args))
            except BaseException as exc:
                outcome = ("error", f"{type(exc).__name__}: {exc}")
            with os.fdopen(result_w, "wb") as out:
                pickle.dump(outcome, out)
            os.read(release_r, 1)  # hold on to the connections until released
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(result_w)
    os.close(release_r)
    try:
        with os.fdopen(result_r, "rb") as inp:
            kind, value = pickle.load(inp)
        if kind == "error":
            raise AssertionError(f"child as uid {uid} failed: {value}")
        yield value
    finally:
        os.close(release_w)
        os.waitpid(pid, 0)


_held: list[socket.socket] = []  # the child's connections, kept open by as_user


def ping_over(sock: socket.socket, msgid: int = 1) -> tuple[bool, str]:
    """(answered, why not): one ping on ``sock``, or velod's reason for dropping it."""
    unsent = ""
    try:
        sock.sendall(protocol.encode_request(msgid, "system.ping"))
    except OSError as exc:  # velod refused and closed first: its reason may still be queued
        unsent = str(exc)
    unpacker = msgpack.Unpacker(raw=False)
    while True:
        try:
            data = sock.recv(65536)
        except OSError as exc:
            return False, unsent or str(exc)
        if not data:
            return False, unsent or "closed"
        unpacker.feed(data)
        for msg in unpacker:
            if msg[0] == protocol.RESPONSE:
                return True, ""
            if msg[0] == protocol.NOTIFICATION and msg[1] == "error":
                return False, msg[2][0]["message"]


def open_connections(path: str, count: int) -> dict[str, Any]:
    """Open up to ``count`` connections that each answer a ping, and keep them open.

    Returns the uid velod saw refused (if any) with its reasons, and how many got in.
    """
    refused: list[str] = []
    for i in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(path)
        ok, why = ping_over(sock, i)
        if ok:
            _held.append(sock)
        else:
            refused.append(why)
            sock.close()
    return {"uid": os.getuid(), "accepted": len(_held), "refused": refused}
