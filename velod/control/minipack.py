"""A small pure-Python MessagePack codec for the client side of the control socket.

velodctl runs for a few milliseconds; importing the msgpack package (which pulls in
datetime and collections) would be a third of its start-up. The daemon keeps using the
C msgpack; this module covers the types the control API exchanges (nil, bool, int, float,
str, bin, array, map) and refuses extension types, like the server does.
"""

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class OutOfData(Exception):
    """The buffer ends inside a message; feed more bytes."""


class FormatError(ValueError):
    """The bytes are not MessagePack this codec accepts."""


def packb(obj: "Any") -> bytes:
    out = bytearray()
    _pack(obj, out)
    return bytes(out)


def _pack(obj: "Any", out: bytearray) -> None:
    if obj is None:
        out.append(0xC0)
    elif obj is True or obj is False:
        out.append(0xC3 if obj else 0xC2)
    elif isinstance(obj, int):
        if 0 <= obj < 0x80:
            out.append(obj)
        elif -32 <= obj < 0:
            out.append(obj & 0xFF)
        elif 0 <= obj <= 0xFFFFFFFFFFFFFFFF:
            out.append(0xCF)
            out += obj.to_bytes(8, "big")
        elif -(2**63) <= obj < 0:
            out.append(0xD3)
            out += obj.to_bytes(8, "big", signed=True)
        else:
            raise OverflowError(f"integer {obj} does not fit in 64 bits")
    elif isinstance(obj, float):
        out.append(0xCB)
        out += _float_to_big(obj)
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        _header(len(data), out, fix=0xA0, fix_max=31, codes=(0xD9, 0xDA, 0xDB))
        out += data
    elif isinstance(obj, bytes | bytearray | memoryview):
        data = bytes(obj)
        _header(len(data), out, fix=None, fix_max=-1, codes=(0xC4, 0xC5, 0xC6))
        out += data
    elif isinstance(obj, list | tuple):
        _header(len(obj), out, fix=0x90, fix_max=15, codes=(None, 0xDC, 0xDD))
        for item in obj:
            _pack(item, out)
    elif isinstance(obj, dict):
        _header(len(obj), out, fix=0x80, fix_max=15, codes=(None, 0xDE, 0xDF))
        for key, value in obj.items():
            _pack(key, out)
            _pack(value, out)
    else:
        raise TypeError(f"cannot serialize {type(obj).__name__} object")


def _header(n: int, out: bytearray, *, fix: int | None, fix_max: int,
            codes: tuple[int | None, int, int]) -> None:
    if n <= fix_max and fix is not None:
        out.append(fix | n)
    elif n <= 0xFF and codes[0] is not None:
        out += bytes((codes[0], n))
    elif n <= 0xFFFF:
        out.append(codes[1])
        out += n.to_bytes(2, "big")
    else:
        out.append(codes[2])
        out += n.to_bytes(4, "big")


# Floats through memoryview casts rather than the struct module (one import less at start).
_LITTLE = sys.byteorder == "little"


def _float_to_big(value: float) -> bytes:
    raw = bytearray(8)
    memoryview(raw).cast("d")[0] = value
    return bytes(reversed(raw)) if _LITTLE else bytes(raw)


def _float_from_big(data: bytes, fmt: str) -> float:
    native = bytes(reversed(data)) if _LITTLE else data
    return memoryview(native).cast(fmt)[0]


_FLOATS = {0xCA: ("f", 4), 0xCB: ("d", 8)}  # code: (memoryview format, size)
_INTS = {  # code: (size, signed)
    0xCC: (1, False), 0xCD: (2, False), 0xCE: (4, False), 0xCF: (8, False),
    0xD0: (1, True), 0xD1: (2, True), 0xD2: (4, True), 0xD3: (8, True),
}
_SIZED = {  # code: (kind, size of the length)
    0xD9: ("str", 1), 0xDA: ("str", 2), 0xDB: ("str", 4),
    0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4),
    0xDC: ("array", 2), 0xDD: ("array", 4),
    0xDE: ("map", 2), 0xDF: ("map", 4),
}
MAX_DEPTH = 200  # control messages are shallow; stays well inside the recursion limit


def unpack_one(buf: bytes | bytearray, pos: int = 0) -> "tuple[Any, int]":
    """Decode one object at ``pos``; returns (object, next position) or raises OutOfData."""
    return _unpack(buf, pos, 0)


def _need(buf: bytes | bytearray, pos: int, n: int) -> None:
    if pos + n > len(buf):
        raise OutOfData


def _unpack(buf: bytes | bytearray, pos: int, depth: int) -> "tuple[Any, int]":
    if depth > MAX_DEPTH:
        raise FormatError("nesting too deep")
    _need(buf, pos, 1)
    code = buf[pos]
    pos += 1
    if code <= 0x7F:
        return code, pos
    if code >= 0xE0:
        return code - 0x100, pos
    if 0xA0 <= code <= 0xBF:
        return _str(buf, pos, code & 0x1F)
    if 0x90 <= code <= 0x9F:
        return _array(buf, pos, code & 0x0F, depth)
    if 0x80 <= code <= 0x8F:
        return _map(buf, pos, code & 0x0F, depth)
    if code == 0xC0:
        return None, pos
    if code in (0xC2, 0xC3):
        return code == 0xC3, pos
    if code in _INTS:
        size, signed = _INTS[code]
        _need(buf, pos, size)
        return int.from_bytes(buf[pos:pos + size], "big", signed=signed), pos + size
    if code in _FLOATS:
        fmt, size = _FLOATS[code]
        _need(buf, pos, size)
        return _float_from_big(bytes(buf[pos:pos + size]), fmt), pos + size
    if code in _SIZED:
        kind, size = _SIZED[code]
        _need(buf, pos, size)
        n = int.from_bytes(buf[pos:pos + size], "big")
        pos += size
        if kind == "str":
            return _str(buf, pos, n)
        if kind == "bin":
            _need(buf, pos, n)
            return bytes(buf[pos:pos + n]), pos + n
        if kind == "array":
            return _array(buf, pos, n, depth)
        return _map(buf, pos, n, depth)
    raise FormatError(f"unsupported MessagePack type byte 0x{code:02x}")


def _str(buf: bytes | bytearray, pos: int, n: int) -> tuple[str, int]:
    _need(buf, pos, n)
    try:
        return bytes(buf[pos:pos + n]).decode("utf-8"), pos + n
    except UnicodeDecodeError as exc:
        raise FormatError(f"invalid UTF-8 in a string: {exc}") from None


def _array(buf: bytes | bytearray, pos: int, n: int, depth: int) -> "tuple[list[Any], int]":
    items = []
    for _ in range(n):
        item, pos = _unpack(buf, pos, depth + 1)
        items.append(item)
    return items, pos


def _map(buf: bytes | bytearray, pos: int, n: int, depth: int) -> "tuple[dict[Any, Any], int]":
    out = {}
    for _ in range(n):
        key, pos = _unpack(buf, pos, depth + 1)
        value, pos = _unpack(buf, pos, depth + 1)
        if isinstance(key, list | dict):
            raise FormatError("a map key must be a scalar")
        out[key] = value
    return out, pos


class Unpacker:
    """Streaming decoder with the msgpack.Unpacker interface the client uses."""

    def __init__(self, max_buffer_size: int = 64 * 1024**2) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_buffer_size = max_buffer_size

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        if len(self._buf) + len(data) > self.max_buffer_size:
            raise FormatError(f"message larger than {self.max_buffer_size} bytes")
        self._buf += data

    def __iter__(self) -> "Unpacker":
        return self

    def __next__(self) -> "Any":
        try:
            obj, self._pos = unpack_one(self._buf, self._pos)
        except OutOfData:
            raise StopIteration from None
        return obj
