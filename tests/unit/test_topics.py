"""The known-topics table matches what the code publishes, so `velodctl watch` can say when a
pattern matches nothing without ever refusing a real topic."""

import re
from pathlib import Path

from velod.topics import TOPICS, unmatched

SOURCE = Path(__file__).resolve().parents[2] / "velod"
LITERAL = re.compile(r"""publish\(\s*["']([\w.]+)["']""")
CONSTANT = re.compile(r"""^EVENT\s*=\s*["']([\w.]+)["']""", re.MULTILINE)


def published_topics() -> set[str]:
    found = set()
    for path in SOURCE.rglob("*.py"):
        text = path.read_text()
        found.update(LITERAL.findall(text))
        found.update(CONSTANT.findall(text))
    return found


def test_every_topic_the_code_publishes_is_known():
    published = published_topics()
    assert {"hardware.changed", "config.reloaded", "engine.finished"} <= published
    assert published - set(TOPICS) == set()


def test_every_known_topic_is_published_somewhere():
    assert set(TOPICS) - published_topics() == set()


def test_patterns_that_match_nothing_are_named():
    assert unmatched(["*", "hardware.*", "config.reloaded"]) == []
    assert unmatched(["hardwre.*", "engine.*", "tuner"]) == ["hardwre.*", "tuner"]
