"""An Ollama outage reaches the journal (a warning, then an info line when it recovers) and
systemd's STATUS=, so `systemctl status velod` shows it, not only `velodctl status`."""

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.fakes.fake_ollama import free_port
from tests.integration.conftest import REPO, velod_command, wait_for
from tests.integration.test_systemd import NotifyListener

FAKE_OLLAMA = REPO / "tests" / "fakes" / "fake_ollama.py"


def statuses_until(listener: NotifyListener, text: str, timeout: float = 20) -> list[str]:
    """STATUS= values received until one contains ``text``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = listener.next(status_updates=True)
        if "STATUS" in msg:
            seen.append(msg["STATUS"])
            if text in msg["STATUS"]:
                return seen
    raise AssertionError(f"no STATUS with {text!r} within {timeout}s: {seen}")


def start_fake_ollama(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(FAKE_OLLAMA), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def outage_config(port: int, tmp: Path) -> dict:
    return {"state_dir": str(tmp / "state"), "tuner": {"interval": "300ms"},
            "ollama": {"url": f"http://127.0.0.1:{port}", "request_timeout": "1s",
                       "systemd_dir": str(tmp / "systemd")}}


def test_an_ollama_outage_and_its_end_reach_systemd_status(velod_factory, tmp_path):
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    port = free_port()
    velod_factory(outage_config(port, tmp_path), env={"NOTIFY_SOCKET": listener.address})
    degraded = statuses_until(listener, "tuner degraded")
    assert "Ollama unreachable" in degraded[-1]
    ollama = start_fake_ollama(port)
    try:
        recovered = statuses_until(listener, "tuner running")
        assert "degraded" not in recovered[-1]
    finally:
        ollama.terminate()
        ollama.wait(10)
        listener.sock.close()


def test_state_changes_reach_the_journal_once_each_with_their_priority(tmp_path):
    port = free_port()
    config = tmp_path / "velod.yaml"
    config.write_text(yaml.safe_dump(outage_config(port, tmp_path)))
    journal = tmp_path / "journal.log"
    with open(journal, "wb") as stderr:
        st = os.fstat(stderr.fileno())
        # velod writes journald's <N> priority prefixes when stderr is $JOURNAL_STREAM's file
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET",
                                                                        "WATCHDOG_"))}
        daemon = subprocess.Popen(
            [*velod_command(), "--config", str(config), "--socket", str(tmp_path / "s.sock")],
            stderr=stderr, stdout=subprocess.DEVNULL,
            env={**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    ollama = None
    try:
        wait_for(lambda: "<4>velod.tuner: degraded: Ollama unreachable" in journal.read_text(),
                 what="the degraded warning")
        time.sleep(1.5)  # several more failed polls: still one line
        ollama = start_fake_ollama(port)
        wait_for(lambda: "<6>velod.tuner: recovered: running again (was degraded)"
                 in journal.read_text(), what="the recovery line")
    finally:
        if ollama is not None:
            ollama.terminate()
            ollama.wait(10)
        daemon.terminate()
        daemon.wait(10)
    assert journal.read_text().count("velod.tuner: degraded:") == 1
