"""The msgpack-rpc codec, without sockets."""

import msgpack
import pytest

from velod.control import protocol
from velod.control.protocol import BadMessage, Decoder, FramingError, Notification, Request


def test_request_encoding_is_plain_msgpack_rpc():
    raw = protocol.encode_request(7, "system.ping", {"a": 1})
    assert msgpack.unpackb(raw) == [0, 7, "system.ping", [{"a": 1}]]
    assert msgpack.unpackb(protocol.encode_response(7, None, {"pong": True})) == [
        1, 7, None, {"pong": True}]
    assert msgpack.unpackb(protocol.encode_notification("event", [{"topic": "x"}])) == [
        2, "event", [{"topic": "x"}]]


def test_messages_split_across_reads_and_glued_together_are_framed_by_msgpack():
    stream = b"".join(protocol.encode_request(i, "m", {"i": i}) for i in range(50))
    decoder = Decoder(1 << 20)
    got = []
    for i in range(0, len(stream), 7):
        got.extend(decoder.feed(stream[i:i + 7]))
    assert [m.params["i"] for m in got] == list(range(50))
    assert all(isinstance(m, Request) and m.method == "m" for m in got)


@pytest.mark.parametrize(("params", "expected"), [([], {}), ([{"x": 1}], {"x": 1}),
                                                  ({"x": 1}, {"x": 1})])
def test_params_are_one_map(params, expected):
    (msg,) = Decoder(1024).feed(msgpack.packb([0, 1, "m", params]))
    assert msg == Request(1, "m", expected)


@pytest.mark.parametrize(("obj", "msgid", "reason"), [
    ([0, 1, 2, []], 1, "method must be a UTF-8 string"),
    ([0, 1, "m", [1, 2]], 1, "params must be"),
    ([0, 1, "m", [[1]]], 1, "params must be"),
    ([0, 1, "m", [{1: 2}]], 1, "string keys"),
    ([0, 1, "m"], 1, "a request is"),
    ([0, -1, "m", []], None, "msgid"),
    ([0, 2**32, "m", []], None, "msgid"),
    ([0, "1", "m", []], None, "msgid"),
    ([9, 1, "m", []], None, "unknown message type"),
    ("hello", None, "must be a msgpack array"),
    ([], None, "must be a msgpack array"),
    ([True, 1, "m", []], None, "unknown message type"),
])
def test_wrong_shapes_are_bad_messages_with_msgid_when_known(obj, msgid, reason):
    (msg,) = Decoder(1024).feed(msgpack.packb(obj))
    assert isinstance(msg, BadMessage)
    assert msg.msgid == msgid
    assert reason in msg.reason


def test_notifications_are_recognised():
    (msg,) = Decoder(1024).feed(msgpack.packb([2, "x", [1]]))
    assert msg == Notification("x", [1])


@pytest.mark.parametrize("garbage", [b"\xc1", b"\xc1\xc1\xc1 hello", b"\xd4\x05\x00"])
def test_undecodable_bytes_raise_framing_error(garbage):
    with pytest.raises(FramingError):
        Decoder(1024).feed(garbage)


def test_invalid_utf8_in_a_string_is_a_framing_error():
    with pytest.raises(FramingError):
        Decoder(1024).feed(b"\xa2\xff\xfe")


def test_a_message_over_the_limit_raises_without_buffering_it_all():
    decoder = Decoder(4096)
    big = protocol.encode_request(1, "m", {"blob": "x" * 10_000})
    with pytest.raises(FramingError, match="larger than 4096"):
        for i in range(0, len(big), 1000):
            decoder.feed(big[i:i + 1000])


def test_a_huge_declared_length_is_refused_by_the_limit_not_allocated():
    decoder = Decoder(4096)
    header = b"\xdb\xff\xff\xff\xf0"  # str32 of almost 4 GiB
    assert decoder.feed(header) == []
    with pytest.raises(FramingError):
        decoder.feed(b"x" * 5000)


def test_deep_nesting_is_a_framing_error_not_a_crash():
    with pytest.raises(FramingError):
        Decoder(1 << 20).feed(b"\x91" * 100_000)


def test_many_small_pipelined_messages_are_not_one_big_one():
    decoder = Decoder(1024)
    stream = b"".join(protocol.encode_request(i, "config.reload") for i in range(500))
    assert len(stream) > 8 * 1024
    got = decoder.feed(stream)
    assert [m.msgid for m in got] == list(range(500))


def test_a_message_of_exactly_the_limit_is_accepted():
    size = 1024
    overhead = len(protocol.encode_request(1, "m", {"t": "x" * 300})) - 300  # str16 header
    msg = protocol.encode_request(1, "m", {"t": "x" * (size - overhead)})
    assert len(msg) == size
    decoder = Decoder(size)
    half = b"".join(protocol.encode_request(i, "m") for i in range(3))
    assert len(decoder.feed(half + msg)) == 4
