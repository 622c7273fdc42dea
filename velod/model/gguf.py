"""A GGUF file opened read-only and memory-mapped: its metadata and its tensor table.

Reading goes through ``gguf`` (llama.cpp's own reader, imported on first use). Every way a
file can be wrong — missing, not a GGUF, an unsupported version, cut short, a header that
contradicts itself — comes out as one exception type, :class:`ModelFileError`, whose message
names the file and what is wrong with it. Tensor data stays in the file's mapping until a
caller copies it (see ``velod.engine.models.weights``).

The tuner, which needs only a few scalars of a served model's header and must stay light,
reads them with ``velod.model.gguf_header`` (pure Python, no NumPy, arrays stepped over)
and shares this module's magic and versions.

Shapes are given in NumPy order, outermost first: a matrix GGUF lists as ``[in, out]``
(``ne0`` fastest) is ``(out, in)`` here, the way its bytes lie.
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

MAGIC = b"GGUF"
HEADER_BYTES = 24  # magic, version (u32), tensor count (u64), metadata count (u64)
SUPPORTED_VERSIONS = (2, 3)
# The smallest a metadata entry (key length u64 + 1 byte key + type u32) or a tensor entry
# (name length + 1 byte name + dims count u32 + type u32 + offset u64) can be: a count in the
# header that could not fit in the file is corruption, caught before parsing starts.
MIN_FIELD_BYTES = 8 + 1 + 4
MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 4 + 8


class ModelFileError(ValueError):
    """A model file that cannot be used; the message says which file and why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: where its bytes are and how to read them."""

    name: str
    shape: tuple[int, ...]   # NumPy order (outermost first)
    ggml_type: str           # GGMLQuantizationType name: "F32", "Q4_K", ...
    nbytes: int
    offset: int              # absolute byte offset in the file
    data: np.ndarray         # uint8 view of exactly ``nbytes`` bytes of the mapping

    @property
    def n_elements(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count


class GGUFFile:
    """An open GGUF file: ``metadata`` (plain values) and ``tensors`` by name.

    The mapping stays open while this object (or any tensor view) lives; ``close`` drops
    this object's references so the mapping can go once the views are gone.
    """

    def __init__(self, path: str | os.PathLike[str], metadata: dict[str, Any],
                 tensors: dict[str, TensorInfo], version: int, mapping: Any) -> None:
        self.path = Path(path)
        self.metadata = metadata
        self.tensors = tensors
        self.version = version
        self._mapping = mapping

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    def tensor(self, name: str) -> TensorInfo:
        """The tensor called ``name``, or ModelFileError saying it is missing."""
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFileError(self.path, f"has no tensor {name!r}") from None

    def release(self, info: TensorInfo) -> None:
        """Tells the kernel this process is done with a tensor's pages: they leave its
        resident memory, and come back from the page cache if read again (the mapping is
        read-only, so nothing is lost). Harmless to call twice."""
        mm = getattr(self._mapping, "_mmap", None)  # np.memmap's mmap object
        if mm is None or info.nbytes == 0 or not hasattr(mm, "madvise"):
            return
        import mmap

        start = info.offset - info.offset % mmap.PAGESIZE
        end = min(info.offset + info.nbytes, len(mm))
        with contextlib.suppress(OSError, ValueError):  # advice only
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        self.tensors = {}
        self._mapping = None


def _check_header(path: Path, size: int) -> int:
    """The version, after checking magic, version and counts against the file's size."""
    if size < HEADER_BYTES:
        raise ModelFileError(path, f"is {size} bytes, too short to be a GGUF file "
                             f"(the header alone is {HEADER_BYTES})")
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if header[:4] != MAGIC:
        raise ModelFileError(path, f"is not a GGUF file (starts with {header[:4]!r}, "
                             f"expected {MAGIC!r})")
    version, tensors, fields = struct.unpack("<IQQ", header[4:])
    if version not in SUPPORTED_VERSIONS:
        if version & 0xFFFF == 0:
            raise ModelFileError(path, "is a big-endian GGUF file; only little-endian is "
                                 "supported")
        raise ModelFileError(path, f"is GGUF version {version}; supported versions are "
                             f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
    room = size - HEADER_BYTES
    if fields * MIN_FIELD_BYTES > room or tensors * MIN_TENSOR_INFO_BYTES > room:
        raise ModelFileError(path, f"is corrupt or truncated: its header counts {fields} "
                             f"metadata entries and {tensors} tensors, more than "
                             f"{size} bytes can hold")
    return version


def _reader_class() -> type:
    """gguf.GGUFReader with every read checked against the end of the file, so a truncated
    or corrupt file fails at once with a clear error instead of reading short arrays (or,
    for an array whose length field is garbage, looping on empty reads)."""
    import numpy as np
    from gguf import GGUFReader

    class CheckedReader(GGUFReader):
        # The reader slices its np.memmap once per value (a million times for a 262k-token
        # vocabulary), and memmap's Python-level __getitem__/__array_finalize__ made that
        # most of a 9 s open; a plain ndarray view of the same mapping reads the same bytes.
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self.mapping = value
            self._plain = value.view(np.ndarray)

        def _get(self, offset, dtype, count=1, override_order=None):
            if int(offset) + np.dtype(dtype).itemsize * int(count) > self._plain.size:
                raise _Truncated(int(offset))
            return super()._get(offset, dtype, count, override_order)

    return CheckedReader


class _Truncated(Exception):
    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


def _plain(field: Any) -> Any:
    """A metadata field as a plain Python value (str, int, float, bool or a list)."""
    value = field.contents()
    if isinstance(value, list) or not hasattr(value, "item"):
        return value
    return value.item()


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Opens ``path`` read-only and memory-mapped; ModelFileError if it cannot be used."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ModelFileError(path, "is not a regular file")
        version = _check_header(path, size)
        reader = _reader_class()(path, "r")
    except ModelFileError:
        raise
    except _Truncated as exc:
        raise ModelFileError(path, f"is truncated or corrupt: it needs bytes past its end "
                             f"(a read at byte {exc.offset} of a {size}-byte file)") from None
    except FileNotFoundError:
        raise ModelFileError(path, "does not exist") from None
    except PermissionError:
        raise ModelFileError(path, "cannot be read (permission denied)") from None
    except OSError as exc:
        raise ModelFileError(path, f"cannot be read: {exc.strerror or exc}") from None
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError,
            TypeError, MemoryError) as exc:
        raise ModelFileError(path, f"is corrupt: {exc}") from None

    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the header's own counts, not model metadata
        try:
            metadata[key] = _plain(field)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelFileError(path, f"is corrupt: metadata {key!r}: {exc}") from None
    tensors: dict[str, TensorInfo] = {}
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size:
            raise ModelFileError(path, f"is truncated: tensor {t.name!r} ends at byte {end} "
                                 f"but the file has {size} bytes")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        data = reader.data[t.data_offset:end]
        tensors[t.name] = TensorInfo(t.name, shape, t.tensor_type.name, int(t.n_bytes),
                                     int(t.data_offset), data)
    return GGUFFile(path, metadata, tensors, version, reader.mapping)
