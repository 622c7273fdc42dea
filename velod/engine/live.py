"""A generation request in flight in the engine service: its text stream and event queue.

The service submits the request's prompt with this object's :meth:`LiveGeneration.on_token`
and :meth:`LiveGeneration.on_finish` as the engine's listeners (``EngineService.submit``).
Each sampled token goes through the request's :class:`~velod.engine.generation.TextStream`
and becomes a :class:`~velod.engine.generation.TokenEvent` on the queue its caller reads; the
end (length, a stop string, an end-of-generation token, aborted, error) queues the
:class:`~velod.engine.generation.GenerationResult` last. ``on_token`` says when a stop string
ended the request, so that the service aborts its sequence before the next step is scheduled:
its blocks free within one step.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from velod.engine.generation import GenerationResult, TextStream, Timings, TokenEvent

if TYPE_CHECKING:
    from velod.engine.core.sequence import FinishedRequest
    from velod.engine.generation import GenerationRequest
    from velod.engine.runtime.engine import Sampled
    from velod.engine.served import ServedModel

Event = TokenEvent | GenerationResult


class LiveGeneration:
    """One request: its text stream, the queue its caller reads, and its clock."""

    def __init__(self, request: GenerationRequest, served: ServedModel, prompt_tokens: int,
                 received: float, prepared: float) -> None:
        self.seq_id = -1  # the engine's id, once submitted
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

    def on_token(self, sampled: Sampled) -> bool:
        """Queue the token's event; True when a stop string or token ended the request."""
        if self.result is not None:
            return False
        now = time.monotonic()
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        event = self.stream.feed(sampled.token, sampled.logprob, sampled.top or None)
        if event is not None:
            self.queue.put_nowait(event)
        if self.stream.finish_reason is not None:
            self.end("stop")
            return True
        return False

    def on_finish(self, request: FinishedRequest) -> None:
        """The engine's end of the request (see ``FinishedRequest.reason``)."""
        self.end(request.reason, request.error)

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
