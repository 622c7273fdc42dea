"""Progress of a long velodctl command, drawn on stderr from the daemon's events.

The same whatever stdout is (a terminal, a pipe, ``--json``): on a terminal one bar redrawn
in place, elsewhere one plain line per step, so logs and CI show how far a command got.
Commands follow their progress events on a second connection (:class:`EventProgress`), so
the call on the first one stays a plain request and reply.
"""

import _socket
import contextlib
import sys
import threading
import time

TYPE_CHECKING = False  # like typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TextIO

BAR_WIDTH = 30


class ProgressView:
    """Draws steps on ``stream``: ``\\r``-redrawn on a terminal, else a line per step.

    ``min_interval`` thins out plain lines for commands whose steps come many times a
    second (the engine's); the last step (``fraction`` 1) is always written.
    """

    def __init__(self, stream: "TextIO", prefix: str, min_interval: float = 0.0) -> None:
        self.stream = stream
        self.prefix = prefix
        self.min_interval = min_interval
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last_line = float("-inf")
        self.drawn = False

    def draw(self, text: str, fraction: "float | None" = None) -> None:
        """Show one step; ``fraction`` (0..1) draws a bar on a terminal."""
        done = fraction is not None and fraction >= 1.0
        if self.tty:
            bar = ""
            if fraction is not None:
                filled = int(min(max(fraction, 0.0), 1.0) * BAR_WIDTH)
                bar = "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "] "
            self.stream.write(f"\r{bar}{text}\033[K")
            self.drawn = True
        else:
            now = time.monotonic()
            if now - self._last_line < self.min_interval and not done:
                return
            self._last_line = now
            self.stream.write(f"{self.prefix}: {text}\n")
        self.stream.flush()

    def finish(self) -> None:
        """End the bar's line (a terminal only), so what follows starts on its own line."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


class EventProgress:
    """Follows ``topics`` on a second connection and draws each event's data.

    ``render(data)`` gives (text, fraction) for the view, or None to skip the event. The
    last event's data stays in ``last`` (a benchmark's ID, say). Progress is a nicety: when
    the second connection cannot be made, the command runs without it.
    """

    def __init__(self, socket_path: str, topics: "list[str]",
                 render: "Callable[[dict[str, Any]], tuple[str, float | None] | None]",
                 view: ProgressView) -> None:
        from velod.control.client import Client, DaemonUnreachable, RemoteError

        self.view = view
        self.render = render
        self.last: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.client: Any = None
        try:
            client = Client.connect(socket_path, timeout=None)
        except DaemonUnreachable:
            return
        try:
            events = client.subscribe(topics)
        except (DaemonUnreachable, RemoteError, OSError):
            client.close()
            return
        self.client = client
        self.thread = threading.Thread(target=self._run, args=(events,), daemon=True)
        self.thread.start()

    def _run(self, events: "Any") -> None:
        try:
            for event in events:
                data = event.get("data") or {}
                drawn = self.render(data)
                with self._lock:
                    if self._closed:
                        return
                    self.last = data
                    if drawn is not None:
                        self.view.draw(*drawn)
        except Exception:  # the connection ends when the command does
            return

    def close(self) -> None:
        """Draw what already arrived, stop following and end the bar's line.

        The daemon sends a command's last progress event before its reply, so it is in
        this socket's buffer by now: shutting the socket down (not closing it) lets the
        reader take what is queued, then see the end.
        """
        if self.client is None or self._closed:
            return
        with contextlib.suppress(OSError):
            self.client.sock.shutdown(_socket.SHUT_RDWR)
        self.thread.join(timeout=1.0)
        with self._lock:
            self._closed = True
            with contextlib.suppress(OSError):
                self.client.close()
            self.view.finish()


def stderr_view(prefix: str, min_interval: float = 0.0) -> ProgressView:
    """A view on velodctl's stderr."""
    return ProgressView(sys.stderr, prefix, min_interval)
