"""A local user against velod's HTTP listener: connections past the caps are answered 503
and closed, a header sent a byte at a time does not hold a connection, and the control
socket and other clients keep being served throughout."""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

from tests.fakes.fake_ollama import free_port
from tests.integration.conftest import wait_for
from tests.integration.other_uid import NOBODY, as_user


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
    assert f"this client (uid:{os.getuid()})".encode() in answer
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



def health_over_tcp(port: int) -> bytes:
    """The status line of GET /health on a fresh loopback connection (as whoever runs it)."""
    sock = socket.socket()
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
    return read_all(sock, 10).split(b"\r\n", 1)[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_each_local_user_has_its_own_share_over_loopback_tcp(velod_factory):
    port = free_port()
    d = velod_factory({"http": {"listen": f"127.0.0.1:{port}", "max_connections": 8,
                                "max_connections_per_client": 2, "idle_timeout": "30s"}})
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    wait_for(lambda: d.call("system.status")["components"]["http"]["connections"]["open"] == 2,
             what="root's two connections open")
    assert health_over_tcp(port).startswith(b"HTTP/1.1 503")  # root's share is taken ...
    with as_user(NOBODY, health_over_tcp, port) as line:  # ... nobody's is not
        assert line.endswith(b" 200 OK")
    for sock in held:
        sock.close()
