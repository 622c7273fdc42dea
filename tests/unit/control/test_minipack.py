"""velodctl's pure-Python MessagePack codec agrees with the C msgpack, both ways."""

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from velod.control import minipack

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.floats(allow_nan=False) | st.text() | st.binary())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=20)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=20),
                      max_leaves=60)


@settings(max_examples=300, deadline=None)
@given(values)
def test_minipack_output_decodes_with_msgpack(value):
    assert msgpack.unpackb(minipack.packb(value), raw=False, strict_map_key=False) == value


@settings(max_examples=300, deadline=None)
@given(values)
def test_msgpack_output_decodes_with_minipack(value):
    packed = msgpack.packb(value, use_bin_type=True)
    decoded, end = minipack.unpack_one(packed)
    assert decoded == value and end == len(packed)


@settings(max_examples=100, deadline=None)
@given(st.lists(values, min_size=1, max_size=5), st.integers(min_value=1, max_value=7))
def test_streaming_decoder_handles_any_split(objs, step):
    stream = b"".join(msgpack.packb(o, use_bin_type=True) for o in objs)
    unpacker = minipack.Unpacker()
    got = []
    for i in range(0, len(stream), step):
        unpacker.feed(stream[i:i + step])
        got.extend(unpacker)
    assert got == objs


def test_float32_and_nan_decode():
    assert minipack.unpack_one(msgpack.packb(1.5, use_single_float=True))[0] == 1.5
    assert math.isnan(minipack.unpack_one(msgpack.packb(float("nan")))[0])


@pytest.mark.parametrize("bad", [b"\xc1", b"\xd4\x01\x00", b"\xa2\xff\xfe", b"\x91" * 1000])
def test_unsupported_bytes_are_format_errors(bad):
    with pytest.raises(minipack.FormatError):
        minipack.unpack_one(bad)


def test_limits_and_unsupported_types():
    unpacker = minipack.Unpacker(max_buffer_size=10)
    with pytest.raises(minipack.FormatError):
        unpacker.feed(b"x" * 11)
    with pytest.raises(TypeError):
        minipack.packb(object())
    with pytest.raises(OverflowError):
        minipack.packb(2**64)


def test_the_client_does_not_import_msgpack_or_argparse():
    import subprocess
    import sys

    code = ("import sys; import velod.control.cli; "
            "print(sorted(m for m in ('msgpack', 'argparse', 'typing', 'dataclasses', 'socket')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
