"""Shared fixtures of the tuner's unit tests: ``rig`` (fake systemctl + fake Ollama process)."""

from tests.unit.tuner.test_applier import rig  # noqa: F401 (a fixture, found by name)
