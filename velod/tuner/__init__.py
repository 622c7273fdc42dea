"""Ollama: HTTP client, settings table, planner, applier and tuner."""
