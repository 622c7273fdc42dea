"""Ollama's model names: ``llama3`` and ``llama3:latest`` name the same model."""

from __future__ import annotations


def normalize_name(name: str) -> str:
    """``name`` with its tag (``:latest`` when it has none), as Ollama resolves it."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
