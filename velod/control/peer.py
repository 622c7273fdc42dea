"""Who is on the other end of a Unix socket, and may they change things?"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct

from velod.control.registry import Peer

_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the connected peer, from SO_PEERCRED."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _process_groups(pid: int) -> set[int]:
    """Supplementary groups of a live process, from /proc (empty when unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def is_admin(pid: int, uid: int, gid: int, admin_group: str) -> bool:
    """Root, the daemon's own user, or a member of ``admin_group`` (primary or supplementary)."""
    if uid in (0, os.geteuid()):
        return True
    try:
        group = grp.getgrnam(admin_group)
    except KeyError:
        return False
    if gid == group.gr_gid or group.gr_gid in _process_groups(pid):
        return True
    try:
        return pwd.getpwuid(uid).pw_name in group.gr_mem
    except KeyError:
        return False


def identify(sock: socket.socket, admin_group: str) -> Peer:
    pid, uid, gid = peer_credentials(sock)
    return Peer(pid=pid, uid=uid, gid=gid, admin=is_admin(pid, uid, gid, admin_group))
