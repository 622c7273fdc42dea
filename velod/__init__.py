"""velod: the autopilot for local LLM inference on Linux."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
