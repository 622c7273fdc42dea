"""Scheduler: config, submit validation, step layout, chunked prefill, priorities, aging,
preemption, abort, back-pressure, fork and prefix reuse."""

from __future__ import annotations

import numpy as np
import pytest

from velod.config import EngineConfig
from velod.engine import (
    EngineConfigError,
    InvalidRequest,
    QueueFull,
    Scheduler,
    SchedulerConfig,
    SequenceState,
    StepBatch,
    StepOrderError,
    UnknownSequence,
)


def small(**kw: object) -> SchedulerConfig:
    values = {"num_blocks": 64, "block_size": 4, "max_batch_size": 4,
              "max_tokens_per_step": 16, "max_model_len": 64, "aging_steps": 0} | kw
    return SchedulerConfig(**values)  # type: ignore[arg-type]


def model(batch: StepBatch) -> np.ndarray:
    """Stand-in model: the next token is 1000 + id * 10 + position (easy to check)."""
    last = batch.query_start_loc[1:] - 1
    ids_positions = dict(zip(batch.seq_ids.tolist(), batch.positions[last].tolist(),
                             strict=True))
    return np.array([1000 + i * 10 + ids_positions[i] for i in batch.sample_seq_ids.tolist()])


def run(s: Scheduler, max_steps: int = 1000) -> tuple[dict[int, list[int]], list[StepBatch]]:
    outputs: dict[int, list[int]] = {}
    batches = []
    for _ in range(max_steps):
        if not s.has_work:
            return outputs, batches
        batch = s.step()
        if batch.is_empty:
            continue
        batches.append(batch)
        for done in s.complete_step(batch, model(batch)):
            outputs[done.id] = done.output_token_ids
    raise AssertionError("workload did not drain")


# ---------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_tokens_per_step", {"max_batch_size": 32, "max_tokens_per_step": 16}),
        ("block_size", {"block_size": 24}),
        ("num_blocks", {"num_blocks": 0}),
        ("max_waiting", {"max_waiting": -3}),
        ("aging_steps", {"aging_steps": -1}),
        ("max_batch_size", {"max_batch_size": True}),
        ("max_waiting_tokens", {"max_waiting_tokens": 10}),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(EngineConfigError, match=field):
        small(**kwargs)


def test_presets_are_valid_and_differ() -> None:
    latency, throughput = SchedulerConfig.latency(), SchedulerConfig.throughput()
    assert latency.max_batch_size < throughput.max_batch_size
    assert latency.max_tokens_per_step < throughput.max_tokens_per_step
    assert SchedulerConfig.latency(num_blocks=10).num_blocks == 10


def test_config_from_engine_section() -> None:
    engine = EngineConfig()
    config = SchedulerConfig.from_engine(engine, num_blocks=100, max_model_len=4096)
    assert config.block_size == engine.block_size
    assert config.max_batch_size == engine.max_batch_size
    assert config.max_tokens_per_step == engine.max_tokens_per_step
    assert config.max_waiting == engine.max_waiting


# ---------------------------------------------------------------------- submit


@pytest.mark.parametrize(
    ("field", "prompt", "kwargs"),
    [
        ("prompt", [], {}),
        ("prompt", [1, 2.5], {}),
        ("prompt", [1, -2], {}),
        ("prompt", "hello", {}),
        ("prompt", list(range(64)), {}),
        ("prompt", [1, 2**40], {}),
        ("max_new_tokens", [1, 2], {"max_new_tokens": 0}),
        ("max_new_tokens", [1, 2], {"max_new_tokens": 63}),
        ("max_new_tokens", [1, 2], {"max_new_tokens": True}),
        ("priority", [1], {"priority": 10**6}),
        ("eos_token_id", [1], {"eos_token_id": -1}),
    ],
)
def test_submit_validates_and_names_the_field(field: str, prompt: object, kwargs: dict) -> None:
    s = Scheduler(small())
    options = {"max_new_tokens": 4} | kwargs
    with pytest.raises(InvalidRequest) as err:
        s.submit(prompt, **options)  # type: ignore[arg-type]
    assert err.value.field == field and field in str(err.value)


def test_submit_rejects_a_request_that_could_never_fit_the_cache() -> None:
    s = Scheduler(small(num_blocks=4))  # 16 slots
    with pytest.raises(InvalidRequest, match="needs 5 KV blocks"):
        s.submit(list(range(10)), 8)
    s.submit(list(range(10)), 7)  # 10 + 7 - 1 = 16 slots: fits exactly


def test_submit_checks_vocab_and_accepts_arrays() -> None:
    s = Scheduler(small(vocab_size=100))
    with pytest.raises(InvalidRequest, match=r"\[0, 99\]"):
        s.submit([5, 100], 2)
    seq_id = s.submit(np.array([5, 99], dtype=np.int64), 2)
    assert s.token_ids(seq_id).tolist() == [5, 99]


def test_queue_full_by_count_and_by_tokens() -> None:
    s = Scheduler(small(max_waiting=2, max_waiting_tokens=64))
    s.submit([1] * 10, 2)
    s.submit([1] * 10, 2)
    with pytest.raises(QueueFull, match="max_waiting"):
        s.submit([1], 2)
    s = Scheduler(small(max_waiting_tokens=64))
    s.submit([1] * 40, 2)
    with pytest.raises(QueueFull, match="max_waiting_tokens"):
        s.submit([1] * 30, 2)
    assert s.stats().rejected == 1


# ---------------------------------------------------------------------- step layout


def test_step_output_is_ready_for_a_kernel_launch() -> None:
    s = Scheduler(small(max_tokens_per_step=16))
    a = s.submit(list(range(6)), 3)
    first = s.step()
    assert first.num_decode == 0 and first.seq_ids.tolist() == [a]
    s.complete_step(first, model(first))
    b = s.submit(list(range(100, 105)), 3)
    batch = s.step()
    assert batch.seq_ids.tolist() == [a, b] and batch.num_decode == 1  # decode first
    assert batch.query_lens.tolist() == [1, 5]
    assert batch.query_start_loc.tolist() == [0, 1, 6]
    assert batch.context_lens.tolist() == [7, 5]
    assert batch.positions.tolist() == [6, 0, 1, 2, 3, 4]
    assert batch.token_ids.tolist()[0] == 1000 + a * 10 + 5
    assert batch.token_ids.tolist()[1:] == list(range(100, 105))
    for name in ("query_lens", "query_start_loc", "context_lens", "block_tables", "token_ids",
                 "positions", "slot_mapping", "sample_indices", "copies"):
        assert getattr(batch, name).dtype == np.int32, name
    assert batch.block_tables.shape == (2, 2)
    for i, seq_len in enumerate(batch.query_lens.tolist()):
        start = batch.query_start_loc[i]
        for j in range(seq_len):
            p = batch.positions[start + j]
            slot = batch.block_tables[i, p // 4] * 4 + p % 4
            assert batch.slot_mapping[start + j] == slot
    assert batch.sample_indices.tolist() == [0, 5]
    assert batch.sample_seq_ids.tolist() == [a, b]


def test_long_prompt_is_prefilled_in_chunks_while_others_decode() -> None:
    s = Scheduler(small(max_tokens_per_step=8, num_blocks=64, max_model_len=128))
    short = s.submit([1, 2, 3], 10)
    batch = s.step()
    s.complete_step(batch, model(batch))
    long = s.submit(list(range(40)), 2)
    chunk_steps = 0
    while s.state(long) is SequenceState.WAITING or s.state(long) is SequenceState.PREFILLING:
        batch = s.step()
        assert batch.num_tokens <= 8
        assert batch.seq_ids[0] == short and batch.num_decode == 1  # decode never stalls
        s.complete_step(batch, model(batch))
        chunk_steps += 1
    assert chunk_steps == 6  # 40 tokens at 7 per step


def test_lower_priority_value_is_admitted_first_then_fifo() -> None:
    s = Scheduler(small(max_batch_size=1, max_tokens_per_step=4))
    late = s.submit([1], 1, priority=5)
    first = s.submit([2], 1, priority=-1)
    second = s.submit([3], 1, priority=-1)
    order = [b.seq_ids[0] for b in run(s)[1]]
    assert order == [first, second, late]


def test_aging_lets_old_low_priority_work_overtake_a_flood() -> None:
    s = Scheduler(small(max_batch_size=1, max_tokens_per_step=4, aging_steps=2))
    starved = s.submit([7], 1, priority=10)
    admitted_at = None
    for step in range(200):
        s.submit([1], 1, priority=0)  # a fresh high-priority request every step
        batch = s.step()
        if starved in batch.seq_ids.tolist():
            admitted_at = step
            break
        s.complete_step(batch, model(batch))
    assert admitted_at is not None and 15 <= admitted_at <= 25  # ~ 10 levels * 2 steps


def test_without_aging_a_flood_starves_low_priority() -> None:
    s = Scheduler(small(max_batch_size=1, max_tokens_per_step=4, aging_steps=0))
    starved = s.submit([7], 1, priority=10)
    for _ in range(60):
        s.submit([1], 1, priority=0)
        batch = s.step()
        assert starved not in batch.seq_ids.tolist()
        s.complete_step(batch, model(batch))


def test_every_request_gets_exactly_max_new_tokens() -> None:
    s = Scheduler(small())
    wanted = {s.submit(list(range(i, i + 3 + i)), 1 + i % 5): 1 + i % 5 for i in range(12)}
    outputs, _ = run(s)
    assert {k: len(v) for k, v in outputs.items()} == wanted


# ---------------------------------------------------------------------- preemption


def test_preemption_recomputes_the_lowest_priority_most_recent_request() -> None:
    # 8 blocks of 4 = 32 slots; each request needs 8 + 15 = 23 slots: both cannot finish.
    s = Scheduler(small(num_blocks=8, max_tokens_per_step=16))
    high = s.submit(list(range(8)), 16, priority=0)
    low = s.submit(list(range(50, 58)), 16, priority=1)
    outputs, batches = run(s)
    preempted = [i for b in batches for i in b.preempted]
    assert preempted and set(preempted) == {low}
    assert len(outputs[high]) == 16 and len(outputs[low]) == 16
    # The victim was re-prefilled with its prompt and the tokens it had generated.
    first_preempt = next(b.step for b in batches if b.preempted)
    refill = next(b for b in batches if b.step > first_preempt and low in b.seq_ids.tolist())
    i = refill.seq_ids.tolist().index(low)
    start, count = refill.query_start_loc[i], refill.query_lens[i]
    position = refill.positions[start]
    history = list(range(50, 58)) + outputs[low]
    assert count > 1 and position + count > 8  # recompute reaches past the prompt
    assert refill.token_ids[start : start + count].tolist() == history[position : position + count]
    assert s.stats().preemptions == len(preempted)


def test_prefix_cache_hit_skips_computed_prompt_blocks() -> None:
    s = Scheduler(small())
    prompt = list(range(20))
    run_first = s.submit(prompt, 2)
    run(s)
    again = s.submit(prompt, 2)
    batch = s.step()
    assert batch.seq_ids.tolist() == [again] and run_first != again
    assert batch.positions[0] == 16 and batch.query_lens.tolist() == [4]
    assert s.stats().prefix_hit_tokens == 16


# ---------------------------------------------------------------------- abort, eos, order


def test_abort_in_every_state_frees_blocks_at_once() -> None:
    s = Scheduler(small(max_batch_size=2, max_tokens_per_step=8))
    decoding = s.submit([1, 2, 3], 20)
    prefilling = s.submit(list(range(30)), 5)
    waiting = s.submit([4], 5)
    batch = s.step()
    s.complete_step(batch, model(batch))
    assert s.state(decoding) is SequenceState.DECODING
    assert s.state(prefilling) is SequenceState.PREFILLING
    assert s.state(waiting) is SequenceState.WAITING
    for seq_id in (waiting, prefilling, decoding):
        assert s.abort(seq_id)
        with pytest.raises(UnknownSequence):
            s.state(seq_id)
    assert s.block_manager.num_used_blocks == 0 and not s.has_work
    assert not s.abort(decoding) and not s.abort(12345)
    assert set(s.step().finished) == {waiting, prefilling, decoding}


def test_abort_between_step_and_complete_step_drops_the_token() -> None:
    s = Scheduler(small())
    a = s.submit([1, 2], 5)
    b = s.submit([3, 4], 5)
    batch = s.step()
    s.abort(a)
    s.complete_step(batch, model(batch))
    outputs, _ = run(s)
    assert list(outputs) == [b] and len(outputs[b]) == 5


def test_eos_finishes_early_with_reason_stop() -> None:
    s = Scheduler(small())
    a = s.submit([1, 2], 10, eos_token_id=1002)  # the token produced at position 2
    batch = s.step()
    assert s.complete_step(batch, model(batch)) == []
    batch = s.step()
    (done,) = s.complete_step(batch, model(batch))
    assert done.id == a and done.reason == "stop" and len(done.output_token_ids) == 2


def test_steps_must_alternate_with_completions() -> None:
    s = Scheduler(small())
    s.submit([1, 2], 3)
    batch = s.step()
    with pytest.raises(StepOrderError):
        s.step()
    with pytest.raises(InvalidRequest, match="new_token_ids"):
        s.complete_step(batch, [1, 2, 3])
    s.complete_step(batch, {batch.sample_seq_ids[0].item(): 5})
    with pytest.raises(StepOrderError):
        s.complete_step(batch, [5])


# ---------------------------------------------------------------------- fork


def test_fork_shares_blocks_and_copies_the_partial_one_on_write() -> None:
    s = Scheduler(small())
    parent = s.submit([1, 2, 3, 4, 5], 6)
    batch = s.step()
    s.complete_step(batch, model(batch))
    child = s.fork(parent)
    bm = s.block_manager
    assert bm.block_ids(child) == bm.block_ids(parent)
    batch = s.step()
    assert batch.copies.shape == (1, 2)
    src, dst = batch.copies[0].tolist()
    assert {bm.block_ids(parent)[1], bm.block_ids(child)[1]} == {src, dst}
    s.complete_step(batch, model(batch))
    outputs, _ = run(s)
    assert len(outputs[parent]) == 6 and len(outputs[child]) == 6
    assert outputs[child][0] == outputs[parent][0]  # inherited before the fork


def test_fork_needs_a_decoding_parent() -> None:
    s = Scheduler(small())
    waiting = s.submit([1, 2], 3)
    with pytest.raises(UnknownSequence, match="waiting"):
        s.fork(waiting)


def test_stats_are_plain_data_and_track_the_queue() -> None:
    s = Scheduler(small())
    low = s.submit([1, 2, 3], 2, priority=2)
    high = s.submit([4, 5], 2, priority=-2)
    assert s.waiting_ids() == [high, low]
    stats = s.stats().to_dict()
    assert stats["waiting"] == 2 and stats["waiting_tokens"] == 5
    assert all(isinstance(v, int | float) for v in stats.values())
    run(s)
    stats = s.stats().to_dict()
    assert (stats["finished"], stats["generated_tokens"], stats["blocks_used"]) == (2, 4, 0)
