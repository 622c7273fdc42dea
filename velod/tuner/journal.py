"""Where the tuner's decisions go: the append-only history and the ``tuner.decision`` event.

Shared by the tuner's loop, its applier's callers and the closed loop, so every decision is
recorded and announced the same way, and ``last`` is what ``velodctl status`` shows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from velod.tuner.applier import Outcome
from velod.tuner.history import History

EVENT = "tuner.decision"


def plain(obj: Any) -> Any:
    """Tuples to lists, recursively, so events and replies are plain msgpack/JSON data."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj


class Journal:
    """Records outcomes in ``history`` and publishes them; keeps the last one."""

    def __init__(self, history: History, publish: Callable[[str, dict[str, Any]], Any],
                 log: logging.Logger) -> None:
        self.history = history
        self._publish = publish
        self.log = log
        self.last: dict[str, Any] | None = None

    def record(self, outcome: Outcome) -> Outcome:
        """Append ``outcome`` to the history, then announce it."""
        try:
            self.history.append(outcome.decision, message=outcome.message, **outcome.details)
        except OSError as exc:
            self.log.error("cannot write the tuner history: %s", exc)
        self.announce(outcome)
        return outcome

    def announce(self, outcome: Outcome) -> None:
        """Log and publish ``outcome`` (already in the history, or not meant for it)."""
        data = plain(outcome.to_dict())
        data["time"] = time.time()
        self.last = data
        log = self.log.warning if outcome.decision in ("rolled-back", "error") else self.log.info
        log("%s: %s", outcome.decision, outcome.message)
        self._publish(EVENT, data)
