"""One generation over HTTP, whatever the API: errors before the first byte, then the stream.

An API module describes its wire format with an :class:`Encoder` (a streamed token, the
streamed end, the whole non-streamed answer, an error met mid-stream); :func:`serve` runs
the request through ``EngineService.generate`` within ``http.request_timeout``. Errors that
come before the first event (bad field, model not loaded, queue full) are ordinary error
responses with their status; once a stream has begun, an error ends it with the API's own
error chunk. A client that disconnects cancels the handler, which aborts the sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from velod.engine.generation import GenerationResult, TokenEvent
from velod.errors import ServiceError
from velod.http.errors import HttpError

if TYPE_CHECKING:
    from aiohttp import web

    from velod.config import HttpConfig
    from velod.engine.generation import GenerationRequest
    from velod.engine.service import EngineService


class Encoder(Protocol):
    """An API's wire format for one generation."""

    content_type: str  # of a stream

    def token(self, event: TokenEvent) -> bytes | None: ...

    def end(self, result: GenerationResult) -> bytes: ...

    def whole(self, result: GenerationResult, events: list[TokenEvent]) -> dict[str, Any]: ...

    def error(self, error: HttpError) -> bytes: ...


@dataclass
class Api:
    """What every handler needs: the engine, the HTTP limits."""

    engine: Any  # EngineService, or None when the engine capability is missing
    config: HttpConfig

    def engine_or_503(self) -> EngineService:
        if self.engine is None:
            raise HttpError("unavailable", "this velod has no engine")
        return self.engine  # type: ignore[no-any-return]


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; HttpError (400, 413) saying what is wrong."""
    from aiohttp import web

    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise HttpError("too_large", "the request body is larger than http.max_body_size "
                        "allows") from None
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError("invalid_request", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpError("invalid_request", "the body must be a JSON object")
    return body


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    from aiohttp import web

    return web.Response(body=json.dumps(data, ensure_ascii=False).encode(), status=status,
                        content_type="application/json", headers=headers)


async def _events(api: Api, gen: GenerationRequest) -> AsyncIterator[Any]:
    """The engine's events with its refusals turned into HttpError."""
    events = api.engine_or_503().generate(gen)
    try:
        while True:
            try:
                event = await events.__anext__()
            except StopAsyncIteration:
                return
            except ServiceError as exc:
                raise HttpError.from_service(exc, float(api.config.retry_after)) from None
            yield event
    finally:
        await events.aclose()


async def serve(request: web.Request, api: Api, gen: GenerationRequest, *, stream: bool,
                encoder: Encoder) -> web.StreamResponse:
    """Run ``gen`` and answer ``request`` with ``encoder``'s format (streamed or whole)."""

    timeout = float(api.config.request_timeout)
    response: web.StreamResponse | None = None
    collected: list[TokenEvent] = []
    try:
        async with asyncio.timeout(timeout), contextlib.aclosing(_events(api, gen)) as events:
            async for event in events:
                if isinstance(event, GenerationResult):
                    if event.finish_reason == "error":
                        raise HttpError("internal", f"generation failed: {event.error}")
                    if response is None and not stream:
                        return json_response(encoder.whole(event, collected))
                    if response is None:
                        response = await _open(request, encoder)
                    await response.write(encoder.end(event))
                    await response.write_eof()
                    return response
                if not stream:
                    collected.append(event)
                    continue
                if response is None:
                    response = await _open(request, encoder)
                chunk = encoder.token(event)
                if chunk:
                    await response.write(chunk)
    except TimeoutError:
        error = HttpError("timeout", f"the request took longer than {timeout:g}s "
                          "(http.request_timeout); its generation was aborted")
        if response is None:
            raise error from None
        await _fail_stream(response, encoder, error)
        return response
    except HttpError as error:
        if response is None:
            raise
        await _fail_stream(response, encoder, error)
        return response
    raise HttpError("internal", "the generation ended without a result")


async def _open(request: web.Request, encoder: Encoder) -> web.StreamResponse:
    from aiohttp import web

    response = web.StreamResponse(headers={"Content-Type": encoder.content_type,
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


async def _fail_stream(response: web.StreamResponse, encoder: Encoder, error: HttpError) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await response.write(encoder.error(error))
        await response.write_eof()
