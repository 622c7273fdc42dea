"""The GGUF models' paged forward pass against an independent dense NumPy reference.

Tiny random-weight GGUFs of each architecture (``tiny_gguf``), several sequences at once
through the paged runner — prompts in chunks, decode steps, a sliding-window layer run past
its window — and every step's logits compared with the dense forward of the whole sequence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.unit.engine.models.dense_reference import DenseModel
from tests.unit.engine.models.paged_runner import PagedRunner
from tests.unit.engine.models.tiny_gguf import SPECS
from velod.engine.models import load_model

TOLERANCE = 1e-4  # max |logit - reference| / max |reference logit|, per step


def relative(got: np.ndarray, expected: np.ndarray) -> float:
    assert np.isfinite(got).all(), "NaN logits: a slot outside the context was read"
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def check_schedule(path: Path, dense: DenseModel, prompts: list[list[int]],
                   schedule: list[list[tuple[int, int]]], **runner) -> float:
    """Runs ``schedule`` (per step: (sequence, tokens to feed)) and returns the worst
    relative logit error over every step and sequence."""
    model = load_model(str(path))
    paged = PagedRunner(model, **runner)
    fed = [0] * len(prompts)
    worst = 0.0
    for step in schedule:
        work = []
        for seq, count in step:
            work.append((seq, prompts[seq][fed[seq]:fed[seq] + count]))
            fed[seq] += count
        logits = paged.step(work)
        for seq, _ in step:
            expected = dense.forward(prompts[seq][:fed[seq]])[-1]
            worst = max(worst, relative(logits[seq], expected))
    return worst


def token_streams(count: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 97, length).tolist() for _ in range(count)]


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_one_sequence_prefill_then_decode_matches_dense_reference(tiny, arch):
    path, dense = tiny[arch]
    prompts = token_streams(1, 20, seed=1)
    schedule = [[(0, 11)]] + [[(0, 1)]] * 9
    assert check_schedule(path, dense, prompts, schedule) < TOLERANCE


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_mixed_batches_of_chunks_and_decodes_match_dense_reference(tiny, arch):
    # Sequence 0 decodes while 1 prefills in chunks and 2 arrives late; block size 3 puts
    # chunk ends in the middle of blocks.
    path, dense = tiny[arch]
    prompts = token_streams(3, 24, seed=2)
    schedule = [
        [(0, 7)],
        [(0, 1), (1, 5)],
        [(0, 1), (1, 6), (2, 2)],
        [(0, 1), (1, 1), (2, 9)],
        *[[(0, 1), (1, 1), (2, 1)]] * 6,
    ]
    assert check_schedule(path, dense, prompts, schedule, block_size=3) < TOLERANCE


@pytest.mark.parametrize("decode_kernel", [True, False])
def test_sliding_window_layers_past_their_window_match_dense_reference(tiny, decode_kernel):
    # gemma3's tiny model has a 6-token window on layers 0-4: 30 tokens go far past it, and
    # blocks before every window are poisoned as if freed and reused.
    path, dense = tiny["gemma3"]
    prompts = token_streams(2, 30, seed=3)
    schedule = [[(0, 9), (1, 4)], [(0, 5), (1, 10)]] + [[(0, 1), (1, 1)]] * 16
    assert check_schedule(path, dense, prompts, schedule, block_size=2,
                          poison_outside_window=True, decode_kernel=decode_kernel) < TOLERANCE


def test_sixteen_sequences_decode_together(tiny):
    path, dense = tiny["llama"]
    prompts = token_streams(16, 12, seed=4)
    schedule = [[(s, 8) for s in range(16)]] + [[(s, 1) for s in range(16)]] * 4
    assert check_schedule(path, dense, prompts, schedule) < TOLERANCE


def test_logits_of_every_row_without_sample_indices(tiny):
    # begin_step without sample rows keeps every row through the last layer.
    path, dense = tiny["qwen2"]
    model = load_model(str(path))
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    expected = dense.forward(tokens)
    paged = PagedRunner(model)
    paged.step([(0, tokens)])  # fills the cache; then recompute with all rows kept
    model.begin_step(np.array(tokens, np.int32), np.arange(8, dtype=np.int32))
    from velod.kernels import reference

    tables = np.array([paged.seqs[0].blocks], np.int32)
    for layer in range(model.layers):
        q, _, _ = model.layer_qkv(layer)
        attn = model.layer_attention(layer)
        out = reference.paged_prefill_attention(q, paged.keys[layer], paged.values[layer],
                                                tables, np.array([0, 8], np.int32),
                                                np.array([8], np.int32), attn.scale)
        model.layer_output(layer, out)
    assert relative(model.logits(np.arange(8)), expected) < TOLERANCE
    assert np.array_equal(model.sample(np.arange(8)), expected.argmax(axis=1))


def test_the_dense_reference_notices_a_wrong_rope_style(tiny, monkeypatch):
    # Guard against a comparison that cannot fail: the same run with llama's rotation
    # switched to NeoX must miss by far more than the tolerance.
    from velod.engine.models import ops

    rotate = ops.apply_rope
    monkeypatch.setattr(ops, "apply_rope",
                        lambda x, cos, sin, style: rotate(x, cos, sin, "neox"))
    path, dense = tiny["llama"]
    prompts = token_streams(1, 10, seed=5)
    assert check_schedule(path, dense, prompts, [[(0, 10)]]) > 100 * TOLERANCE


def test_the_dense_reference_notices_a_missing_window(tiny, monkeypatch):
    from velod.engine.models.protocol import LayerAttention
    from velod.engine.models.transformer import TransformerModel

    monkeypatch.setattr(TransformerModel, "layer_attention",
                        lambda self, layer: LayerAttention(None, self._attention[layer].scale))
    path, dense = tiny["gemma3"]
    prompts = token_streams(1, 20, seed=6)
    assert check_schedule(path, dense, prompts, [[(0, 20)]]) > 100 * TOLERANCE


def test_layers_say_their_window_and_scale(tiny):
    from velod.engine.models import LanguageModel, layer_attention

    model = load_model(str(tiny["gemma3"][0]))
    assert isinstance(model, LanguageModel)
    kinds = [layer_attention(model, i, 0.5) for i in range(model.layers)]
    assert [k.window for k in kinds] == [6, 6, 6, 6, 6, None]
    assert {k.scale for k in kinds} == {64 ** -0.5}


def test_a_model_without_layer_attention_gets_full_attention_at_the_engine_scale():
    from velod.engine.models import layer_attention

    class Synthetic:
        pass

    spec = layer_attention(Synthetic(), 3, 0.125)
    assert spec.window is None and spec.scale == 0.125


def test_bad_step_inputs_are_engine_errors(tiny):
    from velod.engine.core.errors import EngineError

    model = load_model(str(tiny["llama"][0]))
    with pytest.raises(EngineError, match=r"token id out of range \[0, 97\)"):
        model.begin_step(np.array([5, 97], np.int32), np.array([0, 1], np.int32))
    model.begin_step(np.array([5, 6], np.int32), np.array([0, 1], np.int32), np.array([1]))
    with pytest.raises(EngineError, match="prefill_attention='all'"):
        model.layer_output(0, None)
    for layer in range(model.layers):
        q, _, _ = model.layer_qkv(layer)
        model.layer_output(layer, np.zeros_like(q))
    with pytest.raises(EngineError, match="other rows than begin_step's"):
        model.logits(np.array([0]))
    assert model.logits(np.array([1])).shape == (1, 97)


@pytest.mark.parametrize("dtype, tolerance", [("float16", 5e-4), ("bfloat16", 2e-3)])
def test_a_half_precision_kv_cache_stays_close_to_the_reference(tiny, dtype, tolerance):
    # q/k/v come back in the cache's type; only their rounding separates the results.
    path, dense = tiny["gemma3"]
    model = load_model(str(path), dtype=dtype)
    paged = PagedRunner(model, block_size=4)
    tokens = token_streams(1, 16, seed=7)[0]
    logits = paged.step([(0, tokens[:12])])[0]
    worst = relative(logits, dense.forward(tokens[:12])[-1])
    for i in range(12, 16):
        logits = paged.step([(0, [tokens[i]])])[0]
        worst = max(worst, relative(logits, dense.forward(tokens[:i + 1])[-1]))
    model.begin_step(np.array([1], np.int32), np.array([0], np.int32))
    q, k, v = model.layer_qkv(0)
    assert q.dtype == k.dtype == v.dtype == paged.keys[0].dtype
    assert worst < tolerance
