"""HTTP with bounds, shared by the backends' clients: one request, a bounded body, lines.

A server velod tunes is local but not trusted to be sane: every body is read up to a limit
and every failure becomes the kind's own error class (``Errors``), with a message that names
the server, the request and what went wrong.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from velod.tuner.backends.base import (
    ServerBadResponse,
    ServerHTTPError,
    ServerTimeout,
    ServerUnreachable,
)


class SessionClient:
    """One aiohttp session to one server at ``base_url``, opened on first use;
    ``close()`` (or ``async with``) when done."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session: Any = None

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session


@dataclass(frozen=True)
class Errors:
    """How one kind of server is named in messages, and its error classes."""

    who: str  # "Ollama", "llama-server"
    timeout: type[ServerTimeout] = ServerTimeout
    unreachable: type[ServerUnreachable] = ServerUnreachable
    bad: type[ServerBadResponse] = ServerBadResponse
    hint: str = "is it running?"  # what to check when nothing answers
    http: type[ServerHTTPError] = ServerHTTPError

    def connection(self, exc: Exception, base_url: str, where: str,
                   streaming: bool = False) -> ServerUnreachable:
        """The error for an aiohttp or OS failure of ``where`` (connect, reset, ...);
        ``streaming``: the answer had begun."""
        import aiohttp

        if isinstance(exc, aiohttp.ClientConnectorError):
            return self.unreachable(f"cannot connect to {self.who} at {base_url}: "
                                    f"{exc.os_error or exc} — {self.hint}")
        what = exc or type(exc).__name__
        if streaming:
            return self.unreachable(f"{self.who} stopped answering {where} mid-answer: {what}")
        return self.unreachable(f"{where} failed: {what}")

    def status_error(self, where: str, status: int, detail: str) -> ServerHTTPError:
        """The error for an error ``status`` answered to ``where`` (``detail``: the message
        of the server's error body)."""
        return self.http(f"{self.who} answered {where} with HTTP {status}: {detail}", status)

    def decode_json(self, text: str, where: str) -> Any:
        """The JSON of an answer to ``where``; the bad-response error when it is not JSON."""
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise self.bad(f"{self.who} answered {where} with non-JSON: "
                           f"{excerpt(text)}") from None


def excerpt(value: Any, limit: int = 120) -> str:
    """``value`` (or its repr) on one line, cut to ``limit`` characters, for a message."""
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def is_count(value: Any) -> bool:
    """True for a JSON integer >= 0 (not a boolean)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def opt_str(value: Any) -> str | None:
    """A non-empty JSON string, else None."""
    return value if isinstance(value, str) and value else None


async def fetch(session: Any, method: str, url: str, base_url: str, errors: Errors, *,
                body: Any = None, timeout: float, max_bytes: int) -> tuple[int, str]:
    """(status, text) of one request, the body read up to ``max_bytes``."""
    import aiohttp

    where = f"{method} {url}"
    try:
        async with asyncio.timeout(timeout):
            async with session.request(method, url, json=body) as resp:
                raw = await read_bounded(resp, max_bytes, where, errors)
                return resp.status, raw.decode("utf-8", "replace")
    except TimeoutError:
        raise errors.timeout(f"{errors.who} did not answer {where} within {timeout:g}s"
                             ) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise errors.connection(exc, base_url, where) from None


async def read_bounded(resp: Any, limit: int, where: str, errors: Errors) -> bytes:
    """The body of ``resp``, or the kind's bad-response error as soon as it passes
    ``limit`` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        raise errors.bad(f"{errors.who}'s answer to {where} is {resp.content_length} bytes, "
                         f"more than velod reads ({limit} bytes)")
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise errors.bad(f"{errors.who}'s answer to {where} is longer than velod reads "
                             f"({limit} bytes); stopped reading it")
    return bytes(body)


async def read_lines(resp: Any, limit: int, where: str, errors: Errors
                     ) -> AsyncIterator[bytes]:
    """The lines of a streamed body as they arrive; the kind's bad-response error for a
    line longer than ``limit`` (aiohttp's own line reader stops at 128 KiB, which a long
    final chunk passes)."""
    buffer = bytearray()
    async for chunk in resp.content.iter_any():
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            yield bytes(buffer[start:end])
            start = end + 1
        del buffer[:start]
        if len(buffer) > limit:
            raise errors.bad(f"{errors.who} streamed a line longer than velod reads "
                             f"({limit} bytes) in its answer to {where}")
    if buffer:
        yield bytes(buffer)
