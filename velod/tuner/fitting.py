"""How much GPU memory a model takes under given settings, and whether models fit the GPUs.

Pure arithmetic over plain data; the planner searches settings with it. The estimate:

- weights: the model's size from ``/api/tags`` (GGUF tensors; Ollama loads them as they are);
- KV cache: :func:`velod.model.kv.kv_cache_bytes` for ``parallel`` slots of ``num_ctx`` tokens
  (full-attention layers hold every token, sliding-window layers only their window plus a
  micro-batch), where ``num_ctx`` is capped at the model's trained context (Ollama's
  llm/server.go does the same cap);
- compute buffers (an estimate, not Ollama's exact graph size): activations
  ``num_batch x embedding x 4 B x 6``, output logits ``num_batch x vocab x 4 B``, and without
  flash attention the f32 attention scores ``num_batch x heads x n_kv x 4 B`` that flash
  attention never materialises, plus a fixed 128 MiB of scratch;
- per GPU that hosts anything: 457 MiB for the CUDA/ROCm runtime (Ollama's
  ``DeviceInfo.MinimumMemory`` in ml/device.go);
- a margin per GPU (the planner's policy) for the estimate's error.

Multi-GPU placement is first-fit decreasing: a model goes whole onto the GPU with the most
room (as Ollama's scheduler prefers); one that no single GPU holds is split over all GPUs in
proportion to their room, each GPU carrying its own copy of the compute buffers. Real layer
splits are by whole layers, so the margin also covers the rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from velod.model.kv import kv_cache_bytes
from velod.model.metadata import Geometry

MIB = 1024**2
GPU_RUNTIME = 457 * MIB
COMPUTE_SCRATCH = 128 * MIB
VOCAB_IF_UNKNOWN = 152064  # the larger common vocabularies (Qwen 2.5); errs on the safe side


@dataclass(frozen=True)
class Footprint:
    """One model under one setting: bytes of weights, KV cache and compute buffers."""

    name: str
    weights: int
    kv_cache: int
    overhead: int  # compute buffers, repeated on every GPU the model runs on
    layers: int  # offloadable layers: blocks + the output layer, as Ollama counts num_gpu
    context: int  # num_ctx after the cap at the trained context

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead


def compute_overhead(geometry: Geometry, context: int, parallel: int, flash_attention: bool,
                     num_batch: int = 512) -> int:
    """Estimated compute-buffer bytes of one model instance (see the module docstring)."""
    activations = num_batch * geometry.embedding_length * 4 * 6
    logits = num_batch * (geometry.vocab_size or VOCAB_IF_UNKNOWN) * 4
    scores = 0 if flash_attention else num_batch * geometry.heads * context * parallel * 4
    return COMPUTE_SCRATCH + activations + logits + scores


def footprint(name: str, geometry: Geometry, weights: int, context: int, parallel: int,
              kv_cache_type: str, flash_attention: bool, num_batch: int = 512,
              unified: bool = False) -> Footprint:
    """The footprint of model ``name`` at ``context`` tokens x ``parallel`` slots (with
    ``unified``: ``parallel`` slots sharing one pool of ``context`` tokens)."""
    ctx = min(context, geometry.context_length)
    # Without flash attention llama.cpp cannot quantize the V cache; Ollama keeps both f16.
    cache_type = kv_cache_type if flash_attention else "f16"
    kv = kv_cache_bytes(geometry, ctx, parallel, cache_type, ubatch=num_batch, unified=unified)
    overhead = compute_overhead(geometry, ctx, 1 if unified else parallel, flash_attention,
                                num_batch)
    return Footprint(name=name, weights=weights, kv_cache=kv, overhead=overhead,
                     layers=geometry.layers + 1, context=ctx)


@dataclass(frozen=True)
class GpuRoom:
    """A GPU's memory as the planner sees it: total, held back for others, margin."""

    index: int
    total: int
    held_back: int
    margin: int

    @property
    def usable(self) -> int:
        """Bytes for Ollama; negative when the reserve and margin exceed the GPU."""
        return self.total - self.held_back - self.margin


@dataclass
class GpuLoad:
    """What a placement puts on one GPU."""

    room: GpuRoom
    weights: int = 0
    kv_cache: int = 0
    overhead: int = 0
    models: list[str] = field(default_factory=list)

    @property
    def used(self) -> int:
        return self.weights + self.kv_cache + self.overhead

    @property
    def free_after(self) -> int:
        return self.room.usable - self.used

    def free_for(self, fp: Footprint) -> int:
        """Room left for ``fp``'s weights and KV after its buffers (and the runtime)."""
        runtime = 0 if self.models else GPU_RUNTIME
        return self.free_after - fp.overhead - runtime

    def add(self, fp: Footprint, weights: int, kv_cache: int) -> None:
        if not self.models:
            self.overhead += GPU_RUNTIME
        self.weights += weights
        self.kv_cache += kv_cache
        self.overhead += fp.overhead
        self.models.append(fp.name)


@dataclass
class Placement:
    """Where each model goes; ``fits`` is False when some GPU goes over its usable memory."""

    loads: list[GpuLoad]
    gpus_of: dict[str, list[int]]

    @property
    def fits(self) -> bool:
        return all(load.free_after >= 0 for load in self.loads)


def place(footprints: list[Footprint], rooms: list[GpuRoom]) -> Placement:
    """Place ``footprints`` together on ``rooms`` (first-fit decreasing, split when needed)."""
    loads = [GpuLoad(room) for room in rooms]
    gpus_of: dict[str, list[int]] = {}
    for fp in sorted(footprints, key=lambda f: f.total, reverse=True):
        best = max(loads, key=lambda load: load.free_for(fp), default=None)
        if best is None:
            gpus_of[fp.name] = []
            continue
        if best.free_for(fp) >= fp.weights + fp.kv_cache:
            best.add(fp, fp.weights, fp.kv_cache)
            gpus_of[fp.name] = [best.room.index]
            continue
        _split(fp, loads)
        gpus_of[fp.name] = [load.room.index for load in loads]
    return Placement(loads, gpus_of)


def _split(fp: Footprint, loads: list[GpuLoad]) -> None:
    """Spread ``fp`` over every GPU in proportion to the room each has left for it."""
    rooms = [max(0, load.free_for(fp)) for load in loads]
    total_room = sum(rooms)
    shares = ([r / total_room for r in rooms] if total_room
              else [load.room.usable / max(1, sum(x.room.usable for x in loads))
                    for load in loads])
    given_w = given_kv = 0
    for i, (load, share) in enumerate(zip(loads, shares, strict=True)):
        last = i == len(loads) - 1
        weights = fp.weights - given_w if last else int(fp.weights * share)
        kv = fp.kv_cache - given_kv if last else int(fp.kv_cache * share)
        given_w += weights
        given_kv += kv
        load.add(fp, weights, kv)


def gpu_layers_that_fit(fp: Footprint, rooms: list[GpuRoom]) -> int:
    """Layers of ``fp`` (alone) that fit the GPUs when the whole model does not."""
    room = sum(max(0, r.usable - GPU_RUNTIME - fp.overhead) for r in rooms)
    per_layer = (fp.weights + fp.kv_cache) / fp.layers
    return max(0, min(fp.layers, int(room // per_layer))) if per_layer else fp.layers
