"""The control socket under abuse: what a hostile local user costs everyone else.

Runs each case against one real velod it starts itself (default limits, local socket only,
bounded in count and time: about 40 s in all, never more than --budget seconds) while a
well-behaved root client connects afresh and pings every 20 ms, like `velodctl ping`:

- bomb: an alias bomb (7 levels of 9) sent to config.validate over and over, and written
  as the config file;
- big_document: the largest text config.validate parses (57 KB, 19,000 values), over
  and over;
- lockout: another uid opens as many connections as it can and holds them;
- slowloris: another uid trickles requests a byte at a time on every connection it gets;
- pipelining: 10,000 pings sent at once on one connection;
- slow_readers: four other uids fill the table with connections that send requests and
  never read the replies.

Prints JSON: per case the ping latency during it (p50, p99, max), velod's RSS before, peak
and after (after the attackers have gone), whether root could always connect, and what the
attacker achieved. The attacks from another uid need root (fork + setuid); without root they
run as this user and say so.
usage: sudo .venv/bin/python bench/abuse.py [--budget 60]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
from harness import BenchDaemon, machine

from tests.integration.other_uid import NOBODY, as_user, open_connections
from tests.unit.test_safe_yaml import alias_bomb
from velod.control import protocol
from velod.control.client import Client, DaemonUnreachable, RemoteError
from velod.engine.runtime.metrics import percentile

MiB = 1024**2
ATTACKERS = (NOBODY, 65533, 65532, 65531)
_kept: list[socket.socket] = []  # an attacking child's connections, held until it exits


class Observer:
    """Root's view during a case: fresh-connection pings every 20 ms, and velod's RSS."""

    def __init__(self, daemon: BenchDaemon) -> None:
        self.path = str(daemon.socket)
        assert daemon.proc is not None
        self.proc = psutil.Process(daemon.proc.pid)
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.rss: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rss.append(self.proc.memory_info().rss)
            start = time.perf_counter()
            try:
                with Client.connect(self.path, timeout=10) as client:
                    client.call("system.ping")
                self.latencies.append(time.perf_counter() - start)
            except (DaemonUnreachable, RemoteError, OSError) as exc:
                self.failures.append(str(exc))
            time.sleep(0.02)

    def __enter__(self) -> Observer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def summary(self) -> dict[str, Any]:
        ms = [x * 1000 for x in self.latencies]
        return {"pings": len(ms), "ping_p50_ms": round(statistics.median(ms), 2) if ms else None,
                "ping_p99_ms": round(percentile(ms, 99), 2) if ms else None,
                "ping_max_ms": round(max(ms), 2) if ms else None,
                "root_could_connect": not self.failures,
                "root_failures": self.failures[:3]}


def settle_rss(proc: psutil.Process, seconds: float = 1.0) -> int:
    time.sleep(seconds)
    return proc.memory_info().rss


def run_case(daemon: BenchDaemon, name: str, attack: Callable[[], dict[str, Any]]
             ) -> dict[str, Any]:
    proc = psutil.Process(daemon.proc.pid)  # type: ignore[union-attr]
    before = settle_rss(proc, 0.5)
    started = time.monotonic()
    with Observer(daemon) as observer:
        outcome = attack()
    after = settle_rss(proc)
    peak = max([before, after, *observer.rss])
    return {"case": name, "seconds": round(time.monotonic() - started, 1), **outcome,
            **observer.summary(), "rss_before_mib": round(before / MiB, 1),
            "rss_peak_mib": round(peak / MiB, 1), "rss_after_mib": round(after / MiB, 1)}


@contextlib.contextmanager
def attacker(uid: int, fn: Callable[..., Any], *args: Any) -> Iterator[Any]:
    """``fn(*args)`` as ``uid`` when we are root, else as ourselves in a child."""
    with as_user(uid if os.geteuid() == 0 else os.geteuid(), fn, *args) as result:
        yield result


# ------------------------------------------------------------------------------- cases


def bomb(daemon: BenchDaemon, seconds: float = 4.0) -> dict[str, Any]:
    """Four clients send the bomb to config.validate for ``seconds``; then it is the file."""
    text = alias_bomb()
    counts = {"calls": 0, "refused": 0, "busy": 0, "longest_error": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def flood() -> None:
        with daemon.client() as client:
            while time.monotonic() < deadline:
                try:
                    result = client.call("config.validate", {"text": text})
                except RemoteError as exc:  # the check lane is full: busy, try again
                    with lock:
                        counts["busy"] += exc.code == "busy"
                    continue
                with lock:
                    counts["calls"] += 1
                    counts["refused"] += not result["valid"]
                    counts["longest_error"] = max(counts["longest_error"],
                                                  *(len(e) for e in result["errors"]))

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    daemon.config_path.write_text(text)  # the watcher reloads it, and must refuse it too
    with daemon.client() as client:
        reload = client.call("config.reload", timeout=60)
    return {"bomb_bytes": len(text), "validate_calls": counts["calls"],
            "validate_refused": counts["refused"], "validate_busy": counts["busy"],
            "longest_error_chars": counts["longest_error"],
            "file_reload_refused": not reload["applied"],
            "file_reload_error": reload["error"][:120]}


def big_document(daemon: BenchDaemon, seconds: float = 4.0) -> dict[str, Any]:
    """About the largest text config.validate parses: 57 KB, 19,000 values, no aliases."""
    text = "k: [" + ", ".join(["1"] * 19_000) + "]\n"
    took = []
    deadline = time.monotonic() + seconds
    with daemon.client() as client:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            result = client.call("config.validate", {"text": text})
            took.append(time.perf_counter() - start)
    return {"text_bytes": len(text), "validate_calls": len(took),
            "validate_median_ms": round(statistics.median(took) * 1000, 1),
            "refused": not result["valid"]}


def lockout(daemon: BenchDaemon) -> dict[str, Any]:
    with attacker(NOBODY, open_connections, str(daemon.socket), 100) as got:
        time.sleep(2.0)  # hold them while root keeps pinging
        with daemon.client() as client:
            users = client.call("system.status")["control"]["users"]
    return {"attacker_uid": got["uid"], "attacker_tried": 100,
            "attacker_got": got["accepted"], "attacker_refusal": (got["refused"] or [""])[0],
            "distinct_uids_seen": users}


def trickle(path: str, count: int, seconds: float) -> dict[str, Any]:
    """Open ``count`` connections and send each a request a byte at a time, 4 bytes/s."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        socks.append(sock)
    request = protocol.encode_request(1, "config.validate", {"text": "x" * 500})
    alive = list(socks)
    deadline = time.monotonic() + seconds
    sent = 0
    first_drop = None
    start = time.monotonic()
    while alive and time.monotonic() < deadline:
        for sock in list(alive):
            try:
                sock.send(request[sent % len(request):sent % len(request) + 1])
            except OSError:
                alive.remove(sock)
                first_drop = first_drop or time.monotonic() - start
        sent += 1
        time.sleep(0.25)
    return {"uid": os.getuid(), "connections": count, "still_open": len(alive),
            "first_dropped_after_s": round(first_drop, 1) if first_drop else None}


def slowloris(daemon: BenchDaemon) -> dict[str, Any]:
    with attacker(NOBODY, trickle, str(daemon.socket), 16, 8.0) as got:
        pass
    return {"attacker_uid": got["uid"], "trickling_connections": got["connections"],
            "open_after_8s": got["still_open"],
            "first_dropped_after_s": got["first_dropped_after_s"]}


def pipelining(daemon: BenchDaemon) -> dict[str, Any]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.socket))
    count = 10_000
    payload = b"".join(protocol.encode_request(i, "system.ping") for i in range(count))
    start = time.perf_counter()
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    import msgpack

    unpacker = msgpack.Unpacker(raw=False)
    replies = 0
    while replies < count:
        data = sock.recv(65536)
        if not data:
            break
        unpacker.feed(data)
        replies += sum(1 for _ in unpacker)
    elapsed = time.perf_counter() - start
    sender.join()
    sock.close()
    return {"sent": count, "replies": replies, "transfer_s": round(elapsed, 2),
            "replies_per_s": round(replies / elapsed)}


def never_read(path: str, count: int, seconds: float) -> dict[str, Any]:
    """Open up to ``count`` connections and push status requests, never reading replies."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(path)
        sock.setblocking(False)
        socks.append(sock)
    request = protocol.encode_request(1, "system.status") * 200
    pushed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for sock in socks:
            with contextlib.suppress(OSError):
                pushed += sock.send(request)
        time.sleep(0.05)
    _kept.extend(socks)  # open until the child is released, like a stuck client
    return {"uid": os.getuid(), "connections": len(socks), "bytes_pushed": pushed}


def slow_readers(daemon: BenchDaemon) -> dict[str, Any]:
    """Four uids at once, 14 connections each: together they fill the 56 places non-admins
    may use."""
    path = str(daemon.socket)
    got: list[dict[str, Any]] = []
    release = threading.Event()

    def one(uid: int) -> None:
        with attacker(uid, never_read, path, 14, 4.0) as result:
            got.append(result)
            release.wait(30)

    threads = [threading.Thread(target=one, args=(uid,)) for uid in ATTACKERS]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while len(got) < len(threads) and time.monotonic() < deadline:
        time.sleep(0.05)
    with daemon.client() as client:
        control = client.call("system.status")["control"]
    release.set()
    for thread in threads:
        thread.join(30)
    return {"attacker_uids": sorted({g["uid"] for g in got}),
            "connections": sum(g["connections"] for g in got),
            "request_bytes_pushed": sum(g["bytes_pushed"] for g in got),
            "unsent_reply_bytes_while_held": control["unsent_bytes"]}


CASES = {"bomb": bomb, "big_document": big_document, "lockout": lockout,
         "slowloris": slowloris, "pipelining": pipelining, "slow_readers": slow_readers}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=60.0, help="stop starting cases after "
                        "this many seconds")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget
    results = []
    # A config with a short message timeout so that the slowloris case fits the budget.
    bench = BenchDaemon({"control": {"message_timeout": "3s"}})
    bench.tmp.chmod(0o755)  # the attacking uids must reach the socket
    with bench as daemon:
        with Observer(daemon) as idle:
            time.sleep(2.0)
        results.append({"case": "idle", **idle.summary(),
                        "rss_mib": round(idle.proc.memory_info().rss / MiB, 1)})
        for name in args.cases.split(","):
            if time.monotonic() > deadline - 12:
                results.append({"case": name, "skipped": "out of time budget"})
                continue
            results.append(run_case(daemon, name, lambda n=name: CASES[n](daemon)))
            assert daemon.proc is not None and daemon.proc.poll() is None, "velod died"
    print(json.dumps({"benchmark": "control socket under abuse", "as_root": os.geteuid() == 0,
                      "limits": {"max_connections": 64, "max_connections_per_uid": 16,
                                 "admin_reserved_connections": 8, "message_timeout_s": 3,
                                 "max_inflight": 16},
                      "results": results, "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
