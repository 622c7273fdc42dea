"""The HTTP front end's pure parts: listen addresses, the API key file, request mapping, the
metrics collector, and the Grafana dashboard against the metrics velod really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from velod.bus import Bus
from velod.http.errors import HttpError
from velod.http.metrics import Metrics, latest_bench
from velod.http.ollama import _sampling
from velod.http.openai import _plain_message, completion_request
from velod.http.service import ListenError, is_loopback, parse_listen, read_api_key

REPO = Path(__file__).resolve().parents[3]


def test_listen_addresses_default_to_loopback_and_paths_are_unix_sockets():
    assert parse_listen(":11435") == ("127.0.0.1", 11435)
    assert parse_listen("0.0.0.0:80") == ("0.0.0.0", 80)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    assert parse_listen("/run/velod/http.sock") == "/run/velod/http.sock"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")


def test_api_key_file_holds_one_token(tmp_path):
    good = tmp_path / "key"
    good.write_text("  abc123\n")
    assert read_api_key(str(good)) == "abc123"
    for content, reason in (("", "one token"), ("two words", "one token"),
                            ("x" * 5000, "larger than")):
        good.write_text(content)
        with pytest.raises(ListenError, match=reason):
            read_api_key(str(good))
    with pytest.raises(ListenError, match="No such file"):
        read_api_key(str(tmp_path / "missing"))


def test_ollama_options_map_to_sampling_and_negative_num_predict_means_no_limit():
    params = _sampling({"options": {"num_predict": 5, "repeat_penalty": 1.2, "stop": "\n",
                                    "num_ctx": 8192, "repeat_last_n": 32}})
    assert params.max_tokens == 5 and params.repetition_penalty == 1.2
    assert params.stop == ("\n",) and params.penalty_window == 32
    assert _sampling({"options": {"num_predict": -1}}).max_tokens is None
    with pytest.raises(HttpError) as info:
        _sampling({"options": {"top_p": 2}})
    assert info.value.status == 400 and info.value.field == "top_p"


def test_openai_text_parts_are_joined_and_other_parts_refused():
    message = {"role": "user", "content": [{"type": "text", "text": "a"},
                                           {"type": "text", "text": "b"}]}
    assert _plain_message(message, 0)["content"] == "ab"
    with pytest.raises(HttpError, match="only text parts"):
        _plain_message({"role": "user", "content": [{"type": "image_url"}]}, 0)


def test_openai_completion_defaults_to_16_tokens_and_refuses_n_and_echo():
    served = SimpleNamespace(name="m")
    assert completion_request({"prompt": "x"}, served).sampling.max_tokens == 16
    assert completion_request({"prompt": [[1, 2]]}, served).token_ids == [1, 2]
    for body, field in (({"prompt": "x", "n": 3}, "n"), ({"prompt": "x", "echo": True}, "echo"),
                        ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": "x", "logprobs": 9},
                                                             "logprobs")):
        with pytest.raises(HttpError) as info:
            completion_request(body, served)
        assert info.value.field == field and info.value.status == 400


def test_latest_benchmark_per_model_wins():
    runs = [{"model": "a", "gen_tps": 10.0, "time": 1}, {"model": "a", "gen_tps": 12.0,
                                                          "time": 5},
            {"model": "b", "gen_tps": None, "time": 9}, {"model": "b", "gen_tps": 3, "time": 2}]
    assert latest_bench(runs) == {"a": 12.0, "b": 3.0}


def fake_services() -> dict[str, object]:
    """Components as the collector reads them (status/report maps), no daemon needed."""
    engine = SimpleNamespace(state="running", report=lambda: {
        "running": 2, "waiting": 1, "preemptions": 4,
        "pool": {"blocks_used": 3, "blocks": 10, "bytes": 1 << 20},
        "prefix_cache": {"hit_tokens": 5, "query_tokens": 9},
        "model": {"name": "m", "architecture": "llama", "quantization": "Q4_K_M",
                  "weights": {"bytes": 123}}})
    tuner = SimpleNamespace(state="degraded", status=lambda: {
        "mode": "observe", "state": "degraded", "ollama": {"reachable": False},
        "last_decision": {"time": 1700000000.0, "decision": "applied"}})
    return {"engine": engine, "tuner": tuner}


def test_collector_exports_engine_gpu_tuner_and_bus_counters():
    bus = Bus()
    metrics = Metrics(bus, fake_services())  # type: ignore[arg-type]
    bus.publish("hardware.snapshot", {"snapshot": {"gpus": [
        {"index": 0, "name": "H200", "uuid": "GPU-1", "memory_used": 5, "memory_total": 9,
         "utilization_gpu": 50.0, "temperature": 40, "power_draw": 100.0}],
        "memory": {"total": 100, "available": 60}}})
    bus.publish("engine.generation", {"finish_reason": "stop", "prompt_tokens": 7,
                                      "completion_tokens": 11, "ttft_s": 0.2, "eval_s": 1.0})
    bus.publish("config.reload_failed", {})
    text = generate_latest(metrics.registry).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("velod_engine_generation_tokens_total", ())] == 11
    assert samples[("velod_engine_requests_total", (("finish_reason", "stop"),))] == 1
    assert samples[("velod_engine_time_per_output_token_seconds_sum", ())] == pytest.approx(0.1)
    assert samples[("velod_config_reload_failures_total", ())] == 1
    assert samples[("velod_gpu_utilization_ratio",
                    (("gpu", "0"), ("name", "H200"), ("uuid", "GPU-1")))] == 0.5
    assert samples[("velod_engine_kv_blocks_used", ())] == 3
    assert samples[("velod_tuner_ollama_reachable", ())] == 0
    assert samples[("velod_component_state", (("component", "tuner"),
                                              ("state", "degraded")))] == 1
    metrics.close()
    assert bus.subscriber_count == 0


def test_grafana_dashboard_and_alerts_use_only_metrics_velod_exports():
    bus = Bus()
    metrics = Metrics(bus, fake_services())  # type: ignore[arg-type]
    bus.publish("hardware.snapshot", {"snapshot": {"gpus": [], "memory": {}}})
    bus.publish("engine.generation", {"finish_reason": "stop", "completion_tokens": 2,
                                      "ttft_s": 0.1, "eval_s": 0.1})
    metrics.http_requests.labels("/v1/models", "200").inc()  # what the middleware counts
    names = {s.name for f in text_string_to_metric_families(
        generate_latest(metrics.registry).decode()) for s in f.samples}
    names |= {f.name for f in text_string_to_metric_families(
        generate_latest(metrics.registry).decode())}
    folder = REPO / "packaging" / "prometheus"
    dashboard = json.loads((folder / "grafana-velod.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append((folder / "velod-alerts.yml").read_text())
    used = {m for e in exprs for m in re.findall(r"\b(?:velod|process)_[a-z_]+", e)}
    assert used and used <= names, used - names

