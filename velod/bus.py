"""In-process publish/subscribe of events between components and to clients."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("velod.bus")


@dataclass(frozen=True)
class Event:
    """One published event: a dotted topic such as ``hardware.changed`` and a map."""

    topic: str
    data: dict[str, Any]
    seq: int
    time: float = field(default_factory=time.time)

    def to_wire(self) -> dict[str, Any]:
        """The map sent to ``events.subscribe`` clients."""
        return {"topic": self.topic, "seq": self.seq, "time": self.time, "data": self.data}


Callback = Callable[[Event], None]


def topic_matches(pattern: str, topic: str) -> bool:
    """True when ``pattern`` selects ``topic``: exact, ``*`` (all) or a ``prefix.*``."""
    if pattern in ("*", topic):
        return True
    return pattern.endswith(".*") and topic.startswith(pattern[:-1])


class Bus:
    """Synchronous fan-out: callbacks run inside ``publish`` and must not block."""

    def __init__(self) -> None:
        self._subs: dict[int, tuple[tuple[str, ...], Callback]] = {}
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)

    def subscribe(self, patterns: Iterable[str], callback: Callback) -> Callable[[], None]:
        """Register ``callback`` for topics matching ``patterns``; returns an unsubscribe."""
        sub_id = next(self._ids)
        self._subs[sub_id] = (tuple(patterns), callback)
        return lambda: self._subs.pop(sub_id, None)

    def publish(self, topic: str, data: dict[str, Any] | None = None) -> Event:
        """Deliver an event to every matching subscriber; a failing callback is logged."""
        event = Event(topic, data or {}, next(self._seq))
        for patterns, callback in list(self._subs.values()):
            if any(topic_matches(p, topic) for p in patterns):
                try:
                    callback(event)
                except Exception:
                    log.exception("event subscriber failed on %s", topic)
        return event

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)
