"""Plan and apply inference servers' settings, and prove them with benchmarks.

``backends/`` knows each server kind behind one seam (``backends/base.py``): Ollama (its HTTP
API, environment variables, ``planner``) and llama.cpp's llama-server (``LLAMA_ARG_*``, its
own planner rules); ``fitting`` is the memory arithmetic both planners share; ``applier``
writes a unit's systemd drop-in, restarts when idle, verifies and rolls back;
``history``/``journal`` record every decision; ``closedloop`` measures changes with
``bench/``; ``service`` is one server's tuner, ``servers`` the component that runs one per
managed server, ``rpc`` and ``cli`` its edges.
"""
