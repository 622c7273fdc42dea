"""Plan and apply an inference server's settings, and prove them with benchmarks.

``backends/`` knows each server kind (Ollama: its HTTP API and environment variables);
``planner`` (pure, over ``fitting``) turns hardware + models + policy into settings with
reasons; ``applier`` writes the systemd drop-in, restarts when idle, verifies and rolls back;
``history``/``journal`` record every decision; ``closedloop`` measures changes with
``bench/``; ``service`` is the component and its verbs, ``rpc`` and ``cli`` its edges.
"""
