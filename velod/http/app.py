"""The aiohttp application: routes of both APIs, /health, /metrics, and the edge rules.

Middlewares, outermost first: stop the connection's idle clock while a request is served
(``velod.http.connections``); count every request by endpoint and status (metrics) and turn
any refusal into the error shape of the API it was addressed to (``/v1/*`` OpenAI's,
``/api/*`` Ollama's, plain JSON elsewhere); then the bearer token when one is configured
(``/health`` stays open); then the limit on requests served at once (503 + Retry-After).
Bodies beyond ``http.max_body_size`` are refused by aiohttp (413) before they are read.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from velod.http import ollama, openai
from velod.http.errors import HttpError
from velod.http.exchange import Api, json_response

if TYPE_CHECKING:
    from aiohttp import web

    from velod.http.connections import ConnectionGate
    from velod.http.metrics import Metrics

Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]
OPEN_PATHS = frozenset({"/health"})


def build_app(api: Api, metrics: Metrics, api_key: str | None,
              gate: ConnectionGate) -> web.Application:
    """The application serving ``api`` (the engine, limits) with ``metrics``; ``gate`` is
    told while each request is served (its idle clock stops)."""
    from aiohttp import web

    state = {"in_flight": 0}

    @web.middleware
    async def serving(request: web.Request, handler: Handler) -> web.StreamResponse:
        with gate.serving(request.transport):
            return await handler(request)

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except HttpError as error:
            response = _error_response(request.path, error)
        except web.HTTPException as exc:  # unknown route, wrong method, body too large
            code = {404: "not_found", 405: "method", 413: "too_large"}.get(exc.status,
                                                                            "invalid_request")
            message = (f"no endpoint {request.method} {request.path}" if exc.status == 404
                       else exc.text or exc.reason)
            response = _error_response(request.path, HttpError(code, message))
            response.set_status(exc.status)
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "unmatched"
        metrics.http_requests.labels(endpoint, str(response.status)).inc()
        return response

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if api_key is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                     api_key.encode()):
                raise HttpError("unauthorized", "a valid API key is needed: send "
                                "'Authorization: Bearer <key>' (http.api_key_file)")
        return await handler(request)

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        if state["in_flight"] >= api.config.max_requests:
            raise HttpError("busy", f"velod is serving {api.config.max_requests} requests "
                            "(http.max_requests); retry shortly",
                            retry_after=float(api.config.retry_after))
        state["in_flight"] += 1
        try:
            return await handler(request)
        finally:
            state["in_flight"] -= 1

    async def health(request: web.Request) -> web.StreamResponse:
        engine = api.engine
        served = engine.served if engine is not None else None
        return json_response({"status": "ok", "model": served.name if served else None,
                              "engine": engine.report()["state"] if engine else None})

    async def scrape(request: web.Request) -> web.StreamResponse:
        from velod.http.metrics import CONTENT_TYPE

        body = await metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    app = web.Application(middlewares=[serving, errors, auth, limit],
                          client_max_size=int(api.config.max_body_size))
    app.router.add_routes([*openai.routes(api), *ollama.routes(api),
                           web.get("/health", health), web.get("/metrics", scrape)])
    return app


def _error_response(path: str, error: HttpError) -> web.Response:
    if path.startswith("/v1/"):
        return openai.error_response(error)
    if path.startswith("/api/"):
        return ollama.error_response(error)
    headers: Any = {"Retry-After": f"{error.retry_after:g}"} if error.retry_after else None
    return json_response({"error": error.message, "code": error.code}, error.status, headers)
