"""velod's CUDA graph calls against a stand-in for libcuda's graph API that follows its
documented behaviour: work queued on a capturing stream is recorded, not run; ending the
capture yields the graph; an instantiated graph runs its recorded work on each launch.
"""

from __future__ import annotations

import ctypes
from typing import ClassVar

import pytest

from tests.fakes.cublas import LibraryFunction
from velod.kernels.graphs import GraphCapture, GraphError, load_driver


class FakeDriver:
    """libcuda's graph calls; ``launch(stream, name)`` stands for a kernel launch."""

    ERRORS: ClassVar[dict[int, bytes]] = {1: b"CUDA_ERROR_INVALID_VALUE",
                                          900: b"CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"}

    def __init__(self) -> None:
        self.capturing: dict[int, list[str]] = {}
        self.graphs: dict[int, list[str]] = {}
        self.executables: dict[int, int] = {}
        self.ran: list[str] = []
        self.destroyed: list[int] = []
        self.instantiate_result = 0
        self._next = 100
        for name in dir(self):  # declarable like ctypes functions (argtypes, restype)
            if name.startswith("cu"):
                setattr(self, name, LibraryFunction(getattr(self, name)))

    def launch(self, stream: int, name: str) -> None:
        if stream in self.capturing:
            self.capturing[stream].append(name)
        else:
            self.ran.append(name)

    def cuStreamBeginCapture_v2(self, stream, mode) -> int:
        if stream in self.capturing or mode not in (0, 1, 2):
            return 1
        self.capturing[stream] = []
        return 0

    def cuStreamEndCapture(self, stream, graph_pointer) -> int:
        if stream not in self.capturing:
            return 1
        self._next += 1
        self.graphs[self._next] = self.capturing.pop(stream)
        graph_pointer.contents.value = self._next
        return 0

    def cuGraphInstantiateWithFlags(self, exec_pointer, graph, flags) -> int:
        if self.instantiate_result:
            return self.instantiate_result
        self._next += 1
        self.executables[self._next] = graph.value
        exec_pointer.contents.value = self._next
        return 0

    def cuGraphLaunch(self, executable, stream) -> int:
        graph = self.executables.get(executable.value)
        if graph is None or stream in self.capturing:
            return 1
        self.ran.extend(self.graphs[graph])
        return 0

    def cuGraphExecDestroy(self, executable) -> int:
        del self.executables[executable.value]
        self.destroyed.append(executable.value)
        return 0

    def cuGraphDestroy(self, graph) -> int:
        self.destroyed.append(graph.value)
        self.graphs.pop(graph.value)
        return 0

    def cuGetErrorName(self, result, name_pointer) -> int:
        name_pointer.contents.value = self.ERRORS.get(result, b"CUDA_ERROR_UNKNOWN")
        return 0


class Stream:
    handle = 7


def test_captured_launches_run_only_when_the_graph_is_replayed():
    driver = FakeDriver()
    graph = GraphCapture(driver).capture(Stream(), lambda: [driver.launch(7, name)
                                                           for name in ("norm", "gemm", "attn")])
    assert driver.ran == []
    graph.replay()
    graph.replay()
    assert driver.ran == ["norm", "gemm", "attn"] * 2


def test_a_failure_while_recording_ends_the_capture_and_frees_the_graph():
    driver = FakeDriver()

    def record() -> None:
        driver.launch(7, "norm")
        raise ValueError("a shape the kernels refuse")

    with pytest.raises(ValueError, match="refuse"):
        GraphCapture(driver).capture(Stream(), record)
    assert driver.capturing == {} and driver.graphs == {}  # the stream can be used again
    driver.launch(7, "later")
    assert driver.ran == ["later"]


def test_instantiation_errors_name_the_driver_error_and_free_the_graph():
    driver = FakeDriver()
    driver.instantiate_result = 900
    with pytest.raises(GraphError, match=r"cuGraphInstantiate.*STREAM_CAPTURE_INVALIDATED"):
        GraphCapture(driver).capture(Stream(), lambda: driver.launch(7, "x"))
    assert driver.graphs == {}


def test_the_default_stream_is_refused_before_any_driver_call():
    driver = FakeDriver()
    with pytest.raises(GraphError, match="default stream"):
        GraphCapture(driver).capture(0, lambda: None)
    assert driver.capturing == {}


def test_a_closed_graph_is_freed_once_and_cannot_be_replayed():
    driver = FakeDriver()
    graph = GraphCapture(driver).capture(Stream(), lambda: driver.launch(7, "x"))
    graph.close()
    graph.close()
    assert len(driver.destroyed) == 2 and driver.graphs == {}
    with pytest.raises(GraphError, match="closed"):
        graph.replay()


def test_load_driver_declares_the_graph_calls():
    lib = load_driver(loader=lambda name: FakeDriver())
    assert lib.cuStreamEndCapture.argtypes[1] == ctypes.POINTER(ctypes.c_void_p)
    assert lib.cuGraphInstantiateWithFlags.argtypes[2] is ctypes.c_ulonglong


def test_a_missing_driver_is_a_graph_error():
    def missing(name: str):
        raise OSError(f"{name}: cannot open shared object file")

    with pytest.raises(GraphError, match=r"libcuda\.so\.1"):
        load_driver(loader=missing)
