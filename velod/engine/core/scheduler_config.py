"""Scheduler limits, validated on construction, with latency and throughput presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from velod.engine.core.errors import EngineConfigError

PRIORITY_MIN = -1000
PRIORITY_MAX = 1000
"""Priorities are bounded so aging can always overtake them in a bounded number of steps."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of the scheduler and the KV cache it manages.

    ``aging_steps``: a waiting request gains one priority level per ``aging_steps`` steps
    of waiting (0 disables aging: strict priority, FIFO within a priority).
    """

    num_blocks: int = 4096
    block_size: int = 16
    max_batch_size: int = 64
    max_tokens_per_step: int = 2048
    max_model_len: int = 8192
    max_waiting: int = 4096
    max_waiting_tokens: int = 1 << 22
    aging_steps: int = 256
    enable_prefix_caching: bool = True
    vocab_size: int | None = None
    # A model with sliding-window layers: their window in tokens and the blocks of the second
    # pool that holds them (see velod.engine.core.window_pool).
    window: int | None = None
    window_blocks: int = 0

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_batch_size", "max_tokens_per_step",
                     "max_waiting", "max_waiting_tokens"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("max_model_len", self.max_model_len, minimum=2)
        _check_int("aging_steps", self.aging_steps, minimum=0)
        if self.vocab_size is not None:
            _check_int("vocab_size", self.vocab_size, minimum=1)
        if self.window is not None:
            _check_int("window", self.window, minimum=1)
            _check_int("window_blocks", self.window_blocks, minimum=1)
        if self.block_size & (self.block_size - 1):
            raise EngineConfigError("block_size", self.block_size, "must be a power of two")
        if self.max_tokens_per_step < self.max_batch_size:
            raise EngineConfigError(
                "max_tokens_per_step", self.max_tokens_per_step,
                f"must be >= max_batch_size ({self.max_batch_size}) so every running "
                "sequence can decode each step",
            )
        if self.max_waiting_tokens < self.max_model_len:
            raise EngineConfigError(
                "max_waiting_tokens", self.max_waiting_tokens,
                f"must be >= max_model_len ({self.max_model_len}) or a full-length prompt "
                "could never be queued",
            )
        if not isinstance(self.enable_prefix_caching, bool):
            raise EngineConfigError(
                "enable_prefix_caching", self.enable_prefix_caching, "must be true or false"
            )

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def replace(self, **changes: Any) -> SchedulerConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def latency(cls, **overrides: Any) -> SchedulerConfig:
        """Short steps: a small batch and small prefill chunks keep time-per-token low."""
        values: dict[str, Any] = {
            "max_batch_size": 16, "max_tokens_per_step": 512, "aging_steps": 64,
        }
        return cls(**(values | overrides))

    @classmethod
    def throughput(cls, **overrides: Any) -> SchedulerConfig:
        """Large batches and big prefill chunks: the most tokens per second."""
        values: dict[str, Any] = {
            "max_batch_size": 256, "max_tokens_per_step": 8192, "aging_steps": 1024,
        }
        return cls(**(values | overrides))

    @classmethod
    def from_engine(cls, engine: Any, **overrides: Any) -> SchedulerConfig:
        """Take block_size, max_batch_size, max_tokens_per_step, max_waiting from
        ``velod.config.EngineConfig``; pass ``num_blocks`` and ``max_model_len``."""
        values: dict[str, Any] = {
            "block_size": engine.block_size,
            "max_batch_size": engine.max_batch_size,
            "max_tokens_per_step": engine.max_tokens_per_step,
            "max_waiting": engine.max_waiting,
        }
        return cls(**(values | overrides))


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise EngineConfigError(name, value, "must be an integer")
    if value < minimum:
        raise EngineConfigError(name, value, f"must be >= {minimum}")
