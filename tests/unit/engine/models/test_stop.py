"""Stop strings in streamed text: held back while undecided, cut at the first, never emitted."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from velod.engine.models.stop import StopMatcher


def stream(stops: list[str], pieces: list[str]) -> tuple[list[str], str | None]:
    matcher = StopMatcher(stops)
    out = [matcher.feed(p) for p in pieces]
    out.append(matcher.flush())
    return out, matcher.matched


def test_text_that_may_begin_a_stop_string_is_held_back_until_decided() -> None:
    matcher = StopMatcher(["world"])
    assert matcher.feed("Hello wor") == "Hello "
    assert matcher.feed("m") == "worm"
    assert matcher.feed(" wo") == " "
    assert matcher.feed("rld and more") == ""
    assert matcher.stopped and matcher.matched == "world"
    assert matcher.feed("ignored") == "" and matcher.flush() == ""


def test_the_stop_string_that_completes_first_wins_however_the_text_is_cut() -> None:
    for pieces in (["xab", "cd"], ["xabcd"], ["x", "a", "b", "c", "d"]):
        out, matched = stream(["bc", "abcd"], pieces)
        assert "".join(out) == "xa" and matched == "bc"


def test_held_text_comes_out_at_the_end_when_no_stop_string_follows() -> None:
    out, matched = stream(["</s>"], ["text </", "s"])
    assert out == ["text ", "", "</s"] and matched is None


def test_a_stop_string_inside_one_piece_cuts_it() -> None:
    out, matched = stream(["\n\n"], ["line one\n\nline two"])
    assert out == ["line one", ""] and matched == "\n\n"


def test_no_stop_strings_pass_everything_through_at_once() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("abc") == "abc" and matcher.flush() == ""


@settings(max_examples=300, deadline=None)
@given(text=st.text("ab\n", max_size=40), stops=st.lists(st.text("ab", min_size=1,
                                                                  max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=10))
def test_streaming_in_any_pieces_gives_the_text_up_to_the_first_stop(
        text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out, matched = stream(stops, pieces)
    # The first stop to complete ends the text (of two ending together, the longer).
    hits = sorted((text.find(s) + len(s), text.find(s)) for s in stops if s in text)
    end = hits[0][1] if hits else len(text)
    assert "".join(out) == text[:end]
    assert (matched is not None) == bool(hits)
    assert not any(s in "".join(out) for s in stops)  # a stop string never comes out
