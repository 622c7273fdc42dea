"""Errors over HTTP: a service error's code to a status, and each API's own error shape."""

from __future__ import annotations

from typing import Any

from velod.errors import ServiceError

STATUS = {"invalid_params": 400, "invalid_request": 400, "not_found": 404,
          "permission_denied": 403, "unavailable": 503, "busy": 503, "internal": 500,
          "timeout": 504, "too_large": 413, "unauthorized": 401, "method": 405}


class HttpError(Exception):
    """A request refused at the HTTP edge: stable ``code`` (see STATUS), message, field."""

    def __init__(self, code: str, message: str, field: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return STATUS.get(self.code, 500)

    @classmethod
    def from_service(cls, exc: ServiceError, retry_after: float) -> HttpError:
        data = exc.data if isinstance(exc.data, dict) else {}
        return cls(exc.code, exc.message, data.get("field"),
                   retry_after if exc.code == "busy" else None)


def openai_body(error: HttpError) -> dict[str, Any]:
    """OpenAI's error object: ``{"error": {message, type, param, code}}``."""
    kind = ("invalid_request_error" if error.status in (400, 404, 413) else
            "authentication_error" if error.status == 401 else
            "rate_limit_error" if error.code == "busy" else "server_error")
    return {"error": {"message": error.message, "type": kind, "param": error.field,
                      "code": error.code}}


def ollama_body(error: HttpError) -> dict[str, Any]:
    """Ollama's error object: ``{"error": message}``."""
    return {"error": error.message}
