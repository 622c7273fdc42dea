"""``/metrics``: velod's state in Prometheus' text format (``prometheus_client``).

Two kinds of series. Events are counted as they happen, from the bus: every generation
(``engine.generation``: requests by finish reason, prompt and generated tokens, time to first
token and per output token), config reloads and their failures; HTTP requests by endpoint and
status come from the server's middleware. Everything else is read when Prometheus scrapes:
the engine (sequences, KV blocks, prefix-cache hits, preemptions, the model), each GPU and
the host's memory (the hardware monitor's last snapshot), the tuner (mode, state, last
decision, Ollama reachable, the last benchmark's tokens/s per model) and every component's
state. Names and units follow Prometheus' conventions (``_total``, ``_seconds``, ``_bytes``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from velod.bus import Bus, Event
    from velod.component import Component

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_TIMEOUT = 2.0  # for the few reads that are async (the bench store)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
COMPONENT_STATES = ("created", "starting", "running", "degraded", "stopping", "stopped",
                    "failed")


class Metrics:
    """The registry of one daemon: counters fed by the bus, the rest read at scrape time."""

    def __init__(self, bus: Bus, services: dict[str, Component]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram
        from prometheus_client.process_collector import ProcessCollector

        self.services = services
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu, fds
        r = self.registry
        self.http_requests = Counter("velod_http_requests", "HTTP requests served, by endpoint "
                                     "and status code", ["endpoint", "status"], registry=r)
        self.requests = Counter("velod_engine_requests", "Generation requests finished, by "
                                "finish reason", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("velod_engine_prompt_tokens", "Prompt tokens of "
                                     "finished generation requests", registry=r)
        self.generated_tokens = Counter("velod_engine_generation_tokens", "Tokens generated",
                                        registry=r)
        self.ttft = Histogram("velod_engine_time_to_first_token_seconds", "From a request's "
                              "arrival to its first token", buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("velod_engine_time_per_output_token_seconds", "Mean time "
                              "between a request's tokens after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.reloads = Counter("velod_config_reloads", "Config reloads applied", registry=r)
        self.reload_failures = Counter("velod_config_reload_failures", "Config reloads "
                                       "refused (the running config stayed)", registry=r)
        self._hardware: dict[str, Any] | None = None
        self._bench: dict[str, float] = {}
        self._unsubscribe = [
            bus.subscribe(["engine.generation"], self._on_generation),
            bus.subscribe(["config.reloaded"], lambda _e: self.reloads.inc()),
            bus.subscribe(["config.reload_failed"], lambda _e: self.reload_failures.inc()),
            bus.subscribe(["hardware.snapshot"], self._on_snapshot),
        ]
        r.register(_StateCollector(self))

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()

    # -- events -----------------------------------------------------------------------

    def _on_generation(self, event: Event) -> None:
        data = event.data
        self.requests.labels(str(data.get("finish_reason"))).inc()
        self.prompt_tokens.inc(int(data.get("prompt_tokens") or 0))
        generated = int(data.get("completion_tokens") or 0)
        self.generated_tokens.inc(generated)
        if data.get("ttft_s") is not None:
            self.ttft.observe(float(data["ttft_s"]))
        if generated > 1 and data.get("eval_s"):
            self.tpot.observe(float(data["eval_s"]) / (generated - 1))

    def _on_snapshot(self, event: Event) -> None:
        snapshot = event.data.get("snapshot")
        if isinstance(snapshot, dict):
            self._hardware = snapshot

    # -- scrape -----------------------------------------------------------------------

    async def render(self) -> bytes:
        """The whole exposition, after the async reads (bounded in time)."""
        from prometheus_client import generate_latest

        tuner = self.services.get("tuner")
        bench_list = getattr(tuner, "bench_list", None)
        if bench_list is not None:
            with contextlib.suppress(Exception):  # a missing store is no metric, not a 500
                runs = await asyncio.wait_for(bench_list(100), SCRAPE_TIMEOUT)
                self._bench = latest_bench(runs.get("results", []) if isinstance(runs, dict)
                                           else [])
        return generate_latest(self.registry)


def latest_bench(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Model -> generation tokens/s of its most recent complete benchmark."""
    best: dict[str, tuple[float, float]] = {}
    for run in runs:
        model, tps, when = run.get("model"), run.get("gen_tps"), run.get("time") or 0.0
        if isinstance(model, str) and isinstance(tps, (int, float)) and \
                (model not in best or when > best[model][0]):
            best[model] = (when, float(tps))
    return {model: tps for model, (_when, tps) in best.items()}


class _StateCollector:
    """Series read from the services at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []  # families vary with the hardware; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        services = self.metrics.services
        yield from _components(services)
        engine = services.get("engine")
        if engine is not None:
            yield from _engine(engine)
        if self.metrics._hardware is not None:
            yield from _hardware(self.metrics._hardware)
        tuner = services.get("tuner")
        if tuner is not None:
            yield from _tuner(tuner.status(), self.metrics._bench)


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, doc, labels=labels)


def _counter(name: str, doc: str, value: float) -> Any:
    from prometheus_client.core import CounterMetricFamily

    return CounterMetricFamily(name, doc, value=value)


def _components(services: dict[str, Component]) -> Iterator[Any]:
    from velod import __version__

    info = _gauge("velod_info", "velod's version", ["version"])
    info.add_metric([__version__], 1)
    yield info
    state = _gauge("velod_component_state", "1 for each component's current state",
                   ["component", "state"])
    for name, component in services.items():
        for word in COMPONENT_STATES:
            state.add_metric([name, word], 1.0 if component.state == word else 0.0)
    yield state


def _engine(engine: Any) -> Iterator[Any]:
    report = engine.report()
    running = _gauge("velod_engine_running_sequences", "Sequences being generated")
    running.add_metric([], report.get("running", 0))
    waiting = _gauge("velod_engine_waiting_sequences", "Sequences queued")
    waiting.add_metric([], report.get("waiting", 0))
    yield running
    yield waiting
    pool = report.get("pool") or {}
    used = _gauge("velod_engine_kv_blocks_used", "KV-cache blocks in use")
    total = _gauge("velod_engine_kv_blocks", "KV-cache blocks in the pool (0: not allocated)")
    size = _gauge("velod_engine_kv_pool_bytes", "Bytes of the KV-cache pool")
    used.add_metric([], pool.get("blocks_used", 0))
    total.add_metric([], pool.get("blocks", 0))
    size.add_metric([], pool.get("bytes", 0))
    yield from (used, total, size)
    prefix = report.get("prefix_cache") or {}
    # Counters of the current pool: they restart when the pool is rebuilt, which
    # Prometheus' rate() treats as a counter reset.
    yield _counter("velod_engine_prefix_cache_hit_tokens", "Prompt tokens found in the "
                   "prefix cache", prefix.get("hit_tokens", 0))
    yield _counter("velod_engine_prefix_cache_query_tokens", "Prompt tokens looked up in the "
                   "prefix cache", prefix.get("query_tokens", 0))
    yield _counter("velod_engine_preemptions", "Sequences preempted (recomputed later)",
                   report.get("preemptions", 0))
    model = report.get("model") or {}
    loaded = _gauge("velod_engine_model_loaded", "1 while a language model is loaded",
                    ["model", "architecture", "quantization"])
    weights = _gauge("velod_engine_weights_bytes", "Bytes of the loaded model's weights")
    if model.get("architecture"):
        loaded.add_metric([str(model.get("name")), str(model["architecture"]),
                           str(model.get("quantization") or "")], 1)
        weights.add_metric([], (model.get("weights") or {}).get("bytes", 0))
    yield loaded
    yield weights


def _hardware(snapshot: dict[str, Any]) -> Iterator[Any]:
    labels = ["gpu", "name", "uuid"]
    families = {
        "memory_used": _gauge("velod_gpu_memory_used_bytes", "GPU memory in use", labels),
        "memory_total": _gauge("velod_gpu_memory_total_bytes", "GPU memory", labels),
        "utilization_gpu": _gauge("velod_gpu_utilization_ratio", "GPU busy fraction (0-1)",
                                  labels),
        "temperature": _gauge("velod_gpu_temperature_celsius", "GPU temperature", labels),
        "power_draw": _gauge("velod_gpu_power_watts", "GPU power draw", labels),
    }
    for gpu in snapshot.get("gpus") or []:
        key = [str(gpu.get("index")), str(gpu.get("name") or ""), str(gpu.get("uuid") or "")]
        for field, family in families.items():
            value = gpu.get(field)
            if isinstance(value, (int, float)):
                family.add_metric(key, value / 100 if field == "utilization_gpu" else value)
    yield from families.values()
    memory = snapshot.get("memory") or {}
    for field, name, doc in (("total", "velod_memory_total_bytes", "Host memory"),
                             ("available", "velod_memory_available_bytes",
                              "Host memory available")):
        gauge = _gauge(name, doc)
        if isinstance(memory.get(field), int):
            gauge.add_metric([], memory[field])
        yield gauge


def _tuner(status: dict[str, Any], bench: dict[str, float]) -> Iterator[Any]:
    info = _gauge("velod_tuner_info", "1 with the tuner's mode and state", ["mode", "state"])
    info.add_metric([str(status.get("mode")), str(status.get("state"))], 1)
    yield info
    reachable = _gauge("velod_tuner_ollama_reachable", "1 when Ollama answers, 0 when not")
    seen = (status.get("ollama") or {}).get("reachable")
    if seen is not None:
        reachable.add_metric([], 1 if seen else 0)
    yield reachable
    decision = _gauge("velod_tuner_last_decision_timestamp_seconds", "When the tuner last "
                      "decided something (Unix time)", ["decision"])
    last = status.get("last_decision") or {}
    if isinstance(last, dict) and isinstance(last.get("time"), (int, float)):
        decision.add_metric([str(last.get("decision") or last.get("kind") or "")],
                            last["time"])
    yield decision
    tps = _gauge("velod_bench_tokens_per_second", "Generation tokens/s of the last benchmark "
                 "of each model", ["model"])
    for model, value in bench.items():
        tps.add_metric([model], value)
    yield tps
