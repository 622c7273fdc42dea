"""The generation layer's pure half: requests, prompts, and tokens to streamed text."""

from __future__ import annotations

import pytest

from tests.tiny_vocab import spm_metadata
from velod.engine.core.errors import InvalidRequest
from velod.engine.generation import GenerationRequest, TextStream, max_new_tokens, prepare_prompt
from velod.engine.models.chat import ChatTemplate
from velod.engine.models.sampling import SamplingParams
from velod.engine.models.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_gguf_metadata(spm_metadata())


class FakeServed:
    """What prepare_prompt reads of a ServedModel (the real one needs weights)."""

    def __init__(self, tokenizer: Tokenizer, context: int = 64) -> None:
        self.tokenizer = tokenizer
        self.template = ChatTemplate.builtin("gemma")
        self.context_length = context


def stream_of(tokenizer: Tokenizer, **params) -> TextStream:
    return TextStream(tokenizer, SamplingParams(**params), tokenizer.eog_ids)


def feed_text(stream: TextStream, tokenizer: Tokenizer, text: str) -> list[str]:
    pieces = []
    for token in tokenizer.encode(text, add_special=False):
        event = stream.feed(token)
        if event is not None:
            pieces.append(event.text)
        if stream.finish_reason:
            break
    return pieces


def test_streamed_pieces_join_to_the_decoded_text(tokenizer):
    stream = stream_of(tokenizer)
    text = "Hello, world: naïve café ünïcödé 12345"
    pieces = feed_text(stream, tokenizer, text)
    tail = stream.finish("length")
    assert "".join(pieces) + tail == stream.text == tokenizer.decode(stream.tokens)
    assert stream.finish_reason == "length" and stream.generated == len(stream.tokens)


def test_stop_string_split_across_tokens_cuts_the_text_before_it(tokenizer):
    stream = stream_of(tokenizer, stop=["world"])
    pieces = feed_text(stream, tokenizer, "Hello, world and more")
    # This vocabulary adds a space prefix when encoding (as Llama 2 does); decoding keeps it.
    assert "".join(pieces) == stream.text == " Hello, "
    assert stream.finish_reason == "stop" and stream.stop == "world"
    assert stream.feed(5) is None  # nothing after the end


def test_end_of_generation_token_ends_the_stream_without_text_and_is_counted(tokenizer):
    stream = stream_of(tokenizer)
    feed_text(stream, tokenizer, "Hi")
    kept = list(stream.tokens)
    assert stream.feed(tokenizer.eos_id) is None
    assert stream.finish_reason == "stop" and stream.stop == tokenizer.eos_id
    assert stream.tokens == kept and stream.generated == len(kept) + 1


def test_ignore_eos_keeps_going_past_the_end_of_generation_token(tokenizer):
    stream = stream_of(tokenizer, ignore_eos=True)
    stream.feed(tokenizer.eos_id)
    assert stream.finish_reason is None and stream.tokens == [tokenizer.eos_id]


def test_text_held_back_as_a_possible_stop_comes_out_at_the_end(tokenizer):
    stream = stream_of(tokenizer, stop=["Hello there"])
    pieces = feed_text(stream, tokenizer, "Say Hello")
    assert "Hello" not in "".join(pieces)
    assert stream.finish("length").endswith("Hello")
    assert stream.text == " Say Hello" and stream.finish_reason == "length"


def test_a_request_needs_exactly_one_of_prompt_messages_and_token_ids():
    with pytest.raises(InvalidRequest, match="exactly one"):
        GenerationRequest()
    with pytest.raises(InvalidRequest, match="exactly one"):
        GenerationRequest(prompt="a", token_ids=[1])
    with pytest.raises(InvalidRequest, match="token_ids"):
        GenerationRequest(token_ids=[1, True])
    with pytest.raises(InvalidRequest, match=r"messages\[0\]"):
        GenerationRequest(messages=[{"content": "no role"}])
    with pytest.raises(InvalidRequest, match="chat_template"):
        GenerationRequest(prompt="a", chat_template="gemma")


def test_prompt_is_tokenized_with_bos_and_chat_through_the_template(tokenizer):
    served = FakeServed(tokenizer)
    ids = prepare_prompt(GenerationRequest(prompt="Hello"), served)
    assert ids == tokenizer.encode("Hello")
    assert ids[0] == tokenizer.bos_id
    chat = prepare_prompt(GenerationRequest(messages=[{"role": "user", "content": "Hi"}]),
                          served)
    expected = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert chat == tokenizer.encode(expected)


def test_prompt_that_leaves_no_room_to_generate_is_refused_with_the_context(tokenizer):
    served = FakeServed(tokenizer, context=8)
    with pytest.raises(InvalidRequest, match="context holds 8"):
        prepare_prompt(GenerationRequest(token_ids=list(range(10, 18))), served)
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        prepare_prompt(GenerationRequest(token_ids=[10**6]), served)


def test_max_new_tokens_is_the_request_limit_within_the_context_left():
    assert max_new_tokens(SamplingParams(max_tokens=10), 5, 100) == 10
    assert max_new_tokens(SamplingParams(max_tokens=10), 95, 100) == 5
    assert max_new_tokens(SamplingParams(), 30, 100) == 70
