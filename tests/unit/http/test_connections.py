"""ConnectionGate on a real asyncio server: total and per-client caps answer 503 and close,
the idle clock closes silent and slowly-sent connections but never one being served."""

from __future__ import annotations

import asyncio

import pytest

from velod.http.connections import ConnectionGate, refusal


class Echo(asyncio.Protocol):
    """Echoes each chunk; a chunk b"serve" marks the connection as being served."""

    def __init__(self, gate: ConnectionGate) -> None:
        self.gate = gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if data == b"serve":
            serving = self.gate.serving(self.transport)
            serving.__enter__()
            asyncio.get_running_loop().call_later(0.6, serving.__exit__, None, None, None)
        self.transport.write(data)  # type: ignore[attr-defined]


async def serve(gate: ConnectionGate) -> tuple[asyncio.Server, int]:
    server = await asyncio.get_running_loop().create_server(
        gate.wrap(lambda: Echo(gate)), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent before closing; fails if it stays open ``seconds``."""
    return await asyncio.wait_for(reader.read(), seconds)


def test_a_connection_past_the_total_gets_503_and_is_closed():
    async def main() -> None:
        gate = ConnectionGate(max_connections=3, max_per_client=3, idle_timeout=30)
        server, port = await serve(gate)
        kept = [await connect(port) for _ in range(3)]
        for reader, writer in kept:  # all three admitted: they echo
            writer.write(b"hi")
            assert await reader.readexactly(2) == b"hi"
        reader, _ = await connect(port)
        answer = await closed_within(reader, 5)
        assert answer.startswith(b"HTTP/1.1 503 ") and b"http.max_connections" in answer
        assert b"Retry-After: 1" in answer and gate.refused == 1 and gate.open == 3
        kept[0][1].close()
        await asyncio.sleep(0.1)
        assert gate.open == 2
        reader, writer = await connect(port)  # room again
        writer.write(b"ok")
        assert await reader.readexactly(2) == b"ok"
        server.close()

    asyncio.run(main())


def test_one_client_cannot_take_more_than_its_share():
    async def main() -> None:
        gate = ConnectionGate(max_connections=10, max_per_client=2, idle_timeout=30)
        server, port = await serve(gate)
        _kept = [await connect(port) for _ in range(2)]
        reader, writer = await connect(port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 4096)
        # Its request is never read, yet the 503 arrives whole: no reset before it.
        answer = await closed_within(reader, 5)
        assert b"http.max_connections_per_client" in answer and gate.open == 2
        assert answer.endswith(b"}") and gate.lingering == 1  # until the client closes
        writer.close()
        await asyncio.sleep(0.1)
        assert gate.lingering == 0
        server.close()

    asyncio.run(main())


def test_idle_and_slowly_sent_connections_are_closed_but_not_one_being_served():
    async def main() -> None:
        gate = ConnectionGate(max_connections=10, max_per_client=10, idle_timeout=0.4)
        server, port = await serve(gate)
        idle_reader, idle_writer = await connect(port)  # kept: a dropped writer closes
        slow_reader, slow_writer = await connect(port)
        busy_reader, busy_writer = await connect(port)
        busy_writer.write(b"serve")  # served for 0.6 s, longer than the idle timeout
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(3):  # a byte at a time does not keep a connection open
            slow_writer.write(b"G")
            await asyncio.sleep(0.15)
        assert await closed_within(slow_reader, 2) == b"GGG"
        assert await closed_within(idle_reader, 2) == b""
        assert await busy_reader.readexactly(5) == b"serve"
        await asyncio.sleep(0.7 - (loop.time() - started))
        assert not busy_reader.at_eof()  # still open right after its request ended ...
        assert await closed_within(busy_reader, 2) == b""  # ... then idle like the others
        assert gate.timed_out == 3 and gate.open == 0
        idle_writer.close()
        server.close()

    asyncio.run(main())


@pytest.mark.parametrize("retry", [1.0, 2.5])
def test_the_refusal_is_a_complete_http_response(retry):
    raw = refusal("full", retry)
    head, body = raw.split(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert f"Retry-After: {retry:g}".encode() in head and b"Connection: close" in head


def test_a_per_client_share_above_the_total_is_a_config_error():
    from velod.config import validate_text

    result = validate_text("http:\n  max_connections: 8\n  max_connections_per_client: 9\n",
                           "velod.yaml")
    assert not result["valid"]
    assert [e.split(":")[0] for e in result["errors"]] == ["http.max_connections_per_client"]
