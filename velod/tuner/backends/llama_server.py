"""An async HTTP client for llama.cpp's llama-server, and the plain state the tuner reads.

Endpoints (llama.cpp ``tools/server/README.md``): ``/health`` (200 ``{"status": "ok"}``,
503 while the model loads), ``/props`` (slots, per-slot context, model path, build),
``/slots`` (each slot's context and whether it is working; 501 with ``--no-slots``),
``/metrics`` (Prometheus text; 501 unless ``--metrics``), and the streaming ``/completion``
(Server-Sent Events; the last event carries ``timings``). Every failure is a
:class:`~velod.tuner.backends.base.ServerError` whose message names the server and what went
wrong; replies are bounded in size.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from velod.model.names import normalize_name
from velod.tuner.backends.base import (
    ServerBadResponse,
    ServerError,
    ServerHTTPError,
    ServerUnreachable,
)
from velod.tuner.backends.http import (
    Errors,
    SessionClient,
    excerpt,
    fetch,
    is_count,
    opt_str,
    read_bounded,
    read_lines,
)
from velod.tuner.state import LoadedModel, ModelInfo

MAX_REPLY = 8 * 1024**2  # /props carries the chat template; nothing sane is larger
MAX_EVENT = 1024**2  # one streamed event
ERRORS = Errors("llama-server", hint="is it running? (see the url of this server in "
                "velod's llama_server config)")


@dataclass(frozen=True)
class Slot:
    """One server slot per ``/slots``: its context, whether it works, its last task."""

    id: int
    n_ctx: int
    processing: bool
    task: int | None


@dataclass(frozen=True)
class LlamaServerState:
    """What one poll of llama-server saw; ``reachable=False`` carries ``error``.

    ``models`` holds the one served model (its GGUF read for shape and size); ``loaded`` is
    empty: llama-server holds its model from start to stop.
    """

    version: str | None
    models: list[ModelInfo] = field(default_factory=list)
    loaded: list[LoadedModel] = field(default_factory=list)
    reachable: bool = True
    error: str | None = None
    model_path: str | None = None
    alias: str | None = None
    total_slots: int | None = None
    slot_context: int | None = None  # cells each slot may fill (llama.cpp's n_ctx_seq)
    slots: list[Slot] | None = None  # None: /slots is disabled
    metrics: dict[str, float] | None = None  # None: /metrics is disabled

    def model(self, name: str) -> ModelInfo | None:
        """The served model when ``name`` names it (alias, file name or path)."""
        wanted = normalize_name(name)
        for m in self.models:
            names = {m.name, self.alias or "", self.model_path or "",
                     Path(self.model_path or "").name, Path(self.model_path or "").stem}
            if wanted in {normalize_name(n) for n in names if n} or name in names:
                return m
        return None

    @property
    def busy(self) -> bool:
        """True while a slot works on a request."""
        if self.slots is not None:
            return any(s.processing for s in self.slots)
        return bool((self.metrics or {}).get("llamacpp:requests_processing"))

    def activity_marker(self) -> Any:
        """Something that changes whenever a client uses the server."""
        tasks = tuple((s.id, s.task, s.processing) for s in self.slots or [])
        metrics = self.metrics or {}
        counters = tuple(metrics.get(k) for k in ("llamacpp:tokens_predicted_total",
                                                  "llamacpp:prompt_tokens_total"))
        return (tasks, counters)


class LlamaServerClient(SessionClient):
    """One aiohttp session to one llama-server; ``close()`` when done."""

    async def get(self, path: str, *, as_text: bool = False,
                  timeout: float | None = None) -> Any:
        """GET ``path``; the decoded JSON (or text); a ServerError on failure."""
        url = f"{self.base_url}{path}"
        status, text = await fetch(self._get_session(), "GET", url, self.base_url, ERRORS,
                                   max_bytes=MAX_REPLY,
                                   timeout=self.timeout if timeout is None else timeout)
        if status >= 400:
            raise ERRORS.status_error(f"GET {url}", status, error_detail(text))
        if as_text:
            return text
        return ERRORS.decode_json(text, f"GET {url}")

    # ------------------------------------------------------------------ endpoints
    async def health(self) -> str:
        """``ok`` when the model is loaded; ServerHTTPError 503 while it loads."""
        data = await self.get("/health")
        if not isinstance(data, dict) or data.get("status") != "ok":
            raise ServerBadResponse(f"llama-server /health answered {excerpt(data)}")
        return "ok"

    async def props(self) -> dict[str, Any]:
        data = await self.get("/props")
        if not isinstance(data, dict):
            raise ServerBadResponse("llama-server /props did not return a JSON object")
        return data

    async def slots(self) -> list[Slot] | None:
        """Each slot's state; None when the server runs with ``--no-slots``."""
        try:
            data = await self.get("/slots")
        except ServerHTTPError as exc:
            if exc.status == 501:
                return None
            raise
        if not isinstance(data, list) or not all(isinstance(s, dict) for s in data):
            raise ServerBadResponse(f"llama-server /slots is not a list of slots: "
                                    f"{excerpt(data)}")
        return [parse_slot(s) for s in data]

    async def metrics(self) -> dict[str, float] | None:
        """The Prometheus samples of ``/metrics``; None unless started with ``--metrics``."""
        try:
            text = await self.get("/metrics", as_text=True)
        except ServerHTTPError as exc:
            if exc.status == 501:
                return None
            raise
        return parse_metrics(text)

    async def fetch_state(self) -> LlamaServerState:
        """Health, properties, slots and metrics in one snapshot (the model's GGUF is read
        by the caller: it is file I/O)."""
        await self.health()
        props = await self.props()
        settings = props.get("default_generation_settings")
        slot_context = settings.get("n_ctx") if isinstance(settings, dict) else None
        total = props.get("total_slots")
        metrics = await self.metrics() if props.get("endpoint_metrics") else None
        slots = await self.slots() if props.get("endpoint_slots", True) else None
        path = props.get("model_path")
        alias = props.get("model_alias")
        return LlamaServerState(
            version=opt_str(props.get("build_info")), model_path=opt_str(path),
            alias=opt_str(alias), total_slots=total if is_count(total) else None,
            slot_context=slot_context if is_count(slot_context) else None,
            slots=slots, metrics=metrics)

    async def completion_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST ``/completion`` with streaming; yield each event's data as it arrives.

        The caller bounds the time; the last event has ``stop: true`` and ``timings``. A
        connection that ends before it is a ServerUnreachable, an error status or error
        event a ServerHTTPError, an event over 1 MiB a ServerBadResponse.
        """
        import aiohttp

        url = f"{self.base_url}/completion"
        where = f"POST {url}"
        try:
            async with self._get_session().post(url, json={**body, "stream": True}) as resp:
                if resp.status >= 400:
                    raw = await read_bounded(resp, MAX_REPLY, where, ERRORS)
                    raise ERRORS.status_error(where, resp.status,
                                              error_detail(raw.decode("utf-8", "replace")))
                async for line in read_lines(resp, MAX_EVENT, where, ERRORS):
                    event = _sse_data(line, url)
                    if event is None:
                        continue
                    if isinstance(event.get("error"), dict | str):
                        raise ServerHTTPError(f"llama-server stopped generating: "
                                              f"{error_detail(json.dumps(event))}", resp.status)
                    yield event
                    if event.get("stop") is True:
                        return
            raise ServerUnreachable(f"llama-server ended the answer to {where} before it "
                                    "was done")
        except (aiohttp.ClientError, OSError) as exc:
            raise ERRORS.connection(exc, self.base_url, where, streaming=True) from None


def _sse_data(line: bytes, url: str) -> dict[str, Any] | None:
    """The JSON object of a Server-Sent Events ``data:`` line; None for other lines."""
    text = line.decode("utf-8", "replace").strip()
    if not text.startswith("data:"):
        return None  # blank separators, comments, other fields
    payload = text[5:].strip()
    if payload == "[DONE]":
        return None
    try:
        event = json.loads(payload)
    except (ValueError, RecursionError):
        raise ServerBadResponse(f"llama-server streamed non-JSON from {url}: "
                                f"{excerpt(payload)}") from None
    if not isinstance(event, dict):
        raise ServerBadResponse(f"llama-server streamed a non-object from {url}")
    return event


def parse_slot(entry: dict[str, Any]) -> Slot:
    """One ``/slots`` entry; ServerBadResponse when it lacks id or n_ctx."""
    sid, n_ctx = entry.get("id"), entry.get("n_ctx")
    if not is_count(sid) or not is_count(n_ctx):
        raise ServerBadResponse(f"llama-server /slots entry lacks id/n_ctx: {excerpt(entry)}")
    task = entry.get("id_task")
    return Slot(id=sid, n_ctx=n_ctx, processing=entry.get("is_processing") is True,
                task=task if isinstance(task, int) and not isinstance(task, bool) else None)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {sample name: value} (labels kept in the name)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.rpartition(" ")
        try:
            out[name.strip()] = float(rest)
        except ValueError:
            continue
    return out


def error_detail(text: str) -> str:
    """The message of llama-server's error JSON (``{"error": {"message": ...}}``)."""
    try:
        data = json.loads(text)
    except ValueError:
        return excerpt(text) or "(empty body)"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    return excerpt(text)


__all__ = ["LlamaServerClient", "LlamaServerState", "ServerError", "Slot"]
