"""Where a model's GGUF is: an Ollama model name resolved through Ollama's store, or a path.

Ollama keeps what it pulls under a models directory (``$OLLAMA_MODELS``; the Linux service's
``/usr/share/ollama/.ollama/models``; a user's ``~/.ollama/models``)::

    manifests/<host>/<namespace>/<model>/<tag>    JSON: {"layers": [{"mediaType", "digest"}]}
    blobs/sha256-<hex>                             one file per layer, named by its digest

A name is ``[host/][namespace/]model[:tag]`` with Ollama's defaults ``registry.ollama.ai``,
``library`` and ``latest``; the weights are the layer whose mediaType is
``application/vnd.ollama.image.model``. Everything here only reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from velod.model.gguf import ModelFileError

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MODEL_MEDIA_TYPE = "application/vnd.ollama.image.model"
SERVICE_MODELS_DIR = Path("/usr/share/ollama/.ollama/models")
MAX_MANIFEST_BYTES = 1 << 20  # real manifests are a few KB

_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")


class ModelNotFoundError(ModelFileError):
    """No such model file, or no such model in any Ollama store looked at."""


class ManifestError(ModelFileError):
    """An Ollama manifest that cannot be read as one (bad JSON, no model layer, ...)."""


@dataclass(frozen=True)
class OllamaName:
    """A parsed Ollama model name, defaults filled in."""

    host: str
    namespace: str
    model: str
    tag: str

    def manifest_path(self) -> Path:
        """The manifest's path relative to a models directory."""
        return Path("manifests", self.host, self.namespace, self.model, self.tag)

    def __str__(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"


@dataclass(frozen=True)
class ResolvedModel:
    """A model file found: its path, and for an Ollama name where it came from."""

    path: Path
    name: str                      # what the caller asked for
    manifest: Path | None = None   # None for a plain path
    digest: str | None = None      # "sha256:<hex>" of the model layer


def parse_name(text: str) -> OllamaName:
    """``gemma3:270m`` → registry.ollama.ai/library/gemma3:270m; ValueError if malformed."""
    rest, colon, tag = text.strip().partition(":")
    parts = rest.split("/")
    if len(parts) > 3 or not all(_PART.match(p) for p in parts) or \
            (colon and not _PART.match(tag)):
        raise ValueError(f"{text!r} is not an Ollama model name ([host/][namespace/]model"
                         "[:tag], letters, digits, '_', '-', '.')")
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
    host = parts[-3] if len(parts) == 3 else DEFAULT_HOST
    return OllamaName(host, namespace, model, tag or DEFAULT_TAG)


def models_dirs(env: Mapping[str, str] | None = None,
                home: Path | None = None) -> list[Path]:
    """The models directories searched, in order: $OLLAMA_MODELS, the service's, the user's."""
    env = os.environ if env is None else env
    dirs = []
    if env.get("OLLAMA_MODELS"):
        dirs.append(Path(env["OLLAMA_MODELS"]).expanduser())
    dirs.append(SERVICE_MODELS_DIR)
    with contextlib.suppress(RuntimeError):  # no home directory (a system user has none)
        dirs.append((home or Path.home()) / ".ollama" / "models")
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def looks_like_path(text: str) -> bool:
    """True for what is meant as a file path rather than an Ollama name."""
    return text.endswith(".gguf") or text.startswith(("/", "./", "../", "~"))


def resolve(text: str, dirs: Sequence[Path] | None = None) -> ResolvedModel:
    """The GGUF file for a model name or path; ModelNotFoundError / ManifestError otherwise."""
    if looks_like_path(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(path, "no such model file")
        return ResolvedModel(path, text)
    try:
        name = parse_name(text)
    except ValueError as exc:
        raise ModelNotFoundError(text, str(exc)) from None
    searched = list(models_dirs() if dirs is None else dirs)
    for root in searched:
        manifest = _find_manifest(root, name)
        if manifest is not None:
            digest = model_layer_digest(manifest)
            blob = root / "blobs" / digest.replace(":", "-")
            if not blob.is_file():
                raise ModelNotFoundError(text, f"manifest {manifest} names model blob {blob}, "
                                         "which is missing (re-pull the model with "
                                         "`ollama pull`)")
            return ResolvedModel(blob, text, manifest, digest)
    looked = ", ".join(str(d / name.manifest_path()) for d in searched) or "nowhere"
    raise ModelNotFoundError(text, f"no such model in Ollama's store (looked for {looked}); "
                             "pull it with `ollama pull`, set OLLAMA_MODELS, or give a path "
                             "to a .gguf file")


def _find_manifest(root: Path, name: OllamaName) -> Path | None:
    """The manifest under ``root``: as spelled, or lower-cased (newer Ollama stores names
    case-insensitively)."""
    relative = name.manifest_path()
    for candidate in (root / relative, root / Path(str(relative).lower())):
        try:
            if candidate.is_file():
                return candidate
        except OSError:  # a directory we may not enter
            continue
    return None


def model_layer_digest(manifest: Path) -> str:
    """The ``sha256:<hex>`` digest of the manifest's model layer; ManifestError otherwise."""
    try:
        with open(manifest, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(manifest, f"cannot be read: {exc.strerror or exc}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(manifest, f"is over {MAX_MANIFEST_BYTES} bytes; not a manifest")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(manifest, f"is not valid JSON: {exc}") from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise ManifestError(manifest, "has no \"layers\" list")
    for layer in layers:
        if isinstance(layer, dict) and layer.get("mediaType") == MODEL_MEDIA_TYPE:
            digest = layer.get("digest")
            match = _DIGEST.match(digest) if isinstance(digest, str) else None
            if match is None:
                raise ManifestError(manifest, f"model layer has digest {digest!r}, not "
                                    "sha256:<64 hex digits>")
            return f"sha256:{match.group(1)}"
    kinds = sorted({str(layer.get("mediaType")) for layer in layers if isinstance(layer, dict)})
    raise ManifestError(manifest, f"has no layer of mediaType {MODEL_MEDIA_TYPE} (layers: "
                        f"{', '.join(kinds) or 'none'})")
