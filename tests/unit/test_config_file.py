"""The config file's states (loaded, missing, blank) and config checks run off the loop in
lanes that bound their time and their queue."""

import asyncio
import threading
import time
from pathlib import Path

import pytest

from velod.config import Config, ConfigError, validate_text
from velod.config_file import CheckLanes, LaneBusy, read_file

pytestmark = pytest.mark.asyncio


async def test_a_file_is_loaded_missing_or_blank(tmp_path: Path):
    path = tmp_path / "velod.yaml"
    assert read_file(path).state == "missing"
    for blank in ("", "# only comments\n", "null\n"):
        path.write_text(blank)
        assert read_file(path).state == "blank" and read_file(path).config == Config()
    path.write_text("{}\n")
    assert read_file(path).state == "loaded" and read_file(path).config == Config()
    path.write_text("tuner: {profile: throughput}\n")
    assert read_file(path).config.tuner.profile == "throughput"
    path.write_text("tuner: {profile: fast}\n")
    with pytest.raises(ConfigError):
        read_file(path)


async def test_validating_blank_text_is_valid_with_a_note():
    result = validate_text("# nothing\n", "x.yaml")
    assert result["valid"] and "write '{}'" in result["notes"][0]
    assert validate_text("{}", "x.yaml") == {"valid": True, "errors": [], "notes": []}


async def test_a_check_over_the_time_limit_fails_and_keeps_its_lane_until_it_ends():
    lanes = CheckLanes(timeout=0.2)
    release = threading.Event()
    with pytest.raises(TimeoutError):
        await lanes.run("others", release.wait, 5)
    started = time.monotonic()
    follow = asyncio.ensure_future(lanes.run("others", lambda: "done"))
    await asyncio.sleep(0.1)
    assert not follow.done()  # the abandoned check still holds the lane
    release.set()
    assert await follow == "done"
    assert time.monotonic() - started < 1


async def test_a_full_lane_says_busy_and_other_lanes_are_not_held_up():
    lanes = CheckLanes(timeout=2.0, max_waiting=2)
    release = threading.Event()
    running = asyncio.ensure_future(lanes.run("others", release.wait, 5))
    await asyncio.sleep(0.05)
    waiting = [asyncio.ensure_future(lanes.run("others", lambda: 1)) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(LaneBusy, match="2 config checks are already waiting"):
        await lanes.run("others", lambda: 1)
    assert await lanes.run("admin", lambda: "admin first") == "admin first"
    release.set()
    assert await running is True
    assert [await w for w in waiting] == [1, 1]
