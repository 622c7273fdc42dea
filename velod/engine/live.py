"""Generation requests in flight in the engine service: one event queue per request.

The step loop hands each step's outcome to :meth:`LiveGenerations.on_step`, which feeds every
request's sampled token through its :class:`~velod.engine.generation.TextStream` and queues a
:class:`~velod.engine.generation.TokenEvent`; a request that ends (length, a stop string, an
end-of-generation token) gets its :class:`~velod.engine.generation.GenerationResult` queued
last. Requests stopped here are returned so that the service aborts their sequences before
the next step is scheduled: their blocks free within one step.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any

from velod.engine.generation import GenerationResult, TextStream, Timings, TokenEvent

if TYPE_CHECKING:
    from velod.engine.generation import GenerationRequest
    from velod.engine.runtime.engine import StepOutcome
    from velod.engine.served import ServedModel

Event = TokenEvent | GenerationResult

# The scheduler's words for why a request left it -> the generation layer's finish reasons.
_REASONS = {"length": "length", "stop": "stop", "aborted": "abort"}


class LiveGeneration:
    """One request: its text stream, the queue its caller reads, and its clock."""

    def __init__(self, seq_id: int, request: GenerationRequest, served: ServedModel,
                 prompt_tokens: int, received: float, prepared: float) -> None:
        self.seq_id = seq_id
        self.model = served.name
        self.prompt_tokens = prompt_tokens
        self.stream = TextStream(served.tokenizer, request.params, served.eog_ids)
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.received = received
        self.prepared = prepared
        self.submitted = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.result: GenerationResult | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def on_token(self, token: int, logprob: float | None,
                 top: tuple[tuple[int, float], ...] | None, now: float) -> bool:
        """Queue the token's event; True when the request ends with it (a stop)."""
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        event = self.stream.feed(token, logprob, top)
        if event is not None:
            self.queue.put_nowait(event)
        if self.stream.finish_reason is not None:
            self.end("stop")
            return True
        return False

    def end(self, reason: str, error: str | None = None) -> None:
        """Finish with ``reason`` (once): flush held-back text, then queue the result."""
        if self.result is not None:
            return
        tail = self.stream.finish(reason)
        if tail:
            self.queue.put_nowait(TokenEvent(tail, None))
        now = time.monotonic()
        first, last = self.first_token, self.last_token
        stream = self.stream
        self.result = GenerationResult(
            model=self.model, text=stream.text, tokens=tuple(stream.tokens),
            prompt_tokens=self.prompt_tokens, completion_tokens=stream.generated,
            finish_reason=stream.finish_reason or reason, stop=stream.stop, error=error,
            logprobs=tuple(stream.logprobs) if stream.params.logprobs else None,
            timings=Timings(
                prepare_s=self.prepared - self.received,
                prompt_eval_s=(first if first is not None else now) - self.submitted,
                eval_s=(last - first) if first is not None and last is not None else 0.0,
                ttft_s=None if first is None else first - self.received,
                total_s=now - self.received))
        self.queue.put_nowait(self.result)


class LiveGenerations:
    """The requests in flight, by sequence id."""

    def __init__(self) -> None:
        self.by_id: dict[int, LiveGeneration] = {}

    def __len__(self) -> int:
        return len(self.by_id)

    def add(self, live: LiveGeneration) -> None:
        self.by_id[live.seq_id] = live

    def discard(self, seq_id: int) -> None:
        self.by_id.pop(seq_id, None)

    def on_step(self, outcome: StepOutcome) -> list[int]:
        """Deliver a step's tokens and endings; returns the ids that stopped (to abort)."""
        if not self.by_id:
            return []
        now = time.monotonic()
        stopped = []
        sampled = outcome.sampled
        for i, (seq_id, token) in enumerate(zip(outcome.seq_ids.tolist(),
                                                outcome.tokens.tolist(), strict=True)):
            live = self.by_id.get(seq_id)
            if live is None or live.done:
                continue
            logprob, top = _logprobs(sampled, i)
            if live.on_token(token, logprob, top, now):
                stopped.append(seq_id)
        for request, _track in outcome.finished:
            live = self.by_id.get(request.id)
            if live is not None:
                live.end(_REASONS.get(request.reason, request.reason))
        return stopped

    def end(self, seq_id: int, reason: str, error: str | None = None) -> None:
        """End one request from outside the step (aborted, engine failed or released)."""
        live = self.by_id.get(seq_id)
        if live is not None:
            live.end(reason, error)

    def end_all(self, reason: str, error: str | None = None) -> None:
        for live in list(self.by_id.values()):
            live.end(reason, error)


def _logprobs(sampled: Any, row: int) -> tuple[float | None, tuple[tuple[int, float], ...] | None]:
    """Row ``row``'s chosen-token log-probability and top alternatives, when asked for."""
    if sampled is None:
        return None, None
    value = float(sampled.logprobs[row])
    if math.isnan(value):
        return None, None
    ids, values = sampled.top_ids[row], sampled.top_logprobs[row]
    top = None if ids is None else tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return value, top
