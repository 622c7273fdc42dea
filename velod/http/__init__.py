"""velod's HTTP front end: OpenAI- and Ollama-compatible APIs over the engine, and /metrics.

One aiohttp server in the daemon's event loop (``http.listen``), built by
:class:`velod.http.service.HttpServer`. Each API module turns its requests into
:class:`~velod.engine.generation.GenerationRequest` and the engine's events back into its own
responses and error shapes; every request goes through ``EngineService.generate``, so
concurrent clients are batched by the one scheduler. aiohttp and prometheus_client are
imported only when the server starts.
"""
