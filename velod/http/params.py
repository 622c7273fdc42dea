"""Request fields to the engine's types, with errors that name the field."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from velod.http.errors import HttpError

if TYPE_CHECKING:
    from velod.engine.models.sampling import SamplingParams


def sampling_params(options: dict[str, Any]) -> SamplingParams:
    """SamplingParams from already renamed options; HttpError (400) naming a bad one."""
    from velod.engine.models.sampling import SamplingParams

    try:
        return SamplingParams(**options)
    except (ValueError, TypeError) as exc:
        raise request_error(exc) from None


def request_error(exc: Exception) -> HttpError:
    """An engine-side refusal of a request's field (InvalidRequest) as a 400."""
    field = getattr(exc, "field", None)
    return HttpError("invalid_params", str(exc), field)
