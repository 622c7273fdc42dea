"""A local user against velod's HTTP listener: connections past the caps are answered 503
and closed, a header sent a byte at a time does not hold a connection, and the control
socket and other clients keep being served throughout."""

from __future__ import annotations

import socket
import time

import httpx

from tests.fakes.fake_ollama import free_port
from tests.integration.conftest import wait_for


def read_all(sock: socket.socket, limit: float) -> bytes:
    """What the server sends before closing; fails if it keeps the connection ``limit`` s."""
    sock.settimeout(limit)
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_connections_past_the_caps_are_refused_and_silent_ones_closed(velod_factory):
    port = free_port()
    d = velod_factory({"http": {"listen": f"127.0.0.1:{port}", "max_connections": 6,
                                "max_connections_per_client": 4, "idle_timeout": "1s"}})
    url = f"http://127.0.0.1:{port}"
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    wait_for(lambda: d.call("system.status")["components"]["http"]["connections"]["open"] == 4,
             what="four connections open")
    extra = socket.create_connection(("127.0.0.1", port))
    answer = read_all(extra, 5)
    assert answer.startswith(b"HTTP/1.1 503") and b"http.max_connections_per_client" in answer
    d.ctl("ping")  # the control socket is untouched by the HTTP caps

    slow = held[0]
    started = time.monotonic()
    for byte in b"GET /health HTTP/1.1\r\n":  # a byte every 0.2 s never completes in time
        try:
            slow.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.2)
        if time.monotonic() - started > 4:
            break
    assert read_all(slow, 5) == b"" and time.monotonic() - started < 4
    for sock in held[1:]:  # idle since they opened: closed by the idle timeout too
        assert read_all(sock, 5) == b""
    http = d.call("system.status")["components"]["http"]["connections"]
    assert http["open"] == 0 and http["refused"] == 1 and http["timed_out"] == 4
    assert httpx.get(url + "/health").status_code == 200  # served again once they are gone
    for sock in [*held, extra]:
        sock.close()

