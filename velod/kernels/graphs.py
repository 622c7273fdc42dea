"""CUDA graphs through the driver API with ctypes (PyCUDA 2026.1 has no graph calls).

``GraphCapture(lib).capture(stream, record)`` runs ``record()`` with ``stream`` in capture mode
(its launches are recorded, not run), instantiates the graph and returns a :class:`CudaGraph`
whose ``replay()`` launches all of it with one call. A replay reads whatever the captured
buffers hold at that time: callers update inputs in place, never by reallocating them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

CAPTURE_MODE_THREAD_LOCAL = 1  # CUstreamCaptureMode: other threads may use CUDA meanwhile

_P = ctypes.c_void_p
_SIGNATURES: dict[str, list[Any]] = {
    "cuStreamBeginCapture_v2": [_P, ctypes.c_int],
    "cuStreamEndCapture": [_P, ctypes.POINTER(_P)],
    "cuGraphInstantiateWithFlags": [ctypes.POINTER(_P), _P, ctypes.c_ulonglong],
    "cuGraphLaunch": [_P, _P],
    "cuGraphExecDestroy": [_P],
    "cuGraphDestroy": [_P],
    "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
}


class GraphError(RuntimeError):
    """The driver refused a graph call (the message names the call and the CUresult)."""


def load_driver(loader: Callable[[str], Any] = ctypes.CDLL) -> Any:
    """The CUDA driver library (libcuda.so.1, as PyCUDA loads it) with the graph calls
    declared; GraphError when it cannot be loaded."""
    try:
        lib = loader("libcuda.so.1")
    except OSError as exc:
        raise GraphError(f"the CUDA driver library libcuda.so.1 cannot be loaded: {exc}") \
            from None
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    return lib


def _stream_handle(stream: Any) -> int:
    return int(getattr(stream, "handle", stream))


class CudaGraph:
    """An instantiated graph: ``replay()`` launches it on the stream it was captured on."""

    def __init__(self, driver: GraphCapture, graph: ctypes.c_void_p,
                 executable: ctypes.c_void_p, stream: Any) -> None:
        self._driver = driver
        self._graph = graph
        self._executable = executable
        self._stream = stream

    def replay(self) -> None:
        """Queues the whole graph on its stream (asynchronous, like a launch)."""
        if self._executable is None:
            raise GraphError("the graph was closed")
        self._driver.check(self._driver.lib.cuGraphLaunch(
            self._executable, _stream_handle(self._stream)), "cuGraphLaunch")

    def close(self) -> None:
        """Frees the graph and its executable (with the context current); idempotent."""
        if self._executable is not None:
            self._driver.lib.cuGraphExecDestroy(self._executable)
            self._driver.lib.cuGraphDestroy(self._graph)
            self._executable = self._graph = None


class GraphCapture:
    """Captures and instantiates CUDA graphs on a non-default stream."""

    def __init__(self, lib: Any = None) -> None:
        self.lib = lib if lib is not None else load_driver()

    def check(self, result: int, call: str) -> None:
        if result != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(result, ctypes.pointer(name))
            label = name.value.decode() if name.value else f"CUresult {result}"
            raise GraphError(f"{call} failed: {label}")

    def capture(self, stream: Any, record: Callable[[], None]) -> CudaGraph:
        """The graph of everything ``record()`` queues on ``stream``. If ``record`` raises,
        the capture is ended and discarded (the stream is usable again) and the error
        propagates. ``stream`` must not be the legacy default stream."""
        handle = _stream_handle(stream)
        if handle == 0:
            raise GraphError("the legacy default stream cannot be captured; use a stream")
        self.check(self.lib.cuStreamBeginCapture_v2(handle, CAPTURE_MODE_THREAD_LOCAL),
                   "cuStreamBeginCapture")
        graph = ctypes.c_void_p()
        try:
            record()
        except BaseException:
            if self.lib.cuStreamEndCapture(handle, ctypes.pointer(graph)) == 0 and graph.value:
                self.lib.cuGraphDestroy(graph)
            raise
        self.check(self.lib.cuStreamEndCapture(handle, ctypes.pointer(graph)),
                   "cuStreamEndCapture")
        executable = ctypes.c_void_p()
        result = self.lib.cuGraphInstantiateWithFlags(ctypes.pointer(executable), graph, 0)
        if result != 0:
            self.lib.cuGraphDestroy(graph)
            self.check(result, "cuGraphInstantiate")
        return CudaGraph(self, graph, executable, stream)
