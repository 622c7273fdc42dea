"""Errors a capability's verbs raise when they refuse; the control API answers with ``code``.

Library code raises these (or its own errors); the RPC edge turns any of them into an error
reply with the same code, message and data, so a service never imports the transport.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A verb refused; ``code`` is one of the control API's stable error codes."""

    code = "internal"

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class InvalidParams(ServiceError):
    """The request's values are out of range or do not fit (the message names the field)."""

    code = "invalid_params"


class NotFound(ServiceError):
    """What was asked for does not exist."""

    code = "not_found"


class Unavailable(ServiceError):
    """The capability cannot answer now (disabled, not ready, its peer is down)."""

    code = "unavailable"


class Busy(ServiceError):
    """The capability is doing something that excludes this request now; retry later."""

    code = "busy"
