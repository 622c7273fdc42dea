"""OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Field names, defaults and shapes follow OpenAI's API reference (and llama-server where OpenAI
is silent): ``stream`` as server-sent events ending with ``data: [DONE]``, ``usage`` (also
streamed with ``stream_options.include_usage``), ``stop``, ``max_tokens`` /
``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, ``logprobs``; ``n`` other
than 1 is refused. Sampling fields OpenAI lacks but llama-server takes (``top_k``,
``min_p``, ``repeat_penalty``) are accepted; unknown fields are ignored, as OpenAI's clients
send many.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from velod.engine.generation import GenerationRequest, GenerationResult, TokenEvent
from velod.http.errors import HttpError, openai_body
from velod.http.exchange import Api, json_response, read_json, serve
from velod.http.params import request_error, sampling_params

if TYPE_CHECKING:
    from aiohttp import web

    from velod.engine.served import ServedModel

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_COMPLETION_LOGPROBS = 5

# OpenAI name -> SamplingParams field.
_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "seed": "seed",
             "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
             "top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repetition_penalty",
             "ignore_eos": "ignore_eos"}


def routes(api: Api) -> list[Any]:
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        return await _completion(request, api, chat=True)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await _completion(request, api, chat=False)

    async def models(request: web.Request) -> web.StreamResponse:
        engine = api.engine_or_503()
        served = engine.served
        data = [] if served is None else [{"id": served.name, "object": "model",
                                           "created": int(served.loaded_at),
                                           "owned_by": "velod"}]
        return json_response({"object": "list", "data": data})

    return [web.post("/v1/chat/completions", chat), web.post("/v1/completions", completions),
            web.get("/v1/models", models)]


def error_response(error: HttpError) -> web.Response:
    headers = {"Retry-After": f"{error.retry_after:g}"} if error.retry_after else None
    return json_response(openai_body(error), error.status, headers)


async def _completion(request: web.Request, api: Api, *, chat: bool) -> web.StreamResponse:
    body = await read_json(request)
    served = _served(api, body.get("model"))
    gen = chat_request(body, served) if chat else completion_request(body, served)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HttpError("invalid_params", "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise HttpError("invalid_params", "stream_options must be an object", "stream_options")
    encoder = _Encoder(served, chat=chat, include_usage=bool(options.get("include_usage")),
                       top_logprobs=_top_logprobs(body, chat),
                       model=body.get("model") or served.name)
    return await serve(request, api, gen, stream=stream, encoder=encoder)


def _served(api: Api, model: Any) -> ServedModel:
    from velod.errors import ServiceError

    if model is not None and not isinstance(model, str):
        raise HttpError("invalid_params", "model must be a string", "model")
    try:
        return api.engine_or_503().model_for(model)
    except ServiceError as exc:
        raise HttpError.from_service(exc, float(api.config.retry_after)) from None


def _check_n(body: dict[str, Any]) -> None:
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise HttpError("invalid_params", f"n must be 1 (velod generates one choice per "
                        f"request; send {n!r} requests instead)", "n")


def chat_request(body: dict[str, Any], served: ServedModel) -> GenerationRequest:
    """A /v1/chat/completions body as a GenerationRequest (HttpError naming a bad field)."""
    _check_n(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError("invalid_params", "messages must be a non-empty array", "messages")
    options = _sampling_options(body)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        options["max_tokens"] = limit
    logprobs = body.get("logprobs")
    if logprobs is not None:
        options["logprobs"] = logprobs
    top = body.get("top_logprobs")
    if top is not None:
        options["top_logprobs"] = top
    try:
        return GenerationRequest(messages=[_plain_message(m, i) for i, m in enumerate(messages)],
                                 model=served.name, sampling=sampling_params(options))
    except ValueError as exc:
        raise request_error(exc) from None


def completion_request(body: dict[str, Any], served: ServedModel) -> GenerationRequest:
    """A /v1/completions body as a GenerationRequest (HttpError naming a bad field)."""
    _check_n(body)
    if body.get("echo"):
        raise HttpError("invalid_params", "echo is not supported", "echo")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    options = _sampling_options(body)
    limit = body.get("max_tokens", COMPLETIONS_MAX_TOKENS)
    if limit is not None:
        options["max_tokens"] = limit
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) or \
                not 0 <= logprobs <= MAX_COMPLETION_LOGPROBS:
            raise HttpError("invalid_params", f"logprobs must be an integer in [0, "
                            f"{MAX_COMPLETION_LOGPROBS}]", "logprobs")
        options.update(logprobs=True, top_logprobs=logprobs)
    try:
        if isinstance(prompt, str):
            return GenerationRequest(prompt=prompt, model=served.name,
                                     sampling=sampling_params(options))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return GenerationRequest(token_ids=prompt, model=served.name,
                                     sampling=sampling_params(options))
    except ValueError as exc:
        raise request_error(exc) from None
    raise HttpError("invalid_params", "prompt must be a string or an array of token ids "
                    "(one prompt per request)", "prompt")


def _sampling_options(body: dict[str, Any]) -> dict[str, Any]:
    options = {field: body[name] for name, field in _SAMPLING.items()
               if body.get(name) is not None}
    stop = body.get("stop")
    if stop is not None:
        options["stop"] = [stop] if isinstance(stop, str) else stop
    return options


def _plain_message(message: Any, index: int) -> dict[str, Any]:
    """A message with its content as text (OpenAI's arrays of text parts joined)."""
    if not isinstance(message, dict):
        raise HttpError("invalid_params", f"messages[{index}] must be an object",
                        f"messages[{index}]")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise HttpError("invalid_params", f"messages[{index}].content: only text parts "
                                "are supported", f"messages[{index}].content")
            texts.append(part["text"])
        content = "".join(texts)
    elif content is None:
        content = ""
    return {**message, "content": content}


def _top_logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives each token's logprobs show; None: no logprobs."""
    if chat:
        return int(body.get("top_logprobs") or 0) if body.get("logprobs") is True else None
    value = body.get("logprobs")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


class _Encoder:
    """One response's chunks: chat.completion(.chunk) or text_completion objects."""

    def __init__(self, served: ServedModel, *, chat: bool, include_usage: bool,
                 top_logprobs: int | None, model: str) -> None:
        self.served = served
        self.chat = chat
        self.include_usage = include_usage
        self.top_logprobs = top_logprobs
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.content_type = "text/event-stream"
        self._started = False

    # -- streamed ---------------------------------------------------------------------

    def _chunk(self, choice: dict[str, Any], usage_value: Any = None) -> bytes:
        data: dict[str, Any] = {"id": self.id, "object": self.object + (
            ".chunk" if self.chat else ""), "created": self.created, "model": self.model,
            "choices": [choice] if choice else []}
        if self.include_usage:
            data["usage"] = usage_value
        return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"

    def token(self, event: TokenEvent) -> bytes | None:
        logprobs = self._logprobs([event]) if self.top_logprobs is not None else None
        if not event.text and logprobs is None:
            return None
        if self.chat:
            delta: dict[str, Any] = {"content": event.text}
            if not self._started:
                delta = {"role": "assistant", **delta}
                self._started = True
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}
        else:
            choice = {"index": 0, "text": event.text, "logprobs": logprobs,
                      "finish_reason": None}
        return self._chunk(choice)

    def end(self, result: GenerationResult) -> bytes:
        reason = _finish_reason(result)
        if self.chat:
            delta = {} if self._started else {"role": "assistant", "content": ""}
            last = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            last = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
        out = self._chunk(last)
        if self.include_usage:
            out += self._chunk({}, usage(result))
        return out + b"data: [DONE]\n\n"

    def error(self, error: HttpError) -> bytes:
        return (b"data: " + json.dumps(openai_body(error)).encode() + b"\n\n"
                + b"data: [DONE]\n\n")

    # -- whole ------------------------------------------------------------------------

    def whole(self, result: GenerationResult, events: list[TokenEvent]) -> dict[str, Any]:
        logprobs = self._logprobs(events) if self.top_logprobs is not None else None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "logprobs": logprobs, "finish_reason": _finish_reason(result)}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": logprobs,
                      "finish_reason": _finish_reason(result)}
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "choices": [choice], "usage": usage(result)}

    # -- logprobs ---------------------------------------------------------------------

    def _logprobs(self, events: list[TokenEvent]) -> dict[str, Any] | None:
        scored = [e for e in events if e.token is not None and e.logprob is not None]
        if self.chat:
            return {"content": [self._chat_entry(e) for e in scored]}
        return {"tokens": [self._text(e.token) for e in scored],
                "token_logprobs": [e.logprob for e in scored],
                "top_logprobs": [{self._text(t): lp for t, lp in (e.top_logprobs or ())}
                                 for e in scored]}

    def _chat_entry(self, event: TokenEvent) -> dict[str, Any]:
        piece = self.served.tokenizer.piece(event.token, special=True)
        return {"token": piece.decode(errors="replace"), "logprob": event.logprob,
                "bytes": list(piece),
                "top_logprobs": [self._alternative(t, lp) for t, lp in
                                 (event.top_logprobs or ())]}

    def _alternative(self, token: int, logprob: float) -> dict[str, Any]:
        piece = self.served.tokenizer.piece(token, special=True)
        return {"token": piece.decode(errors="replace"), "logprob": logprob,
                "bytes": list(piece)}

    def _text(self, token: int | None) -> str:
        if token is None:
            return ""
        return self.served.tokenizer.piece(token, special=True).decode(errors="replace")


def _finish_reason(result: GenerationResult) -> str:
    return "length" if result.finish_reason == "length" else "stop"
