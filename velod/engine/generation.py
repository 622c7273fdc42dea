"""Text generation requests: from a prompt, chat messages or token ids to streamed text.

The pure half of ``EngineService.generate``. A :class:`GenerationRequest` says what to
generate; :func:`prepare_prompt` turns it into prompt token ids (chat template, tokenizer,
context check; blocking, so the service runs it in a worker thread); a :class:`TextStream`
turns the request's sampled tokens into text pieces, cutting at a stop string or an
end-of-generation token; :class:`GenerationResult` is what a caller gets at the end, with
:class:`Timings` in seconds (each API converts to its own units).

Finish reasons: ``stop`` (an end-of-generation token, a stop token or a stop string),
``length`` (``max_tokens`` or the model's context reached), ``abort`` (the caller went
away or asked), ``error`` (the engine failed; ``error`` says how).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from velod.engine.core.errors import InvalidRequest

if TYPE_CHECKING:
    from velod.engine.models.sampling import SamplingParams
    from velod.engine.served import ServedModel

FINISH_REASONS = ("stop", "length", "abort", "error")
MAX_PROMPT_CHARS = 4 << 20  # beyond any context velod can hold; bounds tokenization time
MAX_MESSAGES = 4096


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: exactly one of ``prompt`` (raw text, tokenized as is, BOS added
    as the vocabulary asks), ``messages`` (chat turns rendered with the model's template
    or ``chat_template``, ending with the model's turn) or ``token_ids``."""

    prompt: str | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    token_ids: Sequence[int] | None = None
    model: str | None = None  # None: the loaded model
    sampling: SamplingParams | None = None  # None: llama.cpp's defaults
    chat_template: str | None = None  # a built-in's name or a Jinja file (NAME|FILE)
    priority: int = 0

    def __post_init__(self) -> None:
        given = [name for name in ("prompt", "messages", "token_ids")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise InvalidRequest("prompt", "give exactly one of prompt, messages or token_ids"
                                 + (f" (got {', '.join(given)})" if given else ""))
        if self.prompt is not None:
            if not isinstance(self.prompt, str):
                raise InvalidRequest("prompt", "must be a string")
            if len(self.prompt) > MAX_PROMPT_CHARS:
                raise InvalidRequest("prompt", f"longer than {MAX_PROMPT_CHARS} characters",
                                     MAX_PROMPT_CHARS)
        if self.messages is not None:
            _check_messages(self.messages)
        if self.token_ids is not None:
            ids = self.token_ids
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids or \
                    not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise InvalidRequest("token_ids", "must be a non-empty list of token ids")
        if self.chat_template is not None and self.messages is None:
            raise InvalidRequest("chat_template", "applies to messages only")

    @property
    def params(self) -> SamplingParams:
        """The sampling params, llama.cpp's defaults when none were given."""
        if self.sampling is not None:
            return self.sampling
        from velod.engine.models.sampling import SamplingParams

        return SamplingParams()


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Cheap shape checks before any work: the template checks the rest."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequest("messages", "must be a non-empty list of {role, content} maps")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest("messages", f"more than {MAX_MESSAGES} messages", MAX_MESSAGES)
    size = 0
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidRequest(f"messages[{i}]", "must be a map with a string role")
        content = message.get("content")
        if isinstance(content, str):
            size += len(content)
        elif content is not None and not isinstance(content, list):
            raise InvalidRequest(f"messages[{i}].content", "must be a string")
    if size > MAX_PROMPT_CHARS:
        raise InvalidRequest("messages", f"longer than {MAX_PROMPT_CHARS} characters in all",
                             MAX_PROMPT_CHARS)


def prepare_prompt(request: GenerationRequest, served: ServedModel) -> list[int]:
    """The prompt's token ids for ``served`` (blocking: rendering and tokenizing).

    InvalidRequest when the prompt is empty, holds ids outside the vocabulary, or leaves
    no room to generate in the model's context; ChatTemplateError from the template.
    """
    tokenizer = served.tokenizer
    if request.token_ids is not None:
        ids = [int(t) for t in request.token_ids]
        bad = next((t for t in ids if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise InvalidRequest("token_ids", f"{bad} is outside the vocabulary "
                                              f"(0..{tokenizer.vocab_size - 1})")
    else:
        if request.messages is not None:
            text = render_chat(request, served)
        else:
            text = request.prompt or ""
        ids = tokenizer.encode(text, add_special=True, parse_special=True)
    if not ids:
        raise InvalidRequest("prompt", "is empty (no tokens to start from)")
    context = served.context_length
    if len(ids) >= context:
        raise InvalidRequest("prompt", f"has {len(ids)} tokens; the model's context holds "
                                       f"{context}, and at least one token must be generated",
                             context - 1)
    return ids


def render_chat(request: GenerationRequest, served: ServedModel) -> str:
    """The messages rendered with the request's template or the model's (blocking)."""
    template = served.template
    if request.chat_template:
        from velod.engine.models.chat import load_chat_template

        template = load_chat_template({}, request.chat_template)
    tokenizer = served.tokenizer
    return template.render(list(request.messages or ()), add_generation_prompt=True,
                           bos_token=tokenizer.bos_text, eos_token=tokenizer.eos_text,
                           tokenizer_adds_bos=tokenizer.add_bos,
                           tokenizer_adds_eos=tokenizer.add_eos, max_chars=MAX_PROMPT_CHARS)


def max_new_tokens(params: SamplingParams, prompt_tokens: int, context: int) -> int:
    """Tokens the request may generate: its ``max_tokens``, within the context left."""
    room = context - prompt_tokens
    return room if params.max_tokens is None else min(params.max_tokens, room)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: the text it completes (may be empty: a held-back UTF-8 byte or
    a possible stop string), its id and, when asked, its log-probability and the best
    alternatives ``[(id, logprob), ...]``. ``token`` is None for text held back until the
    end of the request."""

    text: str
    token: int | None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class Timings:
    """Where a request's time went, in seconds from its arrival.

    ``prompt_eval_s``: from queueing in the engine to the first token (waiting and prefill);
    ``eval_s``: from the first token to the last; ``ttft_s``: arrival to first token
    (tokenization included); ``total_s``: arrival to the end.
    """

    prepare_s: float = 0.0
    prompt_eval_s: float = 0.0
    eval_s: float = 0.0
    ttft_s: float | None = None
    total_s: float = 0.0

    def to_dict(self) -> dict[str, float | None]:
        return {"prepare_s": self.prepare_s, "prompt_eval_s": self.prompt_eval_s,
                "eval_s": self.eval_s, "ttft_s": self.ttft_s, "total_s": self.total_s}


@dataclass(frozen=True)
class GenerationResult:
    """The end of a request: generated text and tokens (the generated part only; an
    end-of-generation token is counted in ``completion_tokens`` but not kept in ``tokens``),
    why it ended, the counts and timings."""

    model: str
    text: str
    tokens: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    timings: Timings
    stop: str | int | None = None  # the stop string or token that ended it
    error: str | None = None
    logprobs: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "text": self.text, "tokens": list(self.tokens),
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "finish_reason": self.finish_reason, "stop": self.stop, "error": self.error,
                "timings": self.timings.to_dict(),
                "logprobs": None if self.logprobs is None else list(self.logprobs)}


@dataclass
class TextStream:
    """One request's tokens to text: streaming detokenization, end-of-generation tokens and
    stop strings (pure; the service feeds it each sampled token).

    After :meth:`feed` returns, ``finish_reason`` is ``"stop"`` when the request must end
    here (the caller aborts its sequence, so its blocks free in the next step).
    """

    tokenizer: Any
    params: SamplingParams
    eog_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    generated: int = 0
    finish_reason: str | None = None
    stop: str | int | None = None
    _parts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from velod.engine.models.stop import StopMatcher

        self._detokenizer = self.tokenizer.detokenizer()
        self._stops = StopMatcher(self.params.stop)

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def feed(self, token: int, logprob: float | None = None,
             top: tuple[tuple[int, float], ...] | None = None) -> TokenEvent | None:
        """The event for ``token``; None for an end-of-generation token with nothing to say."""
        if self.finish_reason is not None:
            return None
        self.generated += 1
        if self.params.ends_generation(token, self.eog_ids):
            self.stop = token
            tail = self._flush()
            self.finish_reason = "stop"
            return TokenEvent(tail, token, logprob, top) if tail else None
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        piece = self._stops.feed(self._detokenizer.feed(token))
        if self._stops.stopped:
            self.finish_reason, self.stop = "stop", self._stops.matched
        self._parts.append(piece)
        return TokenEvent(piece, token, logprob, top)

    def finish(self, reason: str) -> str:
        """Ends the stream for ``reason`` unless it already ended; the held-back text."""
        if self.finish_reason is not None:
            return ""
        tail = self._flush()
        # The held-back text may complete a stop string after all.
        self.finish_reason = "stop" if self._stops.stopped else reason
        return tail

    def _flush(self) -> str:
        tail = self._stops.feed(self._detokenizer.flush())
        tail += self._stops.flush()
        if self._stops.stopped and self.stop is None:
            self.stop = self._stops.matched
        self._parts.append(tail)
        return tail
