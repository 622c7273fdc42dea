"""A hostile local user against the real velod: no lockout, no stall, no unbounded memory, and
third-party msgpack-rpc clients are served."""

import contextlib
import os
import shutil
import socket
import threading
import time

import msgpack
import psutil
import pytest

from tests.integration.conftest import wait_for
from tests.integration.other_uid import (
    NOBODY,
    OTHER,
    as_user,
    open_connections,
    shared_socket_dir,
)
from tests.integration.test_control_limits import raw_connect, read_messages
from tests.unit.test_safe_yaml import alias_bomb
from velod import safe_yaml
from velod.control import protocol
from velod.control.client import Client

MiB = 1024**2
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="setuid() to another uid needs root")


def ping_ms(daemon) -> float:
    start = time.perf_counter()
    with Client.connect(str(daemon.socket), timeout=10) as client:
        assert client.call("system.ping")["pong"]
    return (time.perf_counter() - start) * 1000


def rss(daemon) -> int:
    return psutil.Process(daemon.proc.pid).memory_info().rss


# ------------------------------------------------------------------------------- lockout


@pytest.fixture
def sock_dir():
    """A socket directory other uids can reach, removed afterwards."""
    path = shared_socket_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_one_user_cannot_lock_out_others_and_root_always_gets_in(velod_factory, sock_dir):
    daemon = velod_factory({"control": {"max_connections": 12, "max_connections_per_uid": 6,
                                        "admin_reserved_connections": 4}},
                           socket=sock_dir / "velod.sock")
    path = str(daemon.socket)
    with as_user(NOBODY, open_connections, path, 10) as first:
        assert first["uid"] == NOBODY
        assert first["accepted"] == 6  # its share, not the whole table
        assert "from uid 65534 (max 6 per user)" in first["refused"][0]
        with as_user(OTHER, open_connections, path, 10) as second:
            assert second["accepted"] == 2  # 12 - 4 reserved - 6 taken
            assert "kept for administrators" in second["refused"][0]
            status = daemon.call("system.status")["control"]  # root: from the reserve
            assert status["users"] == 3 and status["connections"] == 9
            held = [Client.connect(path) for _ in range(3)]  # root still has room
            assert all(c.call("system.ping")["pong"] for c in held)
            for client in held:
                client.close()
    time.sleep(0.3)
    assert daemon.call("system.status")["control"]["users"] == 1


@needs_root
def test_root_is_capped_per_uid_too(velod_factory):
    daemon = velod_factory({"control": {"max_connections": 12, "max_connections_per_uid": 3,
                                        "admin_reserved_connections": 4}})
    held = [Client.connect(str(daemon.socket)) for _ in range(3)]
    for client in held:
        assert client.call("system.ping")["pong"]
    extra = raw_connect(daemon.socket)
    (msg,) = read_messages(extra)
    assert msg[1] == "error" and "from uid 0 (max 3 per user)" in msg[2][0]["message"]
    for client in held:
        client.close()


# ------------------------------------------------------------------------------- slowloris


def test_a_request_trickling_in_a_byte_at_a_time_is_cut_off(velod_factory):
    daemon = velod_factory({"control": {"message_timeout": "1s", "idle_timeout": "30s"}})
    sock = raw_connect(daemon.socket)
    request = protocol.encode_request(1, "config.validate", {"text": "x" * 200})
    start = time.monotonic()
    dropped = None
    for byte in request:  # each byte comes well within the idle timeout, the whole never does
        try:
            sock.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            dropped = time.monotonic() - start
            break
        time.sleep(0.1)
    assert dropped is not None, "velod never closed a request that took 20s to arrive"
    assert dropped < 5
    assert daemon.call("system.ping")["pong"]


def test_the_peer_is_told_why_its_trickling_request_was_dropped(velod_factory):
    daemon = velod_factory({"control": {"message_timeout": "500ms"}})
    sock = raw_connect(daemon.socket)
    sock.sendall(protocol.encode_request(1, "system.ping")[:5])
    (msg,) = read_messages(sock)
    assert msg[1] == "error"
    assert "did not arrive whole within 0.5s" in msg[2][0]["message"]


def test_a_slow_but_steady_client_with_whole_requests_is_served(velod_factory):
    daemon = velod_factory({"control": {"message_timeout": "1s", "idle_timeout": "2s"}})
    with daemon.client() as client:
        for _ in range(4):
            assert client.call("system.ping")["pong"]
            time.sleep(0.6)  # longer than half the message timeout, between whole requests


# ------------------------------------------------------------------------------- pipelining


def test_ten_thousand_pipelined_pings_get_ten_thousand_replies(velod):
    sock = raw_connect(velod.socket)
    count = 10_000
    payload = b"".join(protocol.encode_request(i, "system.ping") for i in range(count))
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    replies = read_messages(sock, count)
    sender.join(10)
    assert len(replies) == count
    assert sorted(r[1] for r in replies) == list(range(count))
    assert all(r[2] is None and r[3]["pong"] for r in replies)


# ------------------------------------------------------------------------------- slow readers


class Sampler:
    """Samples velod's RSS and a fresh client's ping time in the background."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.rss: list[int] = []
        self.pings: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rss.append(rss(self.daemon))
            self.pings.append(ping_ms(self.daemon))
            time.sleep(0.02)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_clients_that_never_read_their_replies_cost_bounded_memory(velod_factory):
    daemon = velod_factory({"control": {"max_connections_per_uid": 64, "idle_timeout": "3s"}})
    time.sleep(1.0)  # let start-up allocations settle
    before = rss(daemon)
    request = protocol.encode_request(1, "system.status")
    with Sampler(daemon) as sampler:
        socks = []
        for _ in range(60):
            sock = raw_connect(daemon.socket)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            socks.append(sock)
        for _round in range(40):  # push requests until every connection stalls
            for sock in socks:
                with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                    sock.send(request * 200)
            time.sleep(0.05)
        status = daemon.call("system.status")["control"]
        for sock in socks:
            sock.close()
        wait_for(lambda: daemon.call("system.status")["control"]["connections"] <= 1,
                 what="the 60 connections to be closed")
        time.sleep(0.5)
    after = rss(daemon)
    # 4 MiB for all peers' unsent replies, plus at most max_inflight replies each
    assert status["unsent_bytes"] <= 4 * MiB + 60 * 16 * 4096, status
    assert status["connections"] == 61
    peak = max(sampler.rss)
    assert peak - before < 100 * MiB, f"peak {(peak - before) / MiB:.1f} MiB above idle"
    assert after - before < 20 * MiB, f"{(after - before) / MiB:.1f} MiB kept after they left"
    assert max(sampler.pings) < 1000, f"a ping took {max(sampler.pings):.0f} ms meanwhile"


def test_a_stalled_reader_is_dropped_after_the_idle_timeout(velod_factory):
    daemon = velod_factory({"control": {"idle_timeout": "1s"}})
    sock = raw_connect(daemon.socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    request = protocol.encode_request(1, "system.status")
    deadline = time.monotonic() + 15
    dropped = False
    while time.monotonic() < deadline and not dropped:
        try:
            sock.send(request * 50)
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            dropped = True
        time.sleep(0.05)
    assert dropped, "a peer that never reads was never dropped"
    assert "does not read its replies" in daemon.log_text()


# ------------------------------------------------------------------------------- bombs


def test_an_alias_bomb_sent_to_config_validate_is_refused_cheaply(velod):
    before = rss(velod)
    with Sampler(velod) as sampler, velod.client() as client:
        for _ in range(5):
            result = client.call("config.validate", {"text": alias_bomb()})
            assert result["valid"] is False
            assert "expands to more than" in result["errors"][0]
            assert sum(len(e) for e in result["errors"]) < 4096
    assert max(sampler.rss) - before < 100 * MiB
    assert sampler.pings and max(sampler.pings) < 1000
    assert velod.call("system.ping")["pong"]


def test_huge_config_text_is_refused_before_parsing(velod_factory):
    daemon = velod_factory({"control": {"max_message_size": "4MiB"}})
    with daemon.client() as client:
        result = client.call("config.validate", {"text": "a: [" + "1, " * 1_000_000 + "1]"})
    assert not result["valid"]
    assert f"at most {safe_yaml.MAX_BYTES} are accepted" in result["errors"][0]


# ------------------------------------------------------------------------------- interop


def test_bin_method_names_are_read_as_utf8_and_unknown_notifications_ignored(velod):
    sock = raw_connect(velod.socket)
    sock.sendall(msgpack.packb([2, b"nvim_set_client_info", ["x", {}, "remote", {}, {}]],
                               use_bin_type=True))
    sock.sendall(msgpack.packb([0, 7, b"system.ping", [{}]], use_bin_type=True))
    (reply,) = read_messages(sock)
    assert reply[1] == 7 and reply[2] is None and reply[3]["pong"]
    sock.sendall(msgpack.packb([0, 8, b"\xff\xfe", [{}]], use_bin_type=True))
    (reply,) = read_messages(sock)
    assert reply[1] == 8 and reply[2]["code"] == "invalid_request"


def test_pynvim_talks_to_velod(velod):
    from pynvim.msgpack_rpc import socket_session

    session = socket_session(str(velod.socket))  # sends nvim_set_client_info first
    session.error_wrapper = lambda err: RuntimeError(f"{err['code']}: {err['message']}")
    try:
        hello = session.request("system.hello", {})
        assert hello["name"] == "velod" and "system.status" in hello["methods"]
        status = session.request("system.status", {})
        assert status["pid"] == velod.proc.pid
        with pytest.raises(RuntimeError, match="unknown_method"):
            session.request("system.nope", {})
    finally:
        session.close()
    assert velod.call("system.ping")["pong"]
    assert os.path.exists(velod.socket)
