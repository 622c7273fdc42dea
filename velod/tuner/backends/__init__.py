"""The inference servers the tuner knows, one set of modules per kind, behind one seam.

``base`` is the seam: the :class:`~velod.tuner.backends.base.Backend` protocol and the
errors every kind raises. Ollama: ``ollama`` (HTTP client), ``ollama_settings`` (the
variables each version reads), ``ollama_backend`` (the Backend; its planner is
``velod.tuner.planner``). llama.cpp's llama-server: ``llama_server`` (HTTP client and
state), ``llama_server_settings`` (``LLAMA_ARG_*`` and their flags),
``llama_server_planner``, ``llama_server_backend``. A new kind is new modules here, a
config section and one line in :func:`configured`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from velod.config import Config
    from velod.tuner.backends.base import Backend


def configured(config: Config) -> list[Backend]:
    """A backend for every server ``config`` manages: Ollama (unless ``ollama.enabled`` is
    false), then each ``llama_server`` entry with a URL, in order."""
    from velod.config import llama_server_names
    from velod.tuner.backends.llama_server_backend import LlamaServerBackend
    from velod.tuner.backends.ollama_backend import OllamaBackend

    out: list[Backend] = [OllamaBackend(config.ollama)] if config.ollama.enabled else []
    out += [LlamaServerBackend(config.llama_server[i], name)
            for i, name in llama_server_names(config.llama_server)]
    return out


def configured_names(config: Config) -> list[str]:
    """The names of the servers :func:`configured` would build, in the same order."""
    from velod.config import llama_server_names

    names = ["ollama"] if config.ollama.enabled else []
    return names + [name for _, name in llama_server_names(config.llama_server)]
