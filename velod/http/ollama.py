"""Ollama-compatible API: ``/api/generate``, ``/api/chat``, ``/api/tags``, ``/api/ps``,
``/api/show``, ``/api/version``.

Field names and units are Ollama's (``docs/api.md``): NDJSON streaming by default
(``"stream": false`` for one object), ``options`` (``num_predict``, ``temperature``,
``top_k``, ``top_p``, ``min_p``, ``seed``, ``stop``, ``repeat_penalty``, ``repeat_last_n``,
...; options that tune Ollama's own runner, such as ``num_ctx``, are accepted and ignored),
durations in nanoseconds. As in Ollama, ``eval_count`` is every generated token and
``eval_duration`` runs from the first to the last; ``prompt_eval_duration`` from queueing
to the first token. ``/api/generate`` wraps the prompt in the chat template unless ``raw``.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from velod import __version__
from velod.engine.generation import GenerationRequest, GenerationResult, TokenEvent
from velod.http.errors import HttpError, ollama_body
from velod.http.exchange import Api, json_response, read_json, serve
from velod.http.params import request_error, sampling_params

if TYPE_CHECKING:
    from aiohttp import web

    from velod.engine.served import ServedModel

# Ollama option -> SamplingParams field.
_OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_k": "top_k",
            "top_p": "top_p", "min_p": "min_p", "seed": "seed", "stop": "stop",
            "repeat_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty", "repeat_last_n": "penalty_window"}
_UNSUPPORTED = ("images", "format", "tools", "suffix", "template", "context")


def routes(api: Api) -> list[Any]:
    from aiohttp import web

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        served = _served(api, body)
        if not body.get("prompt") and not body.get("system"):
            # Ollama's way to load a model: an empty prompt answers at once.
            return json_response({"model": served.name, "created_at": _now(),
                                  "response": "", "done": True, "done_reason": "load"})
        gen = generate_request(body, served)
        return await serve(request, api, gen, stream=_stream(body),
                           encoder=_Encoder(body["model"], chat=False))

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        served = _served(api, body)
        gen = chat_request(body, served)
        return await serve(request, api, gen, stream=_stream(body),
                           encoder=_Encoder(body["model"], chat=True))

    async def tags(request: web.Request) -> web.StreamResponse:
        served = api.engine_or_503().served
        return json_response({"models": [] if served is None else [_entry(served)]})

    async def ps(request: web.Request) -> web.StreamResponse:
        engine = api.engine_or_503()
        served = engine.served
        if served is None:
            return json_response({"models": []})
        until = time.time() + float(engine.config.engine.idle_release)
        return json_response({"models": [{
            **_entry(served), "expires_at": _iso(until), "size_vram": 0}]})

    async def show(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if "model" not in body and "name" in body:  # the older field name
            body["model"] = body["name"]
        served = _served(api, body)
        return json_response(show_body(served))

    async def version(request: web.Request) -> web.StreamResponse:
        return json_response({"version": __version__})

    return [web.post("/api/generate", generate), web.post("/api/chat", chat),
            web.get("/api/tags", tags), web.get("/api/ps", ps), web.post("/api/show", show),
            web.get("/api/version", version)]


def error_response(error: HttpError) -> web.Response:
    headers = {"Retry-After": f"{error.retry_after:g}"} if error.retry_after else None
    return json_response(ollama_body(error), error.status, headers)


def _served(api: Api, body: dict[str, Any]) -> ServedModel:
    from velod.errors import ServiceError

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise HttpError("invalid_params", "model is required", "model")
    try:
        return api.engine_or_503().model_for(model)
    except ServiceError as exc:
        if exc.code == "not_found":  # Ollama's words, so its clients recognise them
            raise HttpError("not_found", f"model '{model}' not found (loaded: "
                            f"{api.engine.served.name})", "model") from None
        raise HttpError.from_service(exc, float(api.config.retry_after)) from None


def _stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise HttpError("invalid_params", "stream must be true or false", "stream")
    return stream


def _check_supported(body: dict[str, Any]) -> None:
    for name in _UNSUPPORTED:
        if body.get(name):
            raise HttpError("invalid_params", f"{name} is not supported by velod's engine",
                            name)


def _sampling(body: dict[str, Any]) -> Any:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise HttpError("invalid_params", "options must be an object", "options")
    renamed = {field: options[name] for name, field in _OPTIONS.items()
               if options.get(name) is not None}
    limit = renamed.get("max_tokens")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit < 0:
        del renamed["max_tokens"]  # -1: no limit, -2: fill the context
    if isinstance(renamed.get("stop"), str):
        renamed["stop"] = [renamed["stop"]]
    return sampling_params(renamed)


def generate_request(body: dict[str, Any], served: ServedModel) -> GenerationRequest:
    """An /api/generate body as a GenerationRequest (HttpError naming a bad field)."""
    _check_supported(body)
    prompt, system = body.get("prompt") or "", body.get("system")
    if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
        raise HttpError("invalid_params", "prompt and system must be strings", "prompt")
    sampling = _sampling(body)
    try:
        if body.get("raw"):
            return GenerationRequest(prompt=prompt, model=served.name, sampling=sampling)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return GenerationRequest(messages=messages, model=served.name, sampling=sampling)
    except ValueError as exc:
        raise request_error(exc) from None


def chat_request(body: dict[str, Any], served: ServedModel) -> GenerationRequest:
    """An /api/chat body as a GenerationRequest (HttpError naming a bad field)."""
    _check_supported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError("invalid_params", "messages must be a non-empty array", "messages")
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("images"):
            raise HttpError("invalid_params", "images are not supported by velod's engine",
                            f"messages[{i}].images")
    try:
        return GenerationRequest(messages=messages, model=served.name, sampling=_sampling(body))
    except ValueError as exc:
        raise request_error(exc) from None


def _now() -> str:
    return _iso(time.time())


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _details(served: ServedModel) -> dict[str, Any]:
    info = served.describe()
    arch = info.get("architecture")
    params = info.get("weights", {}).get("parameters")
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
            "parameter_size": _count(params) if params else "",
            "quantization_level": info.get("quantization") or ""}


def _entry(served: ServedModel) -> dict[str, Any]:
    info = served.describe()
    size = info.get("weights", {}).get("file_bytes") or 0
    return {"name": served.name, "model": served.name, "modified_at": _iso(served.loaded_at),
            "size": size, "digest": (info.get("digest") or "").removeprefix("sha256:"),
            "details": _details(served)}


def show_body(served: ServedModel) -> dict[str, Any]:
    """/api/show: details and ``model_info`` with the GGUF's own key names."""
    info = served.describe()
    arch = info["architecture"]
    model_info: dict[str, Any] = {
        "general.architecture": arch, "general.name": info.get("display_name"),
        f"{arch}.block_count": info["layers"], f"{arch}.embedding_length": info["hidden"],
        f"{arch}.context_length": info["context_length"],
        f"{arch}.attention.head_count": info["heads"],
        f"{arch}.attention.head_count_kv": info["kv_heads"],
        f"{arch}.attention.key_length": info["head_dim"],
        f"{arch}.attention.value_length": info["head_dim"],
        f"{arch}.vocab_size": info["vocab_size"]}
    if info.get("sliding_window"):
        model_info[f"{arch}.attention.sliding_window"] = info["sliding_window"]
    return {"modelfile": f"FROM {served.name}\n", "parameters": "",
            "template": served.template.source or served.template.name,
            "details": _details(served), "model_info": model_info,
            "capabilities": ["completion"], "modified_at": _iso(served.loaded_at)}


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return str(n)


def _ns(seconds: float | None) -> int:
    return int((seconds or 0.0) * 1e9)


class _Encoder:
    """NDJSON chunks of /api/generate (``response``) or /api/chat (``message``)."""

    content_type = "application/x-ndjson"

    def __init__(self, model: str, *, chat: bool) -> None:
        self.model = model
        self.chat = chat

    def _piece(self, text: str) -> dict[str, Any]:
        if self.chat:
            return {"message": {"role": "assistant", "content": text}}
        return {"response": text}

    def _line(self, data: dict[str, Any]) -> bytes:
        return json.dumps(data, ensure_ascii=False).encode() + b"\n"

    def token(self, event: TokenEvent) -> bytes | None:
        if not event.text:
            return None
        return self._line({"model": self.model, "created_at": _now(),
                           **self._piece(event.text), "done": False})

    def _final(self, result: GenerationResult, text: str) -> dict[str, Any]:
        t = result.timings
        return {"model": self.model, "created_at": _now(), **self._piece(text), "done": True,
                "done_reason": "length" if result.finish_reason == "length" else "stop",
                "total_duration": _ns(t.total_s), "load_duration": 0,
                "prompt_eval_count": result.prompt_tokens,
                "prompt_eval_duration": _ns(t.prompt_eval_s),
                "eval_count": result.completion_tokens, "eval_duration": _ns(t.eval_s)}

    def end(self, result: GenerationResult) -> bytes:
        return self._line(self._final(result, ""))

    def whole(self, result: GenerationResult, events: list[TokenEvent]) -> dict[str, Any]:
        return self._final(result, result.text)

    def error(self, error: HttpError) -> bytes:
        return self._line(ollama_body(error))
