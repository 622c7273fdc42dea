"""Stop strings in streamed text: hold back what may start one, cut at the first match."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Feeds generated text through; emits only text that can no longer be part of a stop.

    Text that ends with the beginning of a stop string is held back until the next piece
    decides it; at the first stop string to complete the text is cut before it, and the
    stop string itself is never emitted.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the text

    @property
    def stopped(self) -> bool:
        """True once a stop string has been found (feed returns nothing more)."""
        return self.matched is not None

    def feed(self, text: str) -> str:
        """The part of ``held + text`` that is safe to emit now."""
        if self.stopped:
            return ""
        buffer = self._held + text
        # The stop that completes first wins (generation would have ended there), however
        # the text was cut into pieces; of two ending together, the longer.
        best: tuple[int, int] | None = None
        for stop in self.stops:
            at = buffer.find(stop)
            if at >= 0 and (best is None or (at + len(stop), at) < best):
                best, self.matched = (at + len(stop), at), stop
        if best is not None:
            self._held = ""
            return buffer[:best[1]]
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """At the end of generation: the held-back text (it did not become a stop)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest end of ``buffer`` that a stop string begins with."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
