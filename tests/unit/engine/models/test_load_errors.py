"""Loading a model: clear errors for what velod cannot run, memory refused with the figures,
and how the weights are held."""

from __future__ import annotations

import pytest

from tests.unit.engine.models.tiny_gguf import TinySpec, write_tiny
from velod.engine.models import (
    ModelFileError,
    NotEnoughMemory,
    UnsupportedModel,
    load_model,
)


def test_an_unknown_architecture_names_the_supported_ones(tmp_path):
    spec = TinySpec("mamba", layers=1)
    path = write_tiny(tmp_path / "mamba.gguf", spec)
    with pytest.raises(UnsupportedModel, match="'mamba' is not supported; supported: llama, "
                       "qwen2, gemma3"):
        load_model(str(path))


def test_an_unsupported_tensor_type_is_named(tmp_path):
    spec = TinySpec("llama", layers=1, types={"attn_q": "IQ4_NL"})
    path = write_tiny(tmp_path / "iq.gguf", spec)
    with pytest.raises(UnsupportedModel, match=r"iq.gguf: tensor 'blk.0.attn_q.weight': tensor "
                       r"type IQ4_NL is not supported; supported: F32, F16, BF16, Q4_0"):
        load_model(str(path))


def test_a_tensor_that_contradicts_the_metadata_is_named(tmp_path):
    spec = TinySpec("llama", layers=1, metadata={"feed_forward_length": 384})
    path = write_tiny(tmp_path / "ffn.gguf", spec)
    with pytest.raises(ModelFileError, match=r"'blk.0.ffn_gate.weight' has shape \(512, 256\), "
                       r"expected \(384, 256\)"):
        load_model(str(path))


def test_not_enough_memory_is_refused_with_the_figures(tiny_llama):
    with pytest.raises(NotEnoughMemory, match=r"needs 4\.\d MiB as float32 weights .* only "
                       r"1\.0 MiB of memory is available"):
        load_model(str(tiny_llama), available=2**20)


def test_weights_report_how_they_are_held(tiny_llama):
    model = load_model(str(tiny_llama))
    weights = model.describe()["weights"]
    assert weights["dtype"] == "float32"
    assert weights["bytes"] == model.weights.nbytes > weights["file_bytes"]
    assert weights["source_types"]["Q4_K"] == 2 and not weights["tied_output"]
    layer = model.weights.layers[0]
    assert layer.wqkv.shape == (256 + 2 * 128, 256) and layer.wqkv.flags.c_contiguous
    assert layer.wgu.shape == (2 * 512, 256)
