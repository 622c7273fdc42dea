"""Known open models: their attention geometry and the size of Ollama's default tag.

Used to plan for models a machine does not have (``velodctl tune plan --model llama3.1:8b``)
and as geometry presets for the engine. Geometry comes from each model's ``config.json`` on
its official Hugging Face repository (``num_hidden_layers``, ``num_attention_heads``,
``num_key_value_heads``, ``hidden_size``, ``head_dim`` where given, else hidden/heads;
``max_position_embeddings``, ``vocab_size``), which is what Ollama's GGUF metadata carries as
``<arch>.block_count``, ``.attention.head_count``, ``.attention.head_count_kv``,
``.embedding_length``, ``.attention.key_length``/``value_length`` and ``.context_length``.
Geometry was checked against those config.json files (or copies of them) with velod's code
search. Sizes are the weight sizes ollama.com/library lists for the default (4-bit) tag,
rounded there to 0.1 GB (decimal); they could not be re-checked from here, so they serve
what-if planning only: an installed model's exact ``/api/tags`` size always replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from velod.model.metadata import SWA_PERIODS, Geometry, swa_pattern
from velod.model.names import normalize_name

GB = 1000**3
MB = 1000**2


@dataclass(frozen=True)
class CatalogModel:
    """One known model: Ollama tag, geometry, default tag's weight bytes, parameter count."""

    name: str
    geometry: Geometry
    size: int
    parameter_size: str
    family: str
    source: str

    def show_model_info(self) -> dict[str, Any]:
        """``/api/show``'s ``model_info`` keys for this model (as Ollama names them)."""
        return self.geometry.to_metadata()


def _geometry(arch: str, layers: int, heads: int, kv_heads: int, embedding: int,
              context: int, vocab: int, head_dim: int | None = None,
              window: int = 0) -> Geometry:
    dim = head_dim if head_dim is not None else embedding // heads
    windowed = swa_pattern(layers, SWA_PERIODS[arch]) if window else ()
    return Geometry(architecture=arch, layers=layers, heads=heads, kv_heads=kv_heads,
                    key_length=dim, value_length=dim, embedding_length=embedding,
                    context_length=context, vocab_size=vocab, sliding_window=window,
                    windowed=windowed)


def _entry(name: str, family: str, params: str, size: int, geometry: Geometry,
           source: str) -> CatalogModel:
    return CatalogModel(name=name, geometry=geometry, size=size, parameter_size=params,
                        family=family, source=source)


_HF = "https://huggingface.co/{}/blob/main/config.json"

CATALOG: dict[str, CatalogModel] = {m.name: m for m in (
    # meta-llama/Llama-3.2-1B: 16 layers, 32 heads, 8 KV heads, hidden 2048 (head_dim 64),
    # 131072 positions. ollama.com/library/llama3.2:1b: 1.3 GB.
    _entry("llama3.2:1b", "llama", "1.2B", round(1.3 * GB),
           _geometry("llama", 16, 32, 8, 2048, 131072, 128256, head_dim=64),
           _HF.format("meta-llama/Llama-3.2-1B")),
    # meta-llama/Llama-3.2-3B: 28 layers, 24 heads, 8 KV heads, hidden 3072, head_dim 128,
    # 131072 positions. ollama.com/library/llama3.2:3b: 2.0 GB.
    _entry("llama3.2:3b", "llama", "3.2B", round(2.0 * GB),
           _geometry("llama", 28, 24, 8, 3072, 131072, 128256, head_dim=128),
           _HF.format("meta-llama/Llama-3.2-3B")),
    # meta-llama/Llama-3.1-8B: 32 layers, 32 heads, 8 KV heads, hidden 4096, 131072
    # positions. ollama.com/library/llama3.1:8b: 4.9 GB.
    _entry("llama3.1:8b", "llama", "8.0B", round(4.9 * GB),
           _geometry("llama", 32, 32, 8, 4096, 131072, 128256),
           _HF.format("meta-llama/Llama-3.1-8B")),
    # meta-llama/Llama-3.1-70B: 80 layers, 64 heads, 8 KV heads, hidden 8192, 131072
    # positions. ollama.com/library/llama3.1:70b: 43 GB.
    _entry("llama3.1:70b", "llama", "70.6B", 43 * GB,
           _geometry("llama", 80, 64, 8, 8192, 131072, 128256),
           _HF.format("meta-llama/Llama-3.1-70B")),
    # Qwen/Qwen2.5-0.5B: 24 layers, 14 heads, 2 KV heads, hidden 896 (head 64), 32768
    # positions. ollama.com/library/qwen2.5:0.5b: 398 MB.
    _entry("qwen2.5:0.5b", "qwen2", "494M", 398 * MB,
           _geometry("qwen2", 24, 14, 2, 896, 32768, 151936),
           _HF.format("Qwen/Qwen2.5-0.5B")),
    # Qwen/Qwen2.5-1.5B: 28 layers, 12 heads, 2 KV heads, hidden 1536 (head 128), 32768.
    # ollama.com/library/qwen2.5:1.5b: 986 MB.
    _entry("qwen2.5:1.5b", "qwen2", "1.5B", 986 * MB,
           _geometry("qwen2", 28, 12, 2, 1536, 32768, 151936),
           _HF.format("Qwen/Qwen2.5-1.5B")),
    # Qwen/Qwen2.5-3B: 36 layers, 16 heads, 2 KV heads, hidden 2048 (head 128), 32768.
    # ollama.com/library/qwen2.5:3b: 1.9 GB.
    _entry("qwen2.5:3b", "qwen2", "3.1B", round(1.9 * GB),
           _geometry("qwen2", 36, 16, 2, 2048, 32768, 151936),
           _HF.format("Qwen/Qwen2.5-3B")),
    # Qwen/Qwen2.5-7B: 28 layers, 28 heads, 4 KV heads, hidden 3584 (head 128), 32768
    # (Ollama's GGUF says 32768). ollama.com/library/qwen2.5:7b: 4.7 GB.
    _entry("qwen2.5:7b", "qwen2", "7.6B", round(4.7 * GB),
           _geometry("qwen2", 28, 28, 4, 3584, 32768, 151936),
           _HF.format("Qwen/Qwen2.5-7B")),
    # mistralai/Mistral-7B-Instruct-v0.3: 32 layers, 32 heads, 8 KV heads, hidden 4096,
    # 32768 positions; its GGUF architecture is "llama". ollama.com/library/mistral:7b: 4.1 GB.
    _entry("mistral:7b", "llama", "7.2B", round(4.1 * GB),
           _geometry("llama", 32, 32, 8, 4096, 32768, 32768),
           _HF.format("mistralai/Mistral-7B-Instruct-v0.3")),
    # google/gemma-2-9b: 42 layers, 16 heads, 8 KV heads, hidden 3584 but head_dim 256
    # (not 3584/16 = 224), 8192 positions, a 4096-token sliding window on every other layer
    # (sliding_window; llama.cpp's pattern 2). ollama.com/library/gemma2:9b: 5.4 GB.
    _entry("gemma2:9b", "gemma2", "9.2B", round(5.4 * GB),
           _geometry("gemma2", 42, 16, 8, 3584, 8192, 256000, head_dim=256, window=4096),
           _HF.format("google/gemma-2-9b")),
    # microsoft/Phi-3-mini-128k-instruct: 32 layers, 32 heads, 32 KV heads (no GQA), hidden
    # 3072 (head 96), 131072 positions (the 4k variant: 4096). Which variant Ollama's
    # phi3:mini carries today is unverified here. ollama.com/library/phi3:mini: 2.2 GB.
    _entry("phi3:mini", "phi3", "3.8B", round(2.2 * GB),
           _geometry("phi3", 32, 32, 32, 3072, 131072, 32064),
           _HF.format("microsoft/Phi-3-mini-128k-instruct")),
    # meta-llama/Llama-2-7b-hf: 32 layers, 32 heads, 32 KV heads (no GQA), hidden 4096,
    # 4096 positions. ollama.com/library/llama2:7b: 3.8 GB.
    _entry("llama2:7b", "llama", "6.7B", round(3.8 * GB),
           _geometry("llama", 32, 32, 32, 4096, 4096, 32000),
           _HF.format("meta-llama/Llama-2-7b-hf")),
)}

# Ollama's short names for the default tags.
ALIASES = {"llama3.2": "llama3.2:3b", "llama3.1": "llama3.1:8b", "qwen2.5": "qwen2.5:7b",
           "mistral": "mistral:7b", "gemma2": "gemma2:9b", "phi3": "phi3:mini",
           "llama2": "llama2:7b"}


def lookup(name: str) -> CatalogModel | None:
    """The catalog entry for ``name`` ("llama3.1:8b", "llama3.1", "llama3.1:latest")."""
    if name in CATALOG:
        return CATALOG[name]
    base, _, tag = normalize_name(name).rpartition(":")
    if tag == "latest" and base in ALIASES:
        return CATALOG[ALIASES[base]]
    return None


def names() -> list[str]:
    return sorted(CATALOG)


# Engine preset name -> catalog entry: the attention shapes the engine can run without weights
# (synthetic workloads, kernel benchmarks).
ENGINE_PRESETS: dict[str, str] = {
    "llama3.2-1b": "llama3.2:1b",
    "llama3.2-3b": "llama3.2:3b",
    "llama3.1-8b": "llama3.1:8b",
    "llama3-8b": "llama3.1:8b",  # Llama 3 and 3.1 8B share the attention shape
    "llama3.1-70b": "llama3.1:70b",
    "qwen2.5-0.5b": "qwen2.5:0.5b",
    "qwen2.5-1.5b": "qwen2.5:1.5b",
    "qwen2.5-3b": "qwen2.5:3b",
    "qwen2.5-7b": "qwen2.5:7b",
    "mistral-7b": "mistral:7b",
    "gemma2-9b": "gemma2:9b",
    "phi3-mini": "phi3:mini",
    "llama2-7b": "llama2:7b",
}


def engine_preset(name: str) -> CatalogModel | None:
    """The catalog entry behind engine preset ``name`` ("llama3.1-8b"), or None."""
    target = ENGINE_PRESETS.get(name)
    return CATALOG[target] if target is not None else None
