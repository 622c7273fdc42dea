"""A model's tensors in float32, laid out for one GEMM per matrix per step.

NumPy has no fast half-precision GEMM, so the CPU path holds every weight in float32. Each
layer matrix keeps GGUF's own row order ``[out, in]`` (C-contiguous) and a step multiplies
``x @ W.T``, which BLAS takes without a copy; the matrices a layer applies to the same input
are fused by stacking their rows — Q, K and V into one ``wqkv``, gate and up into one
``wgu`` — so each is one GEMM over every row of the step. Rows are dequantized straight into
their slice of the fused array, a chunk at a time, and each source tensor's mapped pages are
released once copied: peak memory stays near the final size (see ``load_weights``).

The output projection is stored transposed, ``output_t`` = ``[hidden, vocab]``: OpenBLAS
multiplies 8-128 rows by it markedly faster than by the ``[vocab, hidden]`` original
(BENCHMARKS.md), and at 262144 x 640 it is most of Gemma 3's work per step. A tied model
(no ``output.weight``) keeps only that array; its embedding lookup gathers columns.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from velod.engine.core.errors import EngineError
from velod.engine.models.hparams import HParams
from velod.engine.models.quants import check_supported, dequantize
from velod.model.gguf import GGUFFile, ModelFileError
from velod.units import format_size

DTYPE = np.dtype(np.float32)
# Headroom left to the rest of the system after loading: the KV pool and the step's
# activations come on top of the weights, and a machine with no free memory is unusable.
MIN_HEADROOM = 256 * 2**20
TRANSPOSE_BAND_ELEMENTS = 1 << 20  # elements decoded per band of a transposed tensor


class NotEnoughMemory(EngineError):
    """Loading would not fit in the available memory; the message gives the figures."""

    def __init__(self, needed: int, available: int, what: str) -> None:
        super().__init__(
            f"{what} needs {format_size(needed)} as float32 weights plus "
            f"{format_size(MIN_HEADROOM)} of headroom, but only {format_size(available)} of "
            "memory is available; free memory or use a smaller model")
        self.needed = needed
        self.available = available


@dataclass(frozen=True)
class Slot:
    """One destination array and the source tensors stacked into it by rows."""

    key: str
    shape: tuple[int, ...]
    sources: tuple[tuple[str, tuple[int, ...]], ...]   # (tensor name, its expected shape)
    transposed: bool = False                           # holds its one source's transpose

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * DTYPE.itemsize


@dataclass
class LayerWeights:
    """One decoder layer's arrays (None where the architecture has no such tensor)."""

    attn_norm: np.ndarray
    wqkv: np.ndarray                 # [q + k + v, hidden]
    wo: np.ndarray                   # [hidden, q]
    ffn_norm: np.ndarray
    wgu: np.ndarray                  # [2 * ffn, hidden]: gate rows, then up rows
    wdown: np.ndarray                # [hidden, ffn]
    bqkv: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None
    post_ffn_norm: np.ndarray | None = None


@dataclass
class Weights:
    """Every array a forward pass reads, and how they are held."""

    output_t: np.ndarray             # [hidden, vocab]; also the embedding when tied
    output_norm: np.ndarray
    layers: list[LayerWeights]
    embedding: np.ndarray | None = None  # [vocab, hidden], a model with its own output
    rope_factors: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """The embedding rows of ``tokens`` (int64), a new float32 ``[T, hidden]`` array."""
        if self.embedding is not None:
            return self.embedding.take(tokens, axis=0)
        return np.ascontiguousarray(self.output_t.take(tokens, axis=1).T)

    @property
    def nbytes(self) -> int:
        arrays = {id(a): a for a in _arrays(self)}
        return sum(a.nbytes for a in arrays.values())


def _arrays(weights: Weights) -> list[np.ndarray]:
    found = [weights.output_t, weights.output_norm]
    found += [a for a in (weights.embedding, weights.rope_factors) if a is not None]
    for layer in weights.layers:
        found.extend(a for a in vars(layer).values() if isinstance(a, np.ndarray))
    return found


def plan(hp: HParams, tensor_names: set[str] | frozenset[str]) -> list[Slot]:
    """The destination arrays of ``hp``'s model and where each row block comes from."""
    h, q, kv, ffn = hp.hidden, hp.q_width, hp.kv_width, hp.ffn
    vocab = hp.vocab_size
    output = "token_embd.weight" if hp.tied_output else "output.weight"
    slots = [Slot("output_t", (h, vocab), ((output, (vocab, h)),), transposed=True),
             Slot("output_norm", (h,), (("output_norm.weight", (h,)),))]
    if not hp.tied_output:
        slots.append(Slot("embedding", (vocab, h), (("token_embd.weight", (vocab, h)),)))
    if hp.layer_specs and hp.layer_specs[0].rope.has_factors:
        half = hp.layer_specs[0].rope.dims // 2
        slots.append(Slot("rope_factors", (half,), (("rope_freqs.weight", (half,)),)))
    for i in range(hp.layers):
        p = f"blk.{i}."
        slots += [
            Slot(f"{i}.attn_norm", (h,), ((p + "attn_norm.weight", (h,)),)),
            Slot(f"{i}.wqkv", (q + 2 * kv, h), ((p + "attn_q.weight", (q, h)),
                                                (p + "attn_k.weight", (kv, h)),
                                                (p + "attn_v.weight", (kv, h)))),
            Slot(f"{i}.wo", (h, q), ((p + "attn_output.weight", (h, q)),)),
            Slot(f"{i}.ffn_norm", (h,), ((p + "ffn_norm.weight", (h,)),)),
            Slot(f"{i}.wgu", (2 * ffn, h), ((p + "ffn_gate.weight", (ffn, h)),
                                            (p + "ffn_up.weight", (ffn, h)))),
            Slot(f"{i}.wdown", (h, ffn), ((p + "ffn_down.weight", (h, ffn)),)),
        ]
        if hp.qkv_bias:
            slots.append(Slot(f"{i}.bqkv", (q + 2 * kv,), ((p + "attn_q.bias", (q,)),
                                                           (p + "attn_k.bias", (kv,)),
                                                           (p + "attn_v.bias", (kv,)))))
        if hp.arch.qk_norm:
            d = hp.head_dim
            slots += [Slot(f"{i}.q_norm", (d,), ((p + "attn_q_norm.weight", (d,)),)),
                      Slot(f"{i}.k_norm", (d,), ((p + "attn_k_norm.weight", (d,)),))]
        if hp.arch.post_norms:
            slots += [Slot(f"{i}.post_attn_norm", (h,), ((p + "post_attention_norm.weight",
                                                          (h,)),)),
                      Slot(f"{i}.post_ffn_norm", (h,), ((p + "post_ffw_norm.weight", (h,)),))]
    return slots


def _dequantize_transposed(data: np.ndarray, ggml_type: str, out: np.ndarray) -> None:
    """Decodes a ``[rows, cols]`` tensor into ``out`` = ``[cols, rows]``, a band of rows at
    a time (a few MB of temporaries, whatever the tensor's size)."""
    cols, rows = out.shape
    row_bytes = data.size // rows
    band = max(1, TRANSPOSE_BAND_ELEMENTS // cols)
    scratch = np.empty((band, cols), DTYPE)
    for first in range(0, rows, band):
        last = min(first + band, rows)
        chunk = scratch[:last - first]
        dequantize(data[first * row_bytes:last * row_bytes], ggml_type, chunk)
        out[:, first:last] = chunk.T


def check_plan(gguf: GGUFFile, slots: list[Slot]) -> None:
    """Every source tensor exists with the expected shape and a supported type, or
    ModelFileError / UnsupportedQuantization naming the tensor."""
    for slot in slots:
        for name, shape in slot.sources:
            info = gguf.tensor(name)
            if info.shape != shape:
                raise ModelFileError(gguf.path, f"tensor {name!r} has shape {info.shape}, "
                                     f"expected {shape} from the metadata")
            check_supported(info.ggml_type)


def estimate_bytes(slots: list[Slot]) -> int:
    """Bytes the float32 weights will take."""
    return sum(slot.nbytes for slot in slots)


def available_memory() -> int | None:
    """Bytes of memory available now (psutil), or None where it cannot be read."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # no psutil, no /proc: load without the check
        return None


def load_weights(gguf: GGUFFile, hp: HParams, *, available: int | None = None) -> Weights:
    """Dequantizes the model's tensors into float32 arrays (blocking: call from a thread).

    Refuses with NotEnoughMemory before allocating anything when the estimate does not fit
    ``available`` (default: what psutil reports).
    """
    slots = plan(hp, frozenset(gguf.tensors))
    check_plan(gguf, slots)
    needed = estimate_bytes(slots)
    available = available_memory() if available is None else available
    if available is not None and needed + MIN_HEADROOM > available:
        raise NotEnoughMemory(needed, available, f"{hp.name} ({gguf.path.name})")
    start = time.perf_counter()
    arrays: dict[str, np.ndarray] = {}
    for slot in slots:
        out = np.empty(slot.shape, DTYPE)
        row = 0
        for name, shape in slot.sources:
            info = gguf.tensors[name]
            if slot.transposed:
                _dequantize_transposed(info.data, info.ggml_type, out)
            else:
                dequantize(info.data, info.ggml_type, out[row:row + shape[0]])
            gguf.release(info)
            row += shape[0]
        arrays[slot.key] = out
    layers = [LayerWeights(**{k.split(".", 1)[1]: v for k, v in arrays.items()
                              if k.startswith(f"{i}.")}) for i in range(hp.layers)]
    weights = Weights(output_t=arrays["output_t"], output_norm=arrays["output_norm"],
                      layers=layers, embedding=arrays.get("embedding"),
                      rope_factors=arrays.get("rope_factors"))
    types = Counter(gguf.tensors[name].ggml_type for slot in slots for name, _ in slot.sources)
    weights.info = {
        "dtype": "float32", "bytes": weights.nbytes,
        "file_bytes": sum(gguf.tensors[n].nbytes for s in slots for n, _ in s.sources),
        "source_types": dict(types.most_common()), "tied_output": hp.tied_output,
        "load_seconds": round(time.perf_counter() - start, 3)}
    return weights
