"""A fake Ollama server that follows Ollama's documented API (docs/api.md) closely enough
for velod's tuner: ``/api/version``, ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/create``, ``/api/generate`` and ``/api/chat`` (streaming and not).

Like ``ollama serve`` it reads its server settings from its own environment, once, at
start: OLLAMA_HOST, OLLAMA_NUM_PARALLEL, OLLAMA_CONTEXT_LENGTH, OLLAMA_FLASH_ATTENTION,
OLLAMA_KV_CACHE_TYPE, OLLAMA_KEEP_ALIVE, OLLAMA_GPU_OVERHEAD, OLLAMA_MAX_LOADED_MODELS.
Memory is modelled like Ollama's scheduler: a loaded model holds its weights, a KV cache for
``num_ctx x num_parallel`` tokens (bytes per element by cache type; quantized caches need
flash attention, else f16) and a compute graph (larger without flash attention); the layers
that do not fit the GPU's free VRAM run on the CPU, so ``/api/ps`` shows ``size_vram < size``.

The fake GPU: ``FAKE_OLLAMA_VRAM`` ("24GiB", or "24GiB,24GiB" for two GPUs), else the GPUs
of the ``FAKE_NVML_TABLE`` JSON (total minus memory used by other processes), else none.

Test controls (environment at start, or ``POST /_fake/control`` at run time):
``FAKE_OLLAMA_MODE`` = ok | slow | fail | garbage | huge (slow waits ``FAKE_OLLAMA_DELAY``
s, fail answers 500, garbage answers 200 with HTML, huge answers 200 with a JSON body of
``FAKE_OLLAMA_HUGE_BYTES``, default 400 MB, streamed without holding it, as a broken
proxy might); ``FAKE_OLLAMA_PRELOAD`` = comma-separated
models loaded at start as if a client had just used them; ``FAKE_OLLAMA_VERSION``;
``FAKE_OLLAMA_TOKEN_DELAY`` (s per generated token; see ``GenerationTiming`` for
the other speed knobs); ``FAKE_OLLAMA_DIE_AFTER_TOKENS`` (or ``die_after_tokens`` in a
control request) exits the process abruptly after that many more generated tokens;
``FAKE_OLLAMA_STORE`` = a JSON file where models made by ``/api/create`` are kept across
restarts, as Ollama keeps them. The final chunk of ``/api/generate`` carries ``context``
(the conversation's token ids, as Ollama sends it); ``context_tokens`` in a control request
makes them that long (a long conversation: one very long streamed line), from the
generation ``after_requests`` (default 0) generations later on.
``FAKE_OLLAMA_BUSY`` = models with a request in flight from the start, or
``POST /_fake/busy {"model", "busy"}`` to hold or release one at run time.
``GET /_fake/state`` shows the settings the process read.

Run: ``python tests/fakes/fake_ollama.py --port N --models models.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

GIB = 1024**3
MIB = 1024**2
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def _llama_like(arch: str, layers: int, heads: int, kv_heads: int, embedding: int,
                context: int, head_dim: int | None = None) -> dict[str, Any]:
    dim = head_dim or embedding // heads
    return {"general.architecture": arch, f"{arch}.block_count": layers,
            f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv_heads,
            f"{arch}.attention.key_length": dim, f"{arch}.attention.value_length": dim,
            f"{arch}.embedding_length": embedding, f"{arch}.context_length": context}


# Geometry from each model's config.json; sizes are the default tags' /api/tags sizes.
DEFAULT_MODELS: list[dict[str, Any]] = [
    {"name": "llama3.1:8b", "size": 4920753328, "family": "llama", "parameter_size": "8.0B",
     "model_info": _llama_like("llama", 32, 32, 8, 4096, 131072)},
    {"name": "llama3.2:3b", "size": 2019393189, "family": "llama", "parameter_size": "3.2B",
     "model_info": _llama_like("llama", 28, 24, 8, 3072, 131072, 128)},
    {"name": "qwen2.5:7b", "size": 4683087332, "family": "qwen2", "parameter_size": "7.6B",
     "model_info": _llama_like("qwen2", 28, 28, 4, 3584, 32768)},
]


# --------------------------------------------------------------------------- settings


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?)?\s*", text, re.I)
    if not match:
        raise ValueError(f"bad size {text!r}")
    unit = (match.group(2) or "").upper().rstrip("B")
    scale = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
             "KI": 1024, "MI": MIB, "GI": GIB, "TI": 1024**4}[unit]
    return int(float(match.group(1)) * scale)


def parse_go_duration(text: str) -> float:
    """Seconds from a Go duration or a number of seconds; negative = forever."""
    text = text.strip().strip("\"'")
    if re.fullmatch(r"-?\d+", text):
        return float(text)
    total, sign = 0.0, -1.0 if text.startswith("-") else 1.0
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text):
        total += float(number) * units[unit]
    return sign * total


def _env_bool(value: str | None) -> bool | None:
    if value is None or value.strip() == "":
        return None
    return value.strip().strip("\"'").lower() in ("1", "t", "true")


@dataclass
class Settings:
    """What ``ollama serve`` read from its environment at start."""

    num_parallel: int = 1
    context_length: int = 0  # 0 = by total VRAM
    flash_attention: bool | None = None  # None = auto (on: the fake GPU supports it)
    kv_cache_type: str = "f16"
    keep_alive: float = 300.0
    gpu_overhead: int = 0
    max_loaded_models: int = 0
    raw: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        def uint(name: str, default: int) -> int:
            value = env.get(name, "").strip().strip("\"'")
            return int(value) if value.isdigit() else default

        kv = env.get("OLLAMA_KV_CACHE_TYPE", "").strip().lower() or "f16"
        return cls(num_parallel=uint("OLLAMA_NUM_PARALLEL", 1) or 1,
                   context_length=uint("OLLAMA_CONTEXT_LENGTH", 0),
                   flash_attention=_env_bool(env.get("OLLAMA_FLASH_ATTENTION")),
                   kv_cache_type=kv if kv in KV_BYTES else "f16",
                   keep_alive=parse_go_duration(env.get("OLLAMA_KEEP_ALIVE") or "5m"),
                   gpu_overhead=uint("OLLAMA_GPU_OVERHEAD", 0),
                   max_loaded_models=uint("OLLAMA_MAX_LOADED_MODELS", 0),
                   raw={k: v for k, v in env.items() if k.startswith(("OLLAMA_", "LLAMA_"))})


def gpus_from_env(env: Mapping[str, str]) -> list[int]:
    """Free VRAM per fake GPU in bytes."""
    if env.get("FAKE_OLLAMA_VRAM"):
        return [parse_size(part) for part in env["FAKE_OLLAMA_VRAM"].split(",") if part.strip()]
    table = env.get("FAKE_NVML_TABLE")
    if table and os.path.exists(table):
        with open(table, encoding="utf-8") as f:
            data = json.load(f)
        out = []
        for gpu in data.get("gpus", []):
            used = gpu.get("memory_used")
            if used is None:
                used = sum(p.get("used_memory") or 0 for p in gpu.get("processes", []))
            out.append(int(gpu.get("memory_total", 0)) - int(used))
        return out
    return []


# --------------------------------------------------------------------------- memory model


@dataclass(frozen=True)
class Geometry:
    layers: int
    heads: int
    kv_heads: int
    key_length: int
    value_length: int
    context_length: int

    @classmethod
    def from_model_info(cls, info: dict[str, Any]) -> Geometry:
        arch = info["general.architecture"]
        heads = info[f"{arch}.attention.head_count"]
        dim = info[f"{arch}.embedding_length"] // heads
        return cls(layers=info[f"{arch}.block_count"], heads=heads,
                   kv_heads=info.get(f"{arch}.attention.head_count_kv", heads),
                   key_length=info.get(f"{arch}.attention.key_length", dim),
                   value_length=info.get(f"{arch}.attention.value_length", dim),
                   context_length=info[f"{arch}.context_length"])


@dataclass(frozen=True)
class Placement:
    """How a model with these options sits in memory."""

    num_ctx: int
    size: int
    size_vram: int
    kv_cache_type: str
    flash_attention: bool


def default_num_ctx(settings: Settings, gpus: list[int]) -> int:
    """routes.go: OLLAMA_CONTEXT_LENGTH, else a tier by VRAM (less the overhead per GPU)."""
    if settings.context_length:
        return settings.context_length
    usable = sum(gpus) - settings.gpu_overhead * len(gpus)
    if usable >= 47 * GIB:
        return 262144
    if usable >= 23 * GIB:
        return 32768
    return 4096


def place(weights: int, geometry: Geometry, num_ctx: int, settings: Settings,
          free_vram: int) -> Placement:
    """Ollama's sizing: weights + KV for num_ctx x parallel + graph; spill whole layers."""
    num_ctx = min(num_ctx, geometry.context_length)  # Ollama caps at the trained context
    flash = settings.flash_attention is not False and free_vram > 0
    kv_type = settings.kv_cache_type if flash else "f16"  # quantized KV needs flash attention
    tokens = num_ctx * settings.num_parallel
    kv = int(geometry.layers * geometry.kv_heads * (geometry.key_length + geometry.value_length)
             * KV_BYTES[kv_type] * tokens)
    graph = 256 * MIB + (0 if flash else 512 * tokens * geometry.heads * 4 // 8)
    size = weights + kv + graph
    per_layer = (weights + kv) / geometry.layers
    room = free_vram - graph
    layers_on_gpu = max(0, min(geometry.layers, math.floor(room / per_layer))) if room > 0 else 0
    size_vram = size if layers_on_gpu == geometry.layers else (
        int(layers_on_gpu * per_layer) + graph if layers_on_gpu else 0)
    return Placement(num_ctx, size, size_vram, kv_type, flash)


class GenerationTiming:
    """How long loading, prompt processing and generating take under the server settings.

    Like a real GPU: layers on the CPU make each token ~10x slower (by the share of the
    model in system RAM), flash attention speeds generation up by ``FAKE_OLLAMA_FLASH_SPEEDUP``
    (1.25; below 1 on a GPU where it hurts), a q8_0 cache by ``FAKE_OLLAMA_Q8_SPEEDUP`` (1.1:
    less memory traffic). Each request draws one factor of ``1 +- FAKE_OLLAMA_NOISE``
    (default 0) from a ``FAKE_OLLAMA_SEED``-ed generator. Prompt tokens take
    ``FAKE_OLLAMA_PROMPT_DELAY`` s each (default a twentieth of a generated token); a model
    that must be loaded first takes ``FAKE_OLLAMA_LOAD_DELAY`` s (default 0).
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.token_delay = float(env.get("FAKE_OLLAMA_TOKEN_DELAY", "0.001"))
        self.prompt_delay = float(env.get("FAKE_OLLAMA_PROMPT_DELAY", self.token_delay / 20))
        self.load_delay = float(env.get("FAKE_OLLAMA_LOAD_DELAY", "0"))
        self.flash_speedup = float(env.get("FAKE_OLLAMA_FLASH_SPEEDUP", "1.25"))
        self.q8_speedup = float(env.get("FAKE_OLLAMA_Q8_SPEEDUP", "1.1"))
        self.noise = float(env.get("FAKE_OLLAMA_NOISE", "0"))
        self.rng = random.Random(int(env.get("FAKE_OLLAMA_SEED", "0")))

    def speed(self, loaded: Loaded) -> float:
        """Relative generation speed (1.0 = fully on the GPU, no flash attention, f16)."""
        p = loaded.placement
        cpu_share = 1 - p.size_vram / p.size
        speed = 1 / (1 + 9 * cpu_share)  # CPU layers are ~10x slower
        if p.flash_attention:
            speed *= self.flash_speedup
        if p.kv_cache_type == "q8_0":
            speed *= self.q8_speedup
        return speed

    def jitter(self) -> float:
        return 1 + self.rng.uniform(-self.noise, self.noise) if self.noise else 1.0

    def seconds_per_token(self, loaded: Loaded, settings: Settings) -> float:
        return self.token_delay / self.speed(loaded)


# --------------------------------------------------------------------------- state


@dataclass
class Model:
    name: str
    size: int
    model_info: dict[str, Any]
    family: str = "llama"
    parameter_size: str = ""
    quantization: str = "Q4_K_M"
    parameters: dict[str, Any] = field(default_factory=dict)
    parent: str = ""
    modified_at: str = "2026-01-01T00:00:00Z"  # pulled long ago; created models say now

    @property
    def digest(self) -> str:
        text = json.dumps([self.name, self.size, self.parameters], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        return {"parent_model": self.parent, "format": "gguf", "family": self.family,
                "families": [self.family], "parameter_size": self.parameter_size,
                "quantization_level": self.quantization}

    def tag(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.name, "modified_at": self.modified_at,
                "size": self.size, "digest": self.digest, "details": self.details()}


@dataclass
class Loaded:
    model: Model
    placement: Placement
    expires_at: float | None  # None: first request still in flight (Ollama's zero time)
    session: float
    in_flight: int = 0

    def ps(self) -> dict[str, Any]:
        # routes.go: a zero expiresAt (first request still running) shows now + keep-alive.
        expires = self.expires_at if self.expires_at is not None else time.time() + self.session
        return {"name": self.model.name, "model": self.model.name, "size": self.placement.size,
                "digest": self.model.digest, "details": self.model.details(),
                "expires_at": _iso(expires), "size_vram": self.placement.size_vram,
                "context_length": self.placement.num_ctx}


def _iso(ts: float) -> str:
    if ts > 1e11:  # forever
        return "2318-08-13T00:00:00Z"
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _now_iso() -> str:
    return _iso(time.time())


def normalize_name(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


class FakeOllama:
    """The server's state and its aiohttp application (``app``)."""

    def __init__(self, models: list[dict[str, Any]] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        self.settings = Settings.from_env(env)
        self.gpus = gpus_from_env(env)
        self.version = env.get("FAKE_OLLAMA_VERSION", "0.33.0")
        self.mode = env.get("FAKE_OLLAMA_MODE", "ok")
        self.delay = float(env.get("FAKE_OLLAMA_DELAY", "5"))
        self.huge_bytes = int(env.get("FAKE_OLLAMA_HUGE_BYTES", str(400 * 1000**2)))
        self.context_tokens: int | None = None
        self.context_from = 0  # the generation from which context_tokens applies
        self.timing = GenerationTiming(env)
        self.models: dict[str, Model] = {}
        for spec in models if models is not None else DEFAULT_MODELS:
            model = Model(name=normalize_name(spec["name"]), size=int(spec["size"]),
                          model_info=spec["model_info"], family=spec.get("family", "llama"),
                          parameter_size=spec.get("parameter_size", ""),
                          parameters=dict(spec.get("parameters", {})))
            self.models[model.name] = model
        # Like Ollama's model store, models created through /api/create survive restarts.
        self.store = env.get("FAKE_OLLAMA_STORE")
        if self.store and os.path.exists(self.store):
            with open(self.store, encoding="utf-8") as f:
                for spec in json.load(f):
                    model = Model(**spec)
                    self.models[model.name] = model
        self.loaded: dict[str, Loaded] = {}
        self.requests: list[str] = []
        self.generations: list[dict[str, Any]] = []  # the final figures of each generation
        self.tokens_made = 0
        die = env.get("FAKE_OLLAMA_DIE_AFTER_TOKENS")
        self.die_after_tokens: int | None = int(die) if die else None
        self.app = self._build_app()
        preload = [n.strip() for n in env.get("FAKE_OLLAMA_PRELOAD", "").split(",")]
        for name in filter(None, preload):
            loaded = self.load(normalize_name(name), {}, None)
            loaded.expires_at = time.time() + loaded.session
        busy = [n.strip() for n in env.get("FAKE_OLLAMA_BUSY", "").split(",")]
        for name in filter(None, busy):  # a first request that never finishes
            self.load(normalize_name(name), {}, None).in_flight += 1

    # ------------------------------------------------------------------ memory
    def free_vram(self, excluding: str | None = None) -> int:
        total = sum(max(0, g - self.settings.gpu_overhead) for g in self.gpus)
        used = sum(lm.placement.size_vram for n, lm in self.loaded.items() if n != excluding)
        return max(0, total - used)

    def load(self, name: str, options: dict[str, Any], keep_alive: Any) -> Loaded:
        model = self.models[name]
        geometry = Geometry.from_model_info(model.model_info)
        num_ctx = options.get("num_ctx") or model.parameters.get("num_ctx") or \
            default_num_ctx(self.settings, self.gpus)
        self._expire()
        current = self.loaded.get(name)
        if current and current.placement.num_ctx == min(int(num_ctx), geometry.context_length):
            loaded = current
        else:
            self.loaded.pop(name, None)
            limit = self.settings.max_loaded_models or 3 * max(1, len(self.gpus))
            while len(self.loaded) >= limit:
                self.loaded.pop(next(iter(self.loaded)))
            placement = place(model.size, geometry, int(num_ctx), self.settings,
                              self.free_vram(excluding=name))
            loaded = Loaded(model, placement, expires_at=None, session=self.settings.keep_alive)
            self.loaded[name] = loaded
        if keep_alive is not None:
            loaded.session = parse_go_duration(str(keep_alive)) if isinstance(keep_alive, str) \
                else float(keep_alive)
        if loaded.session < 0:
            loaded.session = 1e12
        return loaded

    def _expire(self) -> None:
        now = time.time()
        for name, lm in list(self.loaded.items()):
            if lm.in_flight == 0 and lm.expires_at is not None and lm.expires_at <= now:
                del self.loaded[name]

    def _save_created(self) -> None:
        if not self.store:
            return
        created = [dataclasses.asdict(m) for m in self.models.values() if m.parent]
        tmp = f"{self.store}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(created, f)
        os.replace(tmp, self.store)

    # ------------------------------------------------------------------ app
    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._faults])
        app.router.add_get("/", self.h_root)
        app.router.add_get("/api/version", self.h_version)
        app.router.add_get("/api/tags", self.h_tags)
        app.router.add_post("/api/show", self.h_show)
        app.router.add_get("/api/ps", self.h_ps)
        app.router.add_post("/api/create", self.h_create)
        app.router.add_post("/api/generate", self.h_generate)
        app.router.add_post("/api/chat", self.h_generate)
        app.router.add_post("/_fake/control", self.h_control)
        app.router.add_post("/_fake/busy", self.h_busy)
        app.router.add_get("/_fake/state", self.h_state)
        return app

    @web.middleware
    async def _faults(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_fake/"):
            return await handler(request)
        self.requests.append(f"{request.method} {request.path}")
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        elif self.mode == "fail":
            return web.json_response({"error": "fake failure (FAKE_OLLAMA_MODE=fail)"},
                                     status=500)
        elif self.mode == "garbage":
            return web.Response(text="<html><body>502 Bad Gateway</body></html>",
                                content_type="text/html")
        elif self.mode == "huge":
            return await self._huge(request)
        return await handler(request)

    async def _huge(self, request: web.Request) -> web.StreamResponse:
        """A JSON string of ``huge_bytes``, written a MiB at a time until the client leaves."""
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        chunk, left = b"x" * MIB, self.huge_bytes
        await resp.write(b'{"version": "')
        with contextlib.suppress(ConnectionError):
            while left > 0:
                await resp.write(chunk[:left])
                left -= len(chunk)
            await resp.write(b'"}')
        return resp

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text=json.dumps({"error": "invalid JSON"}),
                                     content_type="application/json") from None
        if not isinstance(data, dict):
            raise _error(400, "request body must be a JSON object")
        return data

    def _model(self, name: Any) -> Model:
        if not isinstance(name, str) or not name:
            raise _error(400, "model is required")
        model = self.models.get(normalize_name(name))
        if model is None:
            raise _error(404, f"model '{name}' not found")
        return model

    async def h_root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def h_version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self.version})

    async def h_tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [m.tag() for m in self.models.values()]})

    async def h_show(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        model = self._model(body.get("model") or body.get("name"))
        params = "\n".join(f"{k:<30} {v}" for k, v in model.parameters.items())
        return web.json_response({
            "modelfile": f"FROM {model.parent or model.name}\n" + "".join(
                f"PARAMETER {k} {v}\n" for k, v in model.parameters.items()),
            "parameters": params, "template": "{{ .Prompt }}", "details": model.details(),
            "model_info": model.model_info, "capabilities": ["completion"],
            "modified_at": model.modified_at})

    async def h_ps(self, request: web.Request) -> web.Response:
        self._expire()
        return web.json_response({"models": [lm.ps() for lm in self.loaded.values()]})

    async def h_create(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise _error(400, "model is required")
        source = self._model(body.get("from"))
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise _error(400, "parameters must be an object")
        model = Model(name=normalize_name(name), size=source.size, model_info=source.model_info,
                      family=source.family, parameter_size=source.parameter_size,
                      parameters={**source.parameters, **params}, parent=source.name,
                      modified_at=_now_iso())
        self.models[model.name] = model
        self._save_created()
        statuses = ["using existing layer", "writing manifest", "success"]
        if body.get("stream") is False:
            return web.json_response({"status": "success"})
        return await _ndjson(request, ({"status": s} for s in statuses))

    async def h_generate(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        model = self._model(body.get("model"))
        options = body.get("options") or {}
        started = time.time()
        before = self.loaded.get(model.name)
        loaded = self.load(model.name, options, body.get("keep_alive"))
        load_s = self.timing.load_delay if loaded is not before else 0.0
        prompt = body.get("prompt") or " ".join(
            str(m.get("content", "")) for m in body.get("messages") or [] if isinstance(m, dict))
        prompt_count = len(prompt.split())  # a word per token is close enough for a fake
        count = int(options.get("num_predict", 8)) if prompt_count else 0  # empty: load only
        is_chat = request.path.endswith("/chat")
        key = "message" if is_chat else "response"

        def content(text: str) -> Any:
            return {"role": "assistant", "content": text} if is_chat else text

        loaded.in_flight += 1
        resp: web.StreamResponse | None = None
        try:
            jitter = self.timing.jitter()
            delay = self.timing.seconds_per_token(loaded, self.settings) * jitter
            prompt_s = prompt_count * self.timing.prompt_delay * jitter
            await asyncio.sleep(load_s + prompt_s)
            pieces = []
            if body.get("stream") is not False:
                resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
                await resp.prepare(request)
            for i in range(count):
                await asyncio.sleep(delay)
                self._count_token()
                pieces.append(f"tok{i} ")
                if resp is not None:  # stream each token as it is made, as Ollama does
                    await resp.write((json.dumps({"model": model.name, "created_at": _now_iso(),
                                                  key: content(pieces[-1]), "done": False})
                                      + "\n").encode())
        finally:
            loaded.in_flight -= 1
            loaded.expires_at = time.time() + loaded.session
        final = {"model": model.name, "created_at": _now_iso(), "done": True,
                 "done_reason": "stop" if count else "load",
                 "total_duration": int((time.time() - started) * 1e9),
                 "load_duration": int(load_s * 1e9),
                 "prompt_eval_count": prompt_count, "prompt_eval_duration": int(prompt_s * 1e9),
                 "eval_count": count, "eval_duration": int(count * delay * 1e9),
                 "context": list(range(self._context_length(prompt_count + count)))}
        self.generations.append({k: final[k] for k in (
            "model", "load_duration", "prompt_eval_count", "prompt_eval_duration",
            "eval_count", "eval_duration")})
        if resp is None:
            return web.json_response({**final, key: content("".join(pieces))})
        await resp.write((json.dumps({**final, key: content("")}) + "\n").encode())
        await resp.write_eof()
        return resp

    def _context_length(self, natural: int) -> int:
        if self.context_tokens is None or len(self.generations) < self.context_from:
            return natural
        return self.context_tokens

    def _count_token(self) -> None:
        self.tokens_made += 1
        if self.die_after_tokens is not None and self.tokens_made >= self.die_after_tokens:
            os._exit(3)  # as if Ollama crashed mid-answer (only ever set in a subprocess)

    async def h_control(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.mode = body.get("mode", self.mode)
        self.delay = float(body.get("delay", self.delay))
        if "die_after_tokens" in body:
            self.die_after_tokens = self.tokens_made + int(body["die_after_tokens"])
        if "context_tokens" in body:
            self.context_tokens = body["context_tokens"]
            self.context_from = len(self.generations) + int(body.get("after_requests", 0))
        return web.json_response({"mode": self.mode, "delay": self.delay})

    async def h_busy(self, request: web.Request) -> web.Response:
        body = await request.json()
        loaded = self.load(normalize_name(body["model"]), {}, None)
        loaded.in_flight += 1 if body.get("busy", True) else -1
        if not body.get("busy", True):
            loaded.expires_at = time.time() + loaded.session
        return web.json_response({"in_flight": loaded.in_flight})

    async def h_state(self, request: web.Request) -> web.Response:
        s = self.settings
        return web.json_response({
            "pid": os.getpid(), "env": s.raw, "gpus": self.gpus, "mode": self.mode,
            "num_parallel": s.num_parallel, "context_length": s.context_length,
            "flash_attention": s.flash_attention, "kv_cache_type": s.kv_cache_type,
            "requests": self.requests[-200:], "generations": self.generations[-500:],
            "speed": {name: self.timing.speed(lm) for name, lm in self.loaded.items()}})


def _error(status: int, message: str) -> web.HTTPException:
    cls = {400: web.HTTPBadRequest, 404: web.HTTPNotFound}[status]
    return cls(text=json.dumps({"error": message}), content_type="application/json")


async def _ndjson(request: web.Request, items: Any) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    for item in items:
        await resp.write((json.dumps(item) + "\n").encode())
    await resp.write_eof()
    return resp




def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a fake Ollama)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def serve_app(app: web.Application, host: str = "127.0.0.1",
                    port: int = 0) -> AsyncIterator[str]:
    """Serve ``app`` in this event loop; yields its base URL."""
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = site._server.sockets  # type: ignore[union-attr]
    bound = sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        await runner.cleanup()


def serve(fake: FakeOllama, host: str = "127.0.0.1",
          port: int = 0) -> contextlib.AbstractAsyncContextManager[str]:
    """Serve ``fake`` in this event loop; yields its base URL."""
    return serve_app(fake.app, host, port)


def _listen_address(env: Mapping[str, str]) -> tuple[str, int]:
    text = env.get("OLLAMA_HOST", "").strip() or "127.0.0.1:11434"
    text = text.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = text.rpartition(":")
    return (host or "127.0.0.1"), int(port) if port.isdigit() else 11434


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--models", help="JSON list of {name, size, model_info, ...}")
    args = parser.parse_args(argv)
    models = None
    if args.models:
        with open(args.models, encoding="utf-8") as f:
            models = json.load(f)
    fake = FakeOllama(models)
    host, port = _listen_address(os.environ)
    print(f"fake ollama {fake.version} on {args.host or host}:{args.port or port} "
          f"settings={fake.settings.raw} gpus={fake.gpus}", file=sys.stderr, flush=True)
    # Ollama exits promptly on SIGTERM; a graceful aiohttp shutdown would slow every restart.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    web.run_app(fake.app, host=args.host or host, port=args.port or port, print=None,
                handle_signals=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
