"""The event topics velod publishes on its bus, so a subscriber can be told when a pattern
it asks for can never match (tests/unit/test_topics.py keeps this list complete)."""

from __future__ import annotations

from velod.bus import topic_matches

TOPICS = {
    "component.state": "a component changed state (running, degraded, failed, ...)",
    "config.reloaded": "a new config was applied",
    "config.reload_failed": "a new config was refused; the running one stays",
    "hardware.snapshot": "every hardware poll",
    "hardware.changed": "a meaningful hardware change (GPU, free VRAM, RAM, Xid)",
    "tuner.decision": "the Ollama tuner decided something",
    "bench.progress": "progress of a velodctl bench run",
    "engine.allocated": "the engine allocated its KV pool",
    "engine.released": "the engine released its KV pool",
    "engine.finished": "an engine request finished",
    "engine.progress": "engine requests in progress",
    "engine.bench.progress": "progress of a velodctl engine bench run",
    "engine.generation": "a text generation request ended (counts, timings, finish reason)",
    "engine.model_loaded": "a language model was loaded into the engine",
    "engine.model_unloaded": "the engine's language model was unloaded",
}


def unmatched(patterns: list[str]) -> list[str]:
    """The patterns that select none of the known topics."""
    return [p for p in patterns if not any(topic_matches(p, t) for t in TOPICS)]
