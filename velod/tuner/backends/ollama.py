"""An async HTTP client for the parts of Ollama's API velod needs.

Every failure becomes an :class:`OllamaError` subclass whose message says what went
wrong and where: nothing else (aiohttp's exceptions, JSON errors, KeyError) escapes.
``fetch_state`` turns ``/api/version``, ``/api/tags``, ``/api/show`` and ``/api/ps``
into the plain :class:`~velod.tuner.state.OllamaState` the planner reads.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from velod.model.metadata import Geometry, UnknownArchitecture
from velod.model.names import normalize_name
from velod.tuner.backends.base import (
    ServerBadResponse,
    ServerError,
    ServerHTTPError,
    ServerTimeout,
    ServerUnreachable,
)
from velod.tuner.backends.http import (
    Errors,
    SessionClient,
    excerpt,
    fetch,
    is_count,
    opt_str,
    read_bounded,
    read_lines,
)
from velod.tuner.state import LoadedModel, ModelInfo, OllamaState

DEFAULT_URL = "http://127.0.0.1:11434"
# The most velod reads of one answer, so that a broken or hostile server cannot fill
# velod's memory. /api/show of a large model (license, template, model_info) is a few
# hundred KiB; a streamed chunk is one token, except the last, whose ``context`` lists the
# conversation's token ids (about 7 bytes a token: ~1 MiB at 128K tokens).
MAX_REPLY_BYTES = 16 * 2**20
MAX_VERSION_BYTES = 64 * 2**10  # {"version": "0.12.3"}
MAX_LINE_BYTES = 16 * 2**20


class OllamaError(ServerError):
    """Ollama could not be asked, or answered something velod cannot use."""


class OllamaUnreachable(OllamaError, ServerUnreachable):
    """Nothing answers at the address (refused, DNS, reset)."""


class OllamaTimeout(OllamaError, ServerTimeout):
    """Ollama did not answer within the request timeout."""


class OllamaHTTPError(OllamaError, ServerHTTPError):
    """Ollama answered with an HTTP error status; ``status`` holds it."""


class OllamaBadResponse(OllamaError, ServerBadResponse):
    """Ollama answered, but not with JSON of the documented shape (or far too much of it)."""


ERRORS = Errors("Ollama", OllamaTimeout, OllamaUnreachable, OllamaBadResponse,
                "is ollama running? (set ollama.url or OLLAMA_HOST)", http=OllamaHTTPError)


# --------------------------------------------------------------------------- addresses


def resolve_url(configured: str = "", environ: dict[str, str] | None = None) -> str:
    """Base URL to reach Ollama: ``ollama.url``, else ``$OLLAMA_HOST``, else the default."""
    if configured:
        return normalize_host(configured)
    env = os.environ if environ is None else environ
    host = env.get("OLLAMA_HOST", "").strip()
    return normalize_host(host) if host else DEFAULT_URL


def normalize_host(value: str) -> str:
    """Read an address the way Ollama reads OLLAMA_HOST, as a URL a client can connect to.

    ``"0.0.0.0:11434"``, ``"host"``, ``":11434"``, ``"https://h"``, ``"[::1]:9"`` are all
    accepted; a missing scheme means http, a missing port 11434 (80/443 when a scheme is
    given, as Ollama does); a wildcard listen address (0.0.0.0, ::) means this machine.
    """
    text = value.strip().strip("\"'")
    scheme, sep, rest = text.partition("://")
    default_port = "11434"
    if not sep:
        scheme, rest = "http", text
    elif scheme == "https":
        default_port = "443"
    elif scheme == "http":
        default_port = "80"
    else:
        raise ValueError(f"unsupported scheme in Ollama address {value!r} (use http or https)")
    hostport, _, path = rest.partition("/")
    host, port = _split_host_port(hostport)
    port = port if port.isdigit() and 0 < int(port) <= 65535 else default_port
    host = host or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    if _is_ipv6(host):
        host = f"[{host.strip('[]')}]"
    base = f"{scheme}://{host}:{port}"
    return f"{base}/{path.rstrip('/')}" if path.strip("/") else base


def _split_host_port(hostport: str) -> tuple[str, str]:
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        return host, rest.lstrip(":")
    if hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
        return host, port
    return hostport, ""  # bare host, or a bare IPv6 address


def _is_ipv6(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host.strip("[]")), ipaddress.IPv6Address)
    except ValueError:
        return False


# --------------------------------------------------------------------------- client


class OllamaClient(SessionClient):
    """One aiohttp session to one Ollama server; ``close()`` when done."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        super().__init__(base_url, timeout)
        self._show_cache: dict[tuple[str, str | None], dict[str, Any]] = {}
        self.tag_names: set[str] = set()  # every installed name, variants included

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                      timeout: float | None = None, max_bytes: int = MAX_REPLY_BYTES) -> Any:
        """Send one request and return its decoded JSON; raise an OllamaError on failure
        (OllamaBadResponse for an answer longer than ``max_bytes``)."""
        url = f"{self.base_url}{path}"
        where = f"{method} {url}"
        status, text = await fetch(self._get_session(), method, url, self.base_url, ERRORS,
                                   body=body, max_bytes=max_bytes,
                                   timeout=self.timeout if timeout is None else timeout)
        if status >= 400:
            raise ERRORS.status_error(where, status, _error_detail(text))
        return ERRORS.decode_json(text, where)

    # ------------------------------------------------------------------ endpoints
    async def version(self) -> str:
        data = await self.request("GET", "/api/version", max_bytes=MAX_VERSION_BYTES)
        return _field(data, "version", str, "/api/version")

    async def tags(self) -> list[dict[str, Any]]:
        data = await self.request("GET", "/api/tags")
        return _dict_list(data, "models", "/api/tags")

    async def show(self, model: str) -> dict[str, Any]:
        data = await self.request("POST", "/api/show", {"model": model})
        if not isinstance(data, dict):
            raise OllamaBadResponse(f"/api/show for {model} did not return a JSON object")
        return data

    async def ps(self) -> list[dict[str, Any]]:
        data = await self.request("GET", "/api/ps")
        return _dict_list(data, "models", "/api/ps")

    async def create(self, model: str, source: str, parameters: dict[str, Any]) -> None:
        """Create ``model`` from ``source`` with ``parameters`` (never touches ``source``)."""
        body = {"model": model, "from": source, "parameters": parameters, "stream": False}
        data = await self.request("POST", "/api/create", body, timeout=max(self.timeout, 60.0))
        if isinstance(data, dict) and data.get("error"):
            raise OllamaHTTPError(f"Ollama refused to create {model}: {data['error']}", 200)

    async def generate_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST ``/api/generate`` with streaming; yield each decoded chunk as it arrives.

        The caller bounds the time (``asyncio.timeout``); a connection that drops mid-answer
        is an OllamaUnreachable, an ``error`` chunk or HTTP error status an OllamaHTTPError.
        """
        import aiohttp

        url = f"{self.base_url}/api/generate"
        try:
            session = self._get_session()
            async with session.post(url, json={**body, "stream": True}) as resp:
                if resp.status >= 400:
                    raw = await read_bounded(resp, MAX_REPLY_BYTES, f"POST {url}", ERRORS)
                    detail = _error_detail(raw.decode("utf-8", "replace"))
                    raise ERRORS.status_error(f"POST {url}", resp.status, detail)
                async for line in read_lines(resp, MAX_LINE_BYTES, f"POST {url}", ERRORS):
                    if not line.strip():
                        continue
                    try:
                        chunk = json.loads(line)
                    except (ValueError, RecursionError):
                        raise OllamaBadResponse(f"Ollama streamed non-JSON from {url}: "
                                                f"{excerpt(line.decode('utf-8', 'replace'))}"
                                                ) from None
                    if not isinstance(chunk, dict):
                        raise OllamaBadResponse(f"Ollama streamed a non-object from {url}")
                    if isinstance(chunk.get("error"), str):
                        raise OllamaHTTPError(f"Ollama stopped generating: {chunk['error']}",
                                              resp.status)
                    yield chunk
                    if chunk.get("done"):
                        return
            raise OllamaUnreachable(f"Ollama ended the answer to POST {url} before it was done")
        except (aiohttp.ClientError, OSError) as exc:
            raise ERRORS.connection(exc, self.base_url, f"POST {url}", streaming=True) from None

    # ------------------------------------------------------------------ the whole state
    async def loaded(self) -> list[LoadedModel]:
        return [parse_loaded(entry) for entry in await self.ps()]

    async def fetch_state(self, skip: tuple[str, ...] = ()) -> OllamaState:
        """Version, installed models (with geometry) and loaded models, in one snapshot.

        ``/api/show`` answers are cached by (name, digest), so a steady poll costs three
        requests. Names ending in a suffix of ``skip`` (velod's own variants) are left out.
        A model whose ``/api/show`` fails is kept with ``skip_reason`` set.
        """
        version = await self.version()
        entries = await self.tags()
        self.tag_names = {normalize_name(n) for e in entries
                          if isinstance(n := e.get("name") or e.get("model"), str)}
        models = []
        for entry in entries:
            name = entry.get("name") or entry.get("model")
            if not isinstance(name, str) or any(is_variant(name, suffix) for suffix in skip):
                continue
            models.append(await self._model_info(name, entry))
        loaded = await self.loaded()
        return OllamaState(version=version, models=models, loaded=loaded)

    async def _model_info(self, name: str, entry: dict[str, Any]) -> ModelInfo:
        digest = entry.get("digest") if isinstance(entry.get("digest"), str) else None
        details = entry.get("details") if isinstance(entry.get("details"), dict) else {}
        size = entry.get("size")
        size = size if isinstance(size, int) and not isinstance(size, bool) else 0
        geometry, reason = None, None
        try:
            key = (name, digest)
            if key not in self._show_cache:
                self._show_cache[key] = await self.show(name)
            info = self._show_cache[key].get("model_info")
            if not isinstance(info, dict):
                raise UnknownArchitecture("/api/show returned no model_info")
            geometry = Geometry.from_metadata(info)
        except UnknownArchitecture as exc:
            reason = str(exc)
        except OllamaError as exc:
            if isinstance(exc, OllamaUnreachable | OllamaTimeout):
                raise
            reason = f"cannot read the model's details: {exc}"
        return ModelInfo(name=name, digest=digest, size=size, geometry=geometry,
                         skip_reason=reason, family=opt_str(details.get("family")),
                         parameter_size=opt_str(details.get("parameter_size")),
                         quantization=opt_str(details.get("quantization_level")))


def variant_name(model: str, suffix: str) -> str:
    """The derived model velod creates for ``model``: ``llama3.1:8b`` -> ``llama3.1:8b-velod``."""
    return f"{model}{suffix}"


def is_variant(name: str, suffix: str) -> bool:
    """True for a model velod derived (``x:8b-velod``, ``x-velod``, ``x-velod:latest``)."""
    return name.endswith(suffix) or name.removesuffix(":latest").endswith(suffix)


def parse_loaded(entry: dict[str, Any]) -> LoadedModel:
    """One ``/api/ps`` entry as a LoadedModel; raise OllamaBadResponse when malformed."""
    name = entry.get("name") or entry.get("model")
    size, size_vram = entry.get("size"), entry.get("size_vram")
    if not isinstance(name, str) or not is_count(size) or not is_count(size_vram):
        raise OllamaBadResponse(f"/api/ps entry lacks name/size/size_vram: {excerpt(entry)}")
    ctx = entry.get("context_length")
    expires = entry.get("expires_at")
    return LoadedModel(name=name, size=size, size_vram=size_vram,
                       context_length=ctx if is_count(ctx) else None,
                       expires_at=expires if isinstance(expires, str) else None)


def _field(data: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(data, dict) or not isinstance(data.get(key), kind):
        raise OllamaBadResponse(f"{where} answered without a '{key}' field: {excerpt(data)}")
    return data[key]


def _dict_list(data: Any, key: str, where: str) -> list[dict[str, Any]]:
    if isinstance(data, dict) and data.get(key, []) is None:
        return []  # Go encodes an empty nil slice as null
    items = _field(data, key, list, where)
    if not all(isinstance(item, dict) for item in items):
        raise OllamaBadResponse(f"{where} '{key}' holds something other than objects")
    return items


def _error_detail(text: str) -> str:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return excerpt(text) or "(empty body)"
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return excerpt(data["error"], 500)
    return excerpt(text)
