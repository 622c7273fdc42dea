"""What velod knows about a model, as plain data and pure functions (a leaf: imports only
``velod.units``).

- ``metadata``: :class:`Geometry`, the attention shape read from a GGUF header or Ollama's
  ``/api/show`` (the same keys), including which layers use a sliding window;
- ``kv``: **the** KV-cache size function, per layer kind, as llama.cpp allocates it; the
  planner and the engine both size their caches with it;
- ``catalog``: known open models (what-if planning, engine presets);
- ``names``: Ollama's model naming (``llama3`` = ``llama3:latest``).
"""
