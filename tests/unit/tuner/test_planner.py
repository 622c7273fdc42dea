"""The Ollama planner over real GPU sizes and real model geometries.

KV bytes per token are computed by hand here (layers x KV heads x (key + value length) x
bytes per element) from each model's config.json, independently of velod's catalog; Gemma 2's
windowed layers (every other one, window 4096) hold only window + micro-batch cells per slot.
"""

from __future__ import annotations

import json
import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from velod.config import TunerConfig
from velod.hardware.snapshot import Cpu, Gpu, GpuProcess, Memory, OsInfo, Snapshot
from velod.model import catalog
from velod.model.kv import kv_bytes_per_token
from velod.model.metadata import Geometry, UnknownArchitecture, swa_pattern
from velod.tuner.backends.ollama_settings import known_for_version
from velod.tuner.planner import (
    PROFILES,
    Plan,
    Policy,
    plan,
    what_if_snapshot,
    what_if_state,
)
from velod.tuner.state import ModelInfo, OllamaState, catalog_model

GIB = 1024**3
MIB = 1024**2

# f16 KV bytes per token, by hand from each model's config.json:
HAND_KV_F16 = {
    "llama3.2:3b": 28 * 8 * (128 + 128) * 2,  # = 114688
    "llama3.1:8b": 32 * 8 * (128 + 128) * 2,  # = 131072
    "qwen2.5:7b": 28 * 4 * (128 + 128) * 2,  # 3584 / 28 heads = 128; = 57344
    "mistral:7b": 32 * 8 * (128 + 128) * 2,  # = 131072
    "gemma2:9b": 42 * 8 * (256 + 256) * 2,  # head_dim 256, not 3584 / 16; = 344064
    "llama3.1:70b": 80 * 8 * (128 + 128) * 2,  # = 327680
    "llama2:7b": 32 * 32 * (128 + 128) * 2,  # no GQA: 32 KV heads; = 524288
    "phi3:mini": 32 * 32 * (96 + 96) * 2,  # no GQA, 3072 / 32 = 96; = 393216
}
MODELS = list(HAND_KV_F16)
GPU_SIZES = [8, 12, 16, 24, 48, 80]
VERSION = "0.32.1"


def test_hand_computed_kv_bytes_match_the_catalog() -> None:
    assert HAND_KV_F16["llama3.1:8b"] == 131072
    assert HAND_KV_F16["gemma2:9b"] == 344064
    for name, expected in HAND_KV_F16.items():
        geometry = catalog.lookup(name).geometry  # type: ignore[union-attr]
        assert kv_bytes_per_token(geometry, "f16") == expected, name
        assert kv_bytes_per_token(geometry, "q8_0") == expected / 2 * 34 / 32, name
        assert kv_bytes_per_token(geometry, "q4_0") == expected / 2 * 18 / 32, name


def make_plan(vram: float, gpus: int, installed_models: list[str], profile: str = "balanced",
              version: str | None = VERSION, **policy: object) -> Plan:
    snapshot = what_if_snapshot(int(vram * GIB), gpus, 64 * GIB)
    return plan(snapshot, what_if_state(installed_models, version),
                Policy(profile=profile, **policy))  # type: ignore[arg-type]


def assert_budgets_consistent(p: Plan) -> None:
    for b in p.budgets:
        assert b.free_after == (b.total - b.reserve - b.weights - b.kv_cache - b.overhead
                                - b.margin)
        assert b.fits == (b.free_after >= 0)
        if p.fits:
            assert b.weights + b.kv_cache + b.overhead + b.margin <= b.total - b.reserve


def hand_kv(name: str, context: int, parallel: int, cache: str) -> int:
    per_element = {"f16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}[cache]
    trained = catalog.lookup(name).geometry.context_length  # type: ignore[union-attr]
    cells = min(context, trained)
    per_token = HAND_KV_F16[name] / 2 * per_element
    if name == "gemma2:9b":  # 21 full layers; 21 windowed ones keep 4096 + 512 cells a slot
        half = per_token / 2
        return (math.ceil(half * cells * parallel)
                + math.ceil(half * min(cells, 4096 + 512) * parallel))
    return math.ceil(per_token * cells * parallel)


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("gpus", [1, 2])
@pytest.mark.parametrize("vram", GPU_SIZES)
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("profile", PROFILES)
def test_every_plan_fits_with_its_margin_or_says_why(vram: int, gpus: int, model: str,
                                                     profile: str) -> None:
    p = make_plan(vram, gpus, [model], profile)
    assert_budgets_consistent(p)
    mp = p.models[model]
    assert mp.kv_cache == hand_kv(model, mp.context, mp.parallel, mp.kv_cache_type)
    server = {k: r.value for k, r in p.server.items()}
    if mp.fully_on_gpu:
        assert p.fits
        assert int(server["OLLAMA_NUM_PARALLEL"]) == mp.parallel
        assert min(int(server["OLLAMA_CONTEXT_LENGTH"]), mp.trained_context) == mp.context
        assert sum(b.kv_cache for b in p.budgets) == mp.kv_cache
        assert p.model_params[model]["num_gpu"].value == str(mp.layers)
    else:
        assert not p.fits
        assert any(model in note and "CPU" in note for note in p.notes)
        assert int(p.model_params[model]["num_gpu"].value) < mp.layers
        assert "num_thread" in p.model_params[model]
    if server["OLLAMA_KV_CACHE_TYPE"] == "q4_0":
        assert profile == "low-memory"
    if server["OLLAMA_KV_CACHE_TYPE"] != "f16":
        assert server["OLLAMA_FLASH_ATTENTION"] == "true"


@pytest.mark.parametrize(("vram", "gpus", "model", "fits"), [
    (8, 1, "llama3.2:3b", True),
    (8, 1, "llama3.1:8b", True),
    (8, 1, "llama3.1:70b", False),
    (24, 1, "llama3.1:70b", False),  # 43 GB of weights
    (24, 2, "llama3.1:70b", True),  # split over two GPUs
    (48, 1, "llama3.1:70b", True),
    (80, 1, "llama3.1:70b", True),
])
def test_which_models_run_fully_on_the_gpu(vram: int, gpus: int, model: str,
                                           fits: bool) -> None:
    assert make_plan(vram, gpus, [model]).models[model].fully_on_gpu is fits


def test_llama31_8b_on_24gib_balanced_gets_two_32k_slots_at_f16() -> None:
    p = make_plan(24, 1, ["llama3.1:8b"])
    assert p.server["OLLAMA_CONTEXT_LENGTH"].value == "32768"
    assert p.server["OLLAMA_NUM_PARALLEL"].value == "2"
    assert p.server["OLLAMA_KV_CACHE_TYPE"].value == "f16"
    assert p.budgets[0].kv_cache == 131072 * 32768 * 2 == 8 * GIB
    assert p.budgets[0].weights == 4_900_000_000


def test_a_70b_model_spread_over_two_gpus_uses_both() -> None:
    p = make_plan(24, 2, ["llama3.1:70b"])
    assert p.models["llama3.1:70b"].gpus == [0, 1]
    assert all(b.weights > 0 and b.kv_cache > 0 for b in p.budgets)
    assert sum(b.weights for b in p.budgets) == 43 * 1000**3


def test_gemma2_context_is_capped_at_its_trained_8192() -> None:
    p = make_plan(80, 1, ["gemma2:9b"], "long-context")
    assert p.models["gemma2:9b"].context == 8192
    assert int(p.server["OLLAMA_CONTEXT_LENGTH"].value) == 8192


def test_long_context_profile_reaches_further_than_balanced() -> None:
    balanced = make_plan(24, 1, ["llama3.1:8b"], "balanced").models["llama3.1:8b"]
    long = make_plan(24, 1, ["llama3.1:8b"], "long-context").models["llama3.1:8b"]
    assert long.context > balanced.context
    assert long.kv_cache_type == "q8_0"


def test_throughput_profile_has_more_slots_than_balanced() -> None:
    for vram in (12, 24, 48):
        balanced = make_plan(vram, 1, ["qwen2.5:7b"], "balanced").models["qwen2.5:7b"]
        fast = make_plan(vram, 1, ["qwen2.5:7b"], "throughput").models["qwen2.5:7b"]
        assert fast.parallel > balanced.parallel, vram


def test_balanced_quantizes_the_cache_only_when_f16_does_not_fit_8k() -> None:
    # llama3.1:8b on 8 GiB: 8192 tokens at f16 fit, so the cache stays f16.
    assert make_plan(8, 1, ["llama3.1:8b"]).server["OLLAMA_KV_CACHE_TYPE"].value == "f16"
    # gemma2:9b on 8 GiB: 5.4 GB of weights leave too little for 8192 x 344064 B at f16.
    p = make_plan(8, 1, ["gemma2:9b"])
    assert p.server["OLLAMA_KV_CACHE_TYPE"].value == "q8_0"
    assert "needed to fit" in p.server["OLLAMA_KV_CACHE_TYPE"].reason


# --------------------------------------------------------------------------- hardware cases


def snapshot_with(*gpus: Gpu, cores: int = 12) -> Snapshot:
    return Snapshot(time=0.0, gpus=tuple(gpus), cpu=Cpu("cpu", cores, cores * 2),
                    memory=Memory(64 * GIB, 50 * GIB), os=OsInfo("Linux", "6.1", "x86_64"))


def installed(*names: str, version: str = VERSION) -> OllamaState:
    return OllamaState(version=version,
                       models=[catalog_model(catalog.lookup(n), "installed")  # type: ignore
                               for n in names],
                       loaded=[], reachable=True)


@pytest.mark.parametrize("profile", PROFILES)
def test_cpu_only_machine_gets_threads_and_a_modest_context(profile: str) -> None:
    p = plan(snapshot_with(cores=12), installed("llama3.1:8b", "qwen2.5:7b"),
             Policy(profile=profile))
    assert p.cpu_only and p.budgets == [] and p.ram is not None
    assert not {"OLLAMA_FLASH_ATTENTION", "OLLAMA_KV_CACHE_TYPE", "OLLAMA_GPU_OVERHEAD",
                "OLLAMA_SCHED_SPREAD", "LLAMA_ARG_FIT_TARGET"} & set(p.server)
    assert int(p.server["OLLAMA_CONTEXT_LENGTH"].value) <= 16384
    for params in p.model_params.values():
        assert params["num_thread"].value == "12"
        assert params["num_gpu"].value == "0"
    assert p.ram.fits and p.ram.free_after >= 0


def test_cpu_only_model_too_big_for_ram_is_reported() -> None:
    snapshot = Snapshot(time=0.0, gpus=(), cpu=Cpu("cpu", 4, 8), memory=Memory(16 * GIB, GIB),
                        os=OsInfo("Linux", "6.1", "x86_64"))
    p = plan(snapshot, installed("llama3.1:70b", "llama3.2:3b"), Policy())
    assert p.ram is not None and not p.ram.fits and not p.fits
    assert p.ram.weights == 43 * 1000**3
    assert any("llama3.1:70b" in n and "RAM" in n for n in p.notes)


def test_a_model_no_setting_fits_gets_the_smallest_setting_and_says_why() -> None:
    p = make_plan(8, 1, ["llama3.1:70b"])
    assert p.server["OLLAMA_CONTEXT_LENGTH"].value == "2048"
    assert "does not fit the GPU even so" in p.server["OLLAMA_CONTEXT_LENGTH"].reason
    assert p.model_params["llama3.1:70b"]["num_ctx"].value == "2048"


def test_unreachable_ollama_is_noted() -> None:
    state = OllamaState(version=None, models=[], loaded=[], reachable=False,
                        error="connection refused")
    p = plan(what_if_snapshot(24 * GIB, 1, 64 * GIB), state, Policy())
    assert any("not reachable (connection refused)" in n for n in p.notes)


@pytest.mark.parametrize("cc", [(7, 2), (5, 2)])
def test_no_flash_attention_and_no_quantized_cache_on_unsupported_gpus(
        cc: tuple[int, int]) -> None:
    gpu = Gpu(index=0, vendor="nvidia", name="old", memory_total=8 * GIB, compute_capability=cc)
    for profile in PROFILES:
        p = plan(snapshot_with(gpu), installed("llama3.1:8b"), Policy(profile=profile))
        assert p.server["OLLAMA_FLASH_ATTENTION"].value == "false"
        assert p.server["OLLAMA_KV_CACHE_TYPE"].value == "f16"
        assert "compute capability" in p.server["OLLAMA_FLASH_ATTENTION"].reason


def test_amd_gpus_follow_ollamas_flash_attention_table() -> None:
    gpu = Gpu(index=0, vendor="amd", name="RX 7900 XTX", memory_total=24 * GIB)
    p = plan(snapshot_with(gpu), installed("llama3.1:8b"), Policy())
    assert p.server["OLLAMA_FLASH_ATTENTION"].value == "true"
    assert "ROCm" in p.server["OLLAMA_FLASH_ATTENTION"].reason


def test_vram_held_by_other_programs_is_left_to_them() -> None:
    gpu = Gpu(index=0, vendor="nvidia", name="RTX 4090", memory_total=24 * GIB,
              compute_capability=(8, 9),
              processes=(GpuProcess(1, "python3", 6 * GIB), GpuProcess(2, "ollama", 5 * GIB)))
    p = plan(snapshot_with(gpu), installed("llama3.1:8b"), Policy())
    assert p.budgets[0].reserve == 6 * GIB  # the ollama process is not "other"
    assert any("other programs use" in n for n in p.notes)
    assert_budgets_consistent(p)


def test_a_gpu_without_memory_size_is_left_out() -> None:
    broken = Gpu(index=1, vendor="nvidia", name="lost", error="GPU is lost")
    good = Gpu(index=0, vendor="nvidia", name="ok", memory_total=24 * GIB,
               compute_capability=(8, 9))
    p = plan(snapshot_with(good, broken), installed("llama3.1:8b"), Policy())
    assert [b.index for b in p.budgets] == [0]
    assert any("GPU 1" in n and "GPU is lost" in n for n in p.notes)


# --------------------------------------------------------------------------- models & policy


def test_tuner_models_that_fit_together_stay_loaded_together() -> None:
    p = make_plan(24, 1, ["llama3.2:3b", "qwen2.5:7b"], models=["llama3.2:3b", "qwen2.5:7b"])
    assert p.resident == ["llama3.2:3b", "qwen2.5:7b"]
    assert p.server["OLLAMA_MAX_LOADED_MODELS"].value == "2"
    assert sorted(p.budgets[0].models) == ["llama3.2:3b", "qwen2.5:7b"]
    assert p.budgets[0].kv_cache == sum(p.models[m].kv_cache for m in p.resident)
    assert_budgets_consistent(p)


def test_a_listed_model_that_does_not_fit_alongside_is_sized_alone() -> None:
    # 4.9 GB + 5.4 GB of weights leave no room for two 8192-token caches in 12 GiB.
    p = make_plan(12, 1, ["llama3.1:8b", "gemma2:9b"], models=["llama3.1:8b", "gemma2:9b"])
    assert p.resident == ["llama3.1:8b"]
    assert p.server["OLLAMA_MAX_LOADED_MODELS"].value == "1"
    assert p.models["gemma2:9b"].fully_on_gpu
    assert any("sized to fit alone" in n for n in p.notes)


def test_without_tuner_models_every_installed_model_fits_alone() -> None:
    p = make_plan(12, 1, ["llama3.2:3b", "phi3:mini", "gemma2:9b"])
    assert all(m.fully_on_gpu for m in p.models.values())
    assert p.server["OLLAMA_MAX_LOADED_MODELS"].value == "3"  # Ollama's default, stated
    assert p.server["OLLAMA_MAX_LOADED_MODELS"].default == "3"
    assert any("each installed model fits alone" in n for n in p.notes)


def test_listed_model_not_installed_is_planned_from_the_catalog() -> None:
    p = plan(what_if_snapshot(24 * GIB, 1, 64 * GIB), installed("qwen2.5:7b"),
             Policy(models=["llama3.1:8b", "no-such-model:1b"]))
    assert p.models["llama3.1:8b"].source == "catalog"
    assert "qwen2.5:7b" not in p.models  # not in tuner.models
    assert p.skipped["no-such-model:1b"] == "not installed and not in velod's catalog"


def test_unknown_architecture_is_skipped_with_its_reason() -> None:
    try:
        Geometry.from_metadata({"general.architecture": "rwkv7", "rwkv7.block_count": 24})
    except UnknownArchitecture as exc:
        odd = ModelInfo("rwkv:7b", "sha256:1", 3 * GIB, None, skip_reason=str(exc))
    state = installed("llama3.1:8b")
    state = OllamaState(version=VERSION, models=[*state.models, odd], loaded=[], reachable=True)
    p = plan(what_if_snapshot(24 * GIB, 1, 64 * GIB), state, Policy())
    assert "rwkv:7b" not in p.models and "rwkv:7b" not in p.model_params
    assert "no rwkv7.attention.head_count" in p.skipped["rwkv:7b"]
    assert p.models["llama3.1:8b"].fully_on_gpu


def test_what_if_state_skips_names_the_catalog_does_not_know() -> None:
    p = make_plan(24, 1, ["llama3.1:8b", "mystery:13b"])
    assert "not in velod's catalog" in p.skipped["mystery:13b"]


def test_no_models_still_states_every_setting() -> None:
    p = make_plan(24, 1, [])
    assert p.server["OLLAMA_CONTEXT_LENGTH"].value == "32768"  # Ollama's own default here
    assert p.server["OLLAMA_NUM_PARALLEL"].value == "1"
    assert any("no models" in n for n in p.notes)


def test_spilling_loaded_model_is_reported() -> None:
    from velod.tuner.state import LoadedModel
    state = installed("llama3.1:8b")
    state = OllamaState(version=VERSION, models=state.models, reachable=True,
                        loaded=[LoadedModel("llama3.1:8b", 10 * GIB, 6 * GIB, 131072)])
    p = plan(what_if_snapshot(8 * GIB, 1, 64 * GIB), state, Policy())
    assert any("llama3.1:8b runs 40% on the CPU" in n for n in p.notes)


# --------------------------------------------------------------------------- pins & versions


def test_pins_are_kept_and_the_search_respects_them() -> None:
    p = make_plan(24, 1, ["llama3.1:8b"],
                  pin={"OLLAMA_NUM_PARALLEL": "4", "OLLAMA_KEEP_ALIVE": "30m"})
    for name, value in (("OLLAMA_NUM_PARALLEL", "4"), ("OLLAMA_KEEP_ALIVE", "30m")):
        rec = p.server[name]
        assert (rec.value, rec.pinned, rec.reason) == (value, True, "pinned in config")
    mp = p.models["llama3.1:8b"]
    assert mp.parallel == 4
    assert mp.kv_cache == hand_kv("llama3.1:8b", mp.context, 4, mp.kv_cache_type)
    assert not p.server["OLLAMA_CONTEXT_LENGTH"].pinned


def test_pinned_context_that_does_not_fit_keeps_its_value_and_says_so() -> None:
    p = make_plan(8, 1, ["llama3.1:8b"], pin={"OLLAMA_CONTEXT_LENGTH": "131072"})
    assert p.server["OLLAMA_CONTEXT_LENGTH"].value == "131072"
    assert not p.fits
    assert any("llama3.1:8b" in n and "CPU" in n for n in p.notes)


def test_pinning_a_variable_ollama_does_not_read_is_refused_with_a_note() -> None:
    p = make_plan(24, 1, ["llama3.1:8b"], pin={"OLLAMA_NUM_CTX": "8192"})
    assert "OLLAMA_NUM_CTX" not in p.server
    assert any("OLLAMA_NUM_CTX" in n and "num_ctx is a model parameter" in n for n in p.notes)


@pytest.mark.parametrize("vram", [8, 24])
def test_version_gating_never_writes_what_the_version_ignores(vram: int) -> None:
    pins = {"LLAMA_ARG_FIT_TARGET": "2048", "OLLAMA_NEW_ENGINE": "true"}
    old = make_plan(vram, 1, ["llama3.1:8b"], version="0.29.0", pin=pins)
    new = make_plan(vram, 1, ["llama3.1:8b"], version="0.30.0", pin=pins)
    assert "LLAMA_ARG_FIT_TARGET" not in old.server
    assert old.server["OLLAMA_NEW_ENGINE"].pinned
    assert new.server["LLAMA_ARG_FIT_TARGET"].value == "2048"
    assert "OLLAMA_NEW_ENGINE" not in new.server
    assert any("LLAMA_ARG_FIT_TARGET not written" in n for n in old.notes)
    assert any("OLLAMA_NEW_ENGINE not written" in n for n in new.notes)
    for p, version in ((old, "0.29.0"), (new, "0.30.0")):
        assert set(p.server) <= known_for_version(version)


def test_unknown_version_plans_conservatively_and_says_so() -> None:
    p = make_plan(24, 1, ["llama3.1:8b"], version=None)
    assert "LLAMA_ARG_FIT_TARGET" not in p.server
    assert any("version is unknown" in n for n in p.notes)
    dev = make_plan(24, 1, ["llama3.1:8b"], version="0.0.0")
    assert set(dev.server) == set(p.server)


def test_fit_target_is_the_margin_in_mib() -> None:
    p = make_plan(24, 1, ["llama3.1:8b"], version="0.33.0")
    assert p.server["LLAMA_ARG_FIT_TARGET"].value == str(p.budgets[0].margin // MIB)


# --------------------------------------------------------------------------- changes


def test_a_plan_matching_the_running_settings_is_a_noop() -> None:
    p = make_plan(24, 1, ["llama3.1:8b"])
    current = {name: rec.value for name, rec in p.server.items()}
    assert p.changes(current) == {} and p.is_noop(current)
    assert p.verdict(current).startswith("nothing to change")
    # Same meaning, other spelling; and a variable left unset equal to Ollama's default.
    current["OLLAMA_FLASH_ATTENTION"] = "1"
    del current["OLLAMA_KEEP_ALIVE"]
    assert p.is_noop(current)
    # Ollama's "use the default" spellings: 0 = by VRAM (32768 on 24 GiB), 0 = 3 per GPU.
    current["OLLAMA_CONTEXT_LENGTH"] = "0"
    current["OLLAMA_MAX_LOADED_MODELS"] = "0"
    current["OLLAMA_FLASH_ATTENTION"] = ""
    assert p.server["OLLAMA_CONTEXT_LENGTH"].value == "32768"
    assert p.is_noop(current)


def test_changes_list_what_differs_from_the_running_settings() -> None:
    p = make_plan(24, 1, ["llama3.1:8b"])
    current = {name: rec.value for name, rec in p.server.items()}
    current["OLLAMA_NUM_PARALLEL"] = "4"
    del current["OLLAMA_GPU_OVERHEAD"]  # unset = 0, velod plans the reserve
    assert p.changes(current) == {"OLLAMA_NUM_PARALLEL": ("4", "2"),
                                  "OLLAMA_GPU_OVERHEAD": (None, str(512 * MIB))}
    assert not p.is_noop(current)
    assert p.verdict(current) == ("2 setting(s) to change: OLLAMA_GPU_OVERHEAD (unset) -> "
                                  f"{512 * MIB}, OLLAMA_NUM_PARALLEL 4 -> 2")


def test_plan_to_dict_is_plain_data() -> None:
    p = make_plan(24, 2, ["llama3.1:70b", "gemma2:9b"], pin={"OLLAMA_KEEP_ALIVE": "1h"})
    data = p.to_dict()
    assert msgpack.unpackb(msgpack.packb(data)) == json.loads(json.dumps(data))
    assert data["server"]["OLLAMA_KEEP_ALIVE"]["pinned"] is True
    assert data["budgets"][0]["total"] == 24 * GIB


def test_policy_from_config() -> None:
    tuner = TunerConfig(profile="low-memory", reserve_vram=GIB, pin={"OLLAMA_KEEP_ALIVE": "1m"},
                        models=["qwen2.5:7b"])
    policy = Policy.from_config(tuner)
    assert (policy.profile, policy.reserve_vram, policy.pin, policy.models) == (
        "low-memory", GIB, {"OLLAMA_KEEP_ALIVE": "1m"}, ["qwen2.5:7b"])
    with pytest.raises(ValueError, match="unknown profile"):
        Policy(profile="fast")


def test_what_if_snapshot_builds_the_machine() -> None:
    snap = what_if_snapshot(24 * GIB, 2, 64 * GIB)
    assert [g.memory_total for g in snap.gpus] == [24 * GIB] * 2
    assert snap.memory.total == 64 * GIB
    assert what_if_snapshot(0, 0, 16 * GIB).gpus == ()
    with pytest.raises(ValueError):
        what_if_snapshot(24 * GIB, 1, 0)


# --------------------------------------------------------------------------- property


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vram_mib=st.integers(2 * 1024, 96 * 1024), gpus=st.integers(1, 4),
       models=st.lists(st.sampled_from(catalog.names()), min_size=1, max_size=3, unique=True),
       profile=st.sampled_from(PROFILES), reserve_mib=st.integers(0, 4096))
def test_a_plan_that_claims_to_fit_stays_within_usable_memory(
        vram_mib: int, gpus: int, models: list[str], profile: str, reserve_mib: int) -> None:
    p = make_plan(vram_mib / 1024, gpus, models, profile, reserve_vram=reserve_mib * MIB)
    assert_budgets_consistent(p)
    for b in p.budgets:
        assert b.reserve >= reserve_mib * MIB
        if b.fits:
            assert b.weights + b.kv_cache + b.overhead <= b.total - b.reserve - b.margin
    if p.fits:
        assert all(b.fits for b in p.budgets)
        assert all(m.fully_on_gpu for m in p.models.values())


def test_what_if_uses_an_installed_models_own_metadata_before_the_catalog() -> None:
    # gemma3:270m is not in velod's catalog; Ollama has it installed (/api/show's shape).
    gemma = ModelInfo("gemma3:270m", "sha256:9", 291 * 1024**2, Geometry(
        architecture="gemma3", layers=18, heads=4, kv_heads=1, key_length=256,
        value_length=256, embedding_length=640, context_length=32768, vocab_size=262144,
        sliding_window=512, windowed=swa_pattern(18, 6)))
    here = OllamaState(version=VERSION, models=[gemma, *installed("qwen2.5:7b").models])
    state = what_if_state(["gemma3:270m", "llama3.1:8b", "mystery:1b"], VERSION, here)
    p = plan(what_if_snapshot(24 * GIB, 1, 64 * GIB), state, Policy())
    assert p.models["gemma3:270m"].source == "installed"
    assert p.models["llama3.1:8b"].source == "catalog"
    assert "not installed and not in velod's catalog" in p.skipped["mystery:1b"]
    assert "qwen2.5:7b" not in p.models  # installed, but not asked for
    # Without the installed state, gemma3:270m cannot be planned at all.
    alone = plan(what_if_snapshot(24 * GIB, 1, 64 * GIB), what_if_state(["gemma3:270m"]),
                 Policy())
    assert "gemma3:270m" in alone.skipped
