"""The inference servers the tuner knows, one module per kind (Ollama: ``ollama`` for its
HTTP API, ``ollama_settings`` for the environment variables each version reads)."""
