"""The metadata of a GGUF file, read from its header alone: fast, pure Python, no NumPy.

What the tuner needs to size a served model's KV cache (``<arch>.block_count``, heads, key
and value lengths, windows, ...) are a few scalars and short arrays at the start of the file.
This reader walks the header (GGUF v2/v3, little-endian) and keeps scalars and arrays of at
most ``max_array`` items; longer arrays (the tokenizer's vocabulary) are stepped over
without being decoded, so a 262144-token vocabulary costs a fraction of a second, not the
seconds a full reader takes. Blocking file I/O: call it through ``run_blocking``.

Every way a file can be wrong raises :class:`GgufHeaderError` naming the file and why.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import IO, Any

from velod.model.gguf import MAGIC, SUPPORTED_VERSIONS
from velod.model.metadata import Geometry

# GGUF value types -> struct format of one scalar (8 = string, 9 = array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_KEYS = 1 << 20  # a header claiming more metadata entries than this is corrupt
MAX_STRING = 1 << 24  # no single metadata string is 16 MiB long


class GgufHeaderError(ValueError):
    """A file that is not a readable GGUF; the message names it and says what is wrong."""


@dataclass(frozen=True)
class SkippedArray:
    """An array longer than ``max_array``, left undecoded: only its length is known."""

    count: int


def read_geometry(path: str | os.PathLike[str]) -> Geometry:
    """The attention shape of the GGUF at ``path`` (UnknownArchitecture when it lacks one).

    The vocabulary size comes from the tokenizer's token list when the architecture does not
    state it, as llama.cpp does.
    """
    metadata = read_metadata(path)
    arch = metadata.get("general.architecture")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if isinstance(arch, str) and f"{arch}.vocab_size" not in metadata:
        count = tokens.count if isinstance(tokens, SkippedArray) else (
            len(tokens) if isinstance(tokens, list) else None)
        if count:
            metadata[f"{arch}.vocab_size"] = count
    return Geometry.from_metadata(metadata)


def read_metadata(path: str | os.PathLike[str], max_array: int = 4096) -> dict[str, Any]:
    """Every metadata key of the GGUF at ``path``: scalars as Python values, arrays of at
    most ``max_array`` items as lists, longer ones as :class:`SkippedArray`."""
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            return _read(f, max_array)
    except OSError as exc:
        raise GgufHeaderError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (struct.error, UnicodeDecodeError, _Truncated) as exc:
        raise GgufHeaderError(f"{path}: not a valid GGUF header ({exc or 'cut short'})"
                              ) from None
    except GgufHeaderError as exc:
        raise GgufHeaderError(f"{path}: {exc}") from None


class _Truncated(Exception):
    pass


def _exact(f: IO[bytes], n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _Truncated("the file ends inside its header")
    return data


def _scalar(f: IO[bytes], kind: int) -> Any:
    fmt = _SCALARS[kind]
    return struct.unpack(fmt, _exact(f, struct.calcsize(fmt)))[0]


def _string(f: IO[bytes]) -> str:
    (length,) = struct.unpack("<Q", _exact(f, 8))
    if length > MAX_STRING:
        raise GgufHeaderError(f"a metadata string claims {length} bytes")
    return _exact(f, length).decode("utf-8")


def _skip(f: IO[bytes], n: int) -> None:
    f.seek(n, os.SEEK_CUR)


def _value(f: IO[bytes], kind: int, max_array: int) -> Any:
    """One value of type ``kind``; arrays over ``max_array`` items become SkippedArray."""
    if kind in _SCALARS:
        return _scalar(f, kind)
    if kind == _STRING:
        return _string(f)
    if kind != _ARRAY:
        raise GgufHeaderError(f"unknown metadata value type {kind}")
    item, count = struct.unpack("<IQ", _exact(f, 12))
    if count <= max_array:
        return [_value(f, item, max_array) for _ in range(count)]
    if item in _SCALARS:
        _skip(f, count * struct.calcsize(_SCALARS[item]))
    elif item == _STRING:
        for _ in range(count):
            (length,) = struct.unpack("<Q", _exact(f, 8))
            _skip(f, length)
    else:
        for _ in range(count):  # arrays of arrays: rare, short; walk them
            _value(f, item, 0)
    return SkippedArray(count)


def _read(f: IO[bytes], max_array: int) -> dict[str, Any]:
    if _exact(f, 4) != MAGIC:
        raise GgufHeaderError("does not start with 'GGUF' (not a GGUF model file)")
    version, _tensors, keys = struct.unpack("<IQQ", _exact(f, 20))
    if version not in SUPPORTED_VERSIONS:
        raise GgufHeaderError(f"GGUF version {version} is not supported "
                              f"({' or '.join(map(str, SUPPORTED_VERSIONS))})")
    if keys > MAX_KEYS:
        raise GgufHeaderError(f"the header claims {keys} metadata entries")
    out: dict[str, Any] = {}
    for _ in range(keys):
        key = _string(f)
        (kind,) = struct.unpack("<I", _exact(f, 4))
        out[key] = _value(f, kind, max_array)
    return out
