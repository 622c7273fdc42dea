"""Models driven through the real scheduler's batches, without the engine around them.

``numpy_step`` runs the NumPy model (``TransformerModel``) through one ``StepBatch`` with the
NumPy kernels (every row through the prefill kernel), which is the oracle the CUDA runner is
compared with; ``run_schedule`` feeds prompts through a ``Scheduler`` and one step function,
performing the batch's copy-on-write block copies first as the engine does. Used by the
runner's unit tests, its GPU tests and ``bench/gpu_model.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from velod.engine.core.scheduler import Scheduler
from velod.engine.core.scheduler_config import SchedulerConfig
from velod.engine.core.step import StepBatch
from velod.kernels import reference
from velod.kernels.layout import from_float32


def host_pool(layers: int, config: SchedulerConfig, kv_heads: int, head_dim: int,
              dtype: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-layer key and value caches on the host, every slot NaN until written."""
    nan = from_float32(np.full((), np.nan, np.float32), np.dtype(dtype))
    shape = (config.num_blocks, config.block_size, kv_heads, head_dim)
    return ([np.full(shape, nan) for _ in range(layers)],
            [np.full(shape, nan) for _ in range(layers)])


def numpy_step(model: Any, batch: StepBatch, keys: Sequence[np.ndarray],
               values: Sequence[np.ndarray]) -> np.ndarray:
    """The NumPy model through one batch; returns (a copy of) the logits of its sampled rows
    (the model reuses its logits buffer from one call to the next)."""
    model.begin_step(batch.token_ids, batch.positions, batch.sample_indices)
    for layer in range(model.layers):
        q, k, v = model.layer_qkv(layer)
        reference.write_cache(k, v, keys[layer], values[layer], batch.slot_mapping)
        attention = model.layer_attention(layer)
        model.layer_output(layer, reference.paged_prefill_attention(
            q, keys[layer], values[layer], batch.block_tables, batch.query_start_loc,
            batch.context_lens, attention.scale, window=attention.window))
    return np.array(model.logits(batch.sample_indices), copy=True)


@dataclass
class ScheduleRun:
    """What ``run_schedule`` saw: per request its generated tokens, per step the batch and
    what the step function returned besides the tokens, and the scheduler's id of each
    request (``ids[i]`` for ``prompts[i]``)."""

    tokens: dict[int, list[int]] = field(default_factory=dict)
    steps: list[tuple[StepBatch, Any]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)


def run_schedule(config: SchedulerConfig, prompts: Sequence[Sequence[int]], max_new: int,
                 step: Callable[[StepBatch], tuple[np.ndarray, Any]],
                 copy_blocks: Callable[[np.ndarray], None]) -> ScheduleRun:
    """Schedules ``prompts`` until every request finished. ``step(batch)`` returns the sampled
    tokens and anything to keep; ``copy_blocks(pairs)`` performs a batch's block copies.
    Requests are numbered 0.. in the order of ``prompts``."""
    scheduler = Scheduler(config)
    index = {scheduler.submit(list(p), max_new): i for i, p in enumerate(prompts)}
    run = ScheduleRun({i: [] for i in range(len(prompts))}, ids=list(index))
    while scheduler.has_work:
        batch = scheduler.step()
        if batch.is_empty:
            continue
        if len(batch.copies):
            copy_blocks(batch.copies)
        tokens, kept = step(batch)
        for seq_id, token in zip(batch.sample_seq_ids.tolist(), tokens.tolist(), strict=True):
            run.tokens[index[seq_id]].append(int(token))
        run.steps.append((batch, kept))
        scheduler.complete_step(batch, tokens)
    return run
