"""Who may open one more connection: a cap per user and room kept for administrators.

Without these, 64 idle connections from any one user lock everyone out, root included.
"""

from __future__ import annotations

from collections import Counter

from velod.config import ControlConfig
from velod.control.registry import Peer


class ConnectionQuota:
    """Counts open connections per uid and decides whether a new peer gets one."""

    def __init__(self) -> None:
        self.by_uid: Counter[int] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_uid.values())

    def refusal(self, peer: Peer, limits: ControlConfig) -> str | None:
        """Why ``peer`` may not open another connection now, or None when it may.

        Every uid, root included, is held to ``max_connections_per_uid``; peers that are
        not administrators also leave the last ``admin_reserved_connections`` free, so
        root, velod's own user and the admin group can always get in.
        """
        total = self.total
        if total >= limits.max_connections:
            return f"too many connections (max {limits.max_connections})"
        reserve = limits.admin_reserved_connections
        if not peer.admin and total >= limits.max_connections - reserve:
            return (f"too many connections (max {limits.max_connections}; the last {reserve} "
                    "are kept for administrators)")
        if self.by_uid[peer.uid] >= limits.max_connections_per_uid:
            return (f"too many connections from uid {peer.uid} "
                    f"(max {limits.max_connections_per_uid} per user)")
        return None

    def add(self, peer: Peer) -> None:
        self.by_uid[peer.uid] += 1

    def remove(self, peer: Peer) -> None:
        self.by_uid[peer.uid] -= 1
        if self.by_uid[peer.uid] <= 0:
            del self.by_uid[peer.uid]
