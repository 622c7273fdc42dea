"""Bad input and abuse on the control socket: each peer gets an error or a disconnect, the
daemon stays up, keeps answering everyone else, and its memory stays bounded."""

import contextlib
import socket
import time

import msgpack
import psutil
import pytest

from tests.integration.conftest import wait_for
from velod.control import protocol
from velod.control.client import Client, RemoteError

LIMITS = {"control": {"max_message_size": "64KiB", "max_connections": 16,
                      "idle_timeout": "1s", "max_inflight": 4}}


def raw_connect(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def read_messages(sock: socket.socket, count: int = 1) -> list:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    out: list = []
    while len(out) < count:
        data = sock.recv(65536)
        if not data:
            break
        unpacker.feed(data)
        out.extend(unpacker)
    return out


def assert_closed(sock: socket.socket) -> None:
    sock.settimeout(10)
    while True:
        data = sock.recv(65536)
        if not data:
            return


@pytest.fixture
def limited(velod_factory):
    return velod_factory(LIMITS)


def still_serving(daemon) -> None:
    assert daemon.alive()
    assert daemon.call("system.ping")["pong"] is True


def test_garbage_bytes_get_an_error_then_a_disconnect(limited):
    sock = raw_connect(limited.socket)
    sock.sendall(b"\xc1\xc1 GET / HTTP/1.1\r\n\r\n")
    (msg,) = read_messages(sock)
    assert msg[0] == 2 and msg[1] == "error"
    assert msg[2][0]["code"] == "invalid_request"
    assert "undecodable" in msg[2][0]["message"]
    assert_closed(sock)
    still_serving(limited)


def test_a_truncated_message_then_hangup_is_harmless(limited):
    sock = raw_connect(limited.socket)
    sock.sendall(protocol.encode_request(1, "system.ping")[:-3])
    sock.close()
    still_serving(limited)


def test_wrong_shapes_get_invalid_request_and_the_connection_stays_usable(limited):
    sock = raw_connect(limited.socket)
    sock.sendall(msgpack.packb([0, 5, 42, []]))
    (reply,) = read_messages(sock)
    assert reply[0] == 1 and reply[1] == 5
    assert reply[2]["code"] == "invalid_request"
    sock.sendall(msgpack.packb([0, 6, "system.ping", [{"x": 1}, 2]]))
    (reply,) = read_messages(sock)
    assert reply[1] == 6 and reply[2]["code"] == "invalid_request"
    sock.sendall(protocol.encode_request(7, "system.ping"))
    (reply,) = read_messages(sock)
    assert reply[1] == 7 and reply[2] is None and reply[3]["pong"] is True
    sock.close()


def test_a_message_without_a_msgid_is_answered_and_dropped(limited):
    sock = raw_connect(limited.socket)
    sock.sendall(msgpack.packb({"method": "system.ping"}))
    (msg,) = read_messages(sock)
    assert msg[1] == "error" and msg[2][0]["code"] == "invalid_request"
    assert_closed(sock)


def test_unknown_methods_and_bad_params_have_stable_codes(limited):
    with limited.client() as client:
        with pytest.raises(RemoteError) as err:
            client.call("system.nope")
        assert err.value.code == "unknown_method"
        with pytest.raises(RemoteError) as err:
            client.call("config.validate", {"text": 42})
        assert err.value.code == "invalid_params" and "'text'" in err.value.message
        with pytest.raises(RemoteError) as err:
            client.call("events.subscribe", {"topics": [1]})
        assert err.value.code == "invalid_params"
        assert client.call("system.ping")["pong"]


def test_an_oversize_message_is_refused_and_disconnected(limited):
    sock = raw_connect(limited.socket)
    # the daemon may hang up before we finish writing
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(protocol.encode_request(1, "config.validate", {"text": "x" * 200_000}))
    try:
        msgs = read_messages(sock)
    except ConnectionResetError:
        msgs = []
    if msgs:
        assert msgs[0][1] == "error" and "larger than" in msgs[0][2][0]["message"]
    assert_closed(sock)
    still_serving(limited)


def test_a_client_that_never_sends_is_disconnected_after_the_idle_timeout(limited):
    sock = raw_connect(limited.socket)
    start = time.monotonic()
    (msg,) = read_messages(sock)
    assert "idle" in msg[2][0]["message"]
    assert_closed(sock)
    assert 0.8 < time.monotonic() - start < 5
    still_serving(limited)


def test_event_subscribers_are_not_idle(limited):
    with limited.client() as client:
        client.subscribe(["nothing.*"])
        time.sleep(1.6)
        client.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            client.sock.recv(1)  # still open, nothing sent: not dropped as idle


def test_requests_beyond_max_inflight_wait_their_turn_and_all_get_answers(limited):
    sock = raw_connect(limited.socket)
    # config.reload is serialised by the daemon, so pipelined reloads pile up in flight:
    # past max_inflight (4) velod stops reading until replies go out, and drops nothing.
    sock.sendall(b"".join(protocol.encode_request(i, "config.reload") for i in range(40)))
    msgs = read_messages(sock, 40)
    assert sorted(m[1] for m in msgs) == list(range(40))
    assert all(m[0] == 1 and m[2] is None and m[3]["applied"] for m in msgs)
    sock.sendall(protocol.encode_request(99, "system.ping"))
    assert read_messages(sock)[0][3]["pong"]  # still connected
    still_serving(limited)


def test_too_many_connections_are_refused_but_existing_ones_keep_working(limited):
    held = [raw_connect(limited.socket) for _ in range(16)]
    for s in held:  # make sure each one is accepted before the next test connection
        s.sendall(protocol.encode_request(1, "system.ping"))
        assert read_messages(s)[0][3]["pong"]
    extra = raw_connect(limited.socket)
    (msg,) = read_messages(extra)
    assert msg[2][0]["code"] == "busy" and "too many connections" in msg[2][0]["message"]
    assert_closed(extra)
    held[0].sendall(protocol.encode_request(2, "system.ping"))
    assert read_messages(held[0])[0][3]["pong"]
    for s in held:
        s.close()
    time.sleep(0.3)
    still_serving(limited)


def test_hundreds_of_abusive_clients_leave_memory_bounded(velod_factory):
    # All from one uid here: the per-uid cap is raised so that the 60 get in.
    daemon = velod_factory({"control": {"max_connections": 64, "max_connections_per_uid": 64,
                                        "idle_timeout": "2s"}})
    proc = psutil.Process(daemon.proc.pid)
    still_serving(daemon)
    before = proc.memory_info().rss
    for round_ in range(5):
        socks = []
        for i in range(60):
            s = raw_connect(daemon.socket)
            kind = (i + round_) % 4
            if kind == 0:
                s.sendall(b"\xc1" * 100)
            elif kind == 1:
                s.sendall(b"\xdb\xff\xff\xff\xf0" + b"y" * 60_000)  # a 4 GiB promise
            elif kind == 2:
                s.sendall(protocol.encode_request(1, "system.status"))
            socks.append(s)
        # a well-behaved client is served throughout
        still_serving(daemon)
        for s in socks:
            s.close()
        # the next round's 60 fit only once velod has seen these hang up
        wait_for(lambda: daemon.call("system.status")["control"]["connections"] <= 1,
                 what="the abusive connections to be closed")
    time.sleep(0.5)
    still_serving(daemon)
    growth = proc.memory_info().rss - before
    assert growth < 40 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"


def test_a_reader_that_never_reads_its_events_is_dropped(velod_factory):
    daemon = velod_factory({"control": {"max_message_size": "1KiB", "max_inflight": 4096}})
    slow = Client.connect(str(daemon.socket))
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.subscribe(["*"])
    driver = raw_connect(daemon.socket)
    dropped = False
    for _batch in range(10):  # each reload publishes an event the slow client never reads
        driver.sendall(b"".join(protocol.encode_request(i, "config.reload") for i in range(500)))
        replies = read_messages(driver, 500)
        assert all(r[2] is None for r in replies), replies[:3]
        if daemon.call("system.status")["control"]["connections"] == 2:
            dropped = True  # only the driver and the status caller are left
            break
    assert dropped, "a subscriber that never reads was not disconnected"
    assert "does not read its replies" in daemon.log_text(), daemon.log_text()[-3000:]
    still_serving(daemon)
    slow.close()
    driver.close()
