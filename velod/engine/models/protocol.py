"""What the engine asks of a model with weights, beyond the synthetic model's ``Model``.

Backwards compatible: the engine keeps driving any ``Model`` (``begin_step``, ``layer_qkv``,
``layer_output``, ``sample``); a :class:`LanguageModel` also says, per layer, which tokens its
attention sees and at what softmax scale, takes the rows to sample at ``begin_step`` (so its
last layer computes only those), and gives logits. :func:`layer_attention` answers for any
model, with full attention at the engine's scale for one that does not say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class LayerAttention:
    """A layer's attention: ``window`` = None (every earlier token) or the sliding window's
    size in tokens (the token itself and the ``window - 1`` before it); ``scale`` multiplies
    q·k before the softmax."""

    window: int | None
    scale: float


@runtime_checkable
class LanguageModel(Protocol):
    """A model that computes real q/k/v from weights (see module docstring)."""

    name: str
    kind: str
    vocab_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    context_length: int

    def begin_step(self, token_ids: np.ndarray, positions: np.ndarray,
                   sample_indices: np.ndarray | None = None) -> None:
        """The step's flat tokens and positions (int32); with ``sample_indices`` the last
        layer computes only those rows (``logits``/``sample`` must then get the same)."""

    def layer_attention(self, layer: int) -> LayerAttention: ...

    def layer_qkv(self, layer: int) -> tuple[Any, Any, Any]: ...

    def layer_output(self, layer: int, attention: Any) -> None: ...

    def logits(self, sample_indices: np.ndarray) -> np.ndarray:
        """float32 ``[len(sample_indices), vocab_size]``."""

    def sample(self, sample_indices: np.ndarray) -> np.ndarray: ...


def layer_attention(model: Any, layer: int, default_scale: float) -> LayerAttention:
    """``model``'s attention for ``layer``, or full attention at ``default_scale``."""
    own = getattr(model, "layer_attention", None)
    return own(layer) if own is not None else LayerAttention(None, default_scale)
