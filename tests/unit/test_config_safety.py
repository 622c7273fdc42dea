"""What validates must run: every key is bounded, and no input makes an error message huge."""

import os
import threading
import typing
from pathlib import Path

import pytest

from tests.unit.test_config import nested
from tests.unit.test_safe_yaml import alias_bomb
from velod import config as config_module
from velod import safe_yaml
from velod.config import (
    MAX_EXCERPT,
    MAX_MESSAGE,
    Config,
    ConfigError,
    Duration,
    MemoryAmount,
    Size,
    describe,
    load_config,
    parse_config,
    to_plain,
)


def key_types() -> dict[str, typing.Any]:
    """Every key path with its annotated type."""
    out = {}
    for path, _default, _doc in describe():
        cls: typing.Any = Config
        *sections, key = path.split(".")
        for section in sections:
            cls = typing.get_type_hints(cls)[section]
            if typing.get_origin(cls) is not None:  # Optional[GeometryConfig]
                cls = next(a for a in typing.get_args(cls) if a is not type(None))
        out[path] = typing.get_type_hints(cls)[key]
    return out


def with_custom_model(raw: dict) -> dict:
    if "geometry" in raw.get("engine", {}):
        raw["engine"]["model"] = "custom"
    return raw


HUGE = {int: 10**20, float: 1e300, Duration: "100000d", Size: "2000000TiB",
        MemoryAmount: "2000000TiB"}
NUMERIC = sorted(path for path, tp in key_types().items() if tp in HUGE)
STRINGS = sorted(path for path, tp in key_types().items() if tp is str)


def test_the_numeric_and_string_keys_were_found():
    assert "hardware.history_size" in NUMERIC and "tuner.interval" in NUMERIC
    assert "ollama.dropin" in STRINGS and "state_dir" in STRINGS


@pytest.mark.parametrize("path", NUMERIC)
def test_every_numeric_key_has_an_upper_bound(path):
    huge = HUGE[key_types()[path]]
    with pytest.raises(ConfigError) as err:
        parse_config(with_custom_model(nested(path, huge)))
    assert [i.path for i in err.value.issues] == [path]


@pytest.mark.parametrize("path", NUMERIC)
def test_no_numeric_key_takes_infinity_or_nan(path):
    for value in (float("inf"), float("nan"), ".inf"):
        with pytest.raises(ConfigError):
            parse_config(with_custom_model(nested(path, value)))


@pytest.mark.parametrize("path", STRINGS)
def test_no_string_key_takes_control_characters_or_megabytes(path):
    for value in ("a\nb", "x" * 5000):
        with pytest.raises(ConfigError) as err:
            parse_config(nested(path, value))
        assert [i.path for i in err.value.issues] == [path]


def test_pinned_values_cannot_inject_lines_into_the_drop_in():
    with pytest.raises(ConfigError, match="control characters"):
        parse_config({"tuner": {"pin": {"OLLAMA_KEEP_ALIVE": "5m\nExecStart=/bin/evil"}}})


@pytest.mark.parametrize("url", ["", "http://127.0.0.1:11434", "https://gpu-box", "0.0.0.0:11434",
                                 "localhost", "http://[::1]:11434/ollama"])
def test_ollama_addresses_ollama_itself_accepts_validate(url):
    assert parse_config({"ollama": {"url": url}}).ollama.url == url


@pytest.mark.parametrize("url", ["ftp://x", "http://", "http://h:0", "http://h:99999",
                                 "http://h:port", "http://a b"])
def test_ollama_addresses_velod_could_not_use_are_refused(url):
    with pytest.raises(ConfigError, match=r"ollama\.url"):
        parse_config({"ollama": {"url": url}})


def test_the_admin_reserve_must_leave_room_for_everyone_else():
    with pytest.raises(ConfigError, match=r"less than control\.max_connections"):
        parse_config({"control": {"max_connections": 8, "admin_reserved_connections": 8}})


def test_what_validates_can_be_shown():
    # config show used to fail on `.inf`; now every valid config has a finite plain form.
    config = parse_config({"tuner": {"interval": "366d"}, "hardware": {"history_size": 100000}})
    assert to_plain(config)["tuner"]["interval"] == "366d"


def test_error_messages_quote_at_most_an_excerpt_of_a_value():
    with pytest.raises(ConfigError) as err:
        parse_config({"tuner": {"models": "m" * 1_000_000}})
    (issue,) = err.value.issues
    assert len(str(issue)) < MAX_EXCERPT + 100
    with pytest.raises(ConfigError) as err:
        parse_config({"k" * 100_000: list(range(100_000))})
    assert len(str(err.value)) < 600


def test_one_error_message_stays_under_4_kib_however_many_problems():
    raw = {f"unknown{i}": "v" * 150 for i in range(5000)}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert len(err.value.issues) == 5000
    assert len(str(err.value)) <= MAX_MESSAGE
    lines = err.value.lines()
    assert len(lines) == 21 and lines[-1] == "... and 4980 more problems"


def test_an_alias_bomb_file_is_refused_with_a_short_message(tmp_path: Path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "expands to more than" in str(err.value) and len(str(err.value)) < 400


def test_duplicate_sections_in_a_file_are_refused(tmp_path: Path):
    path = tmp_path / "dup.yaml"
    path.write_text("tuner:\n  mode: apply\nlog: {level: info}\ntuner:\n  profile: throughput\n")
    with pytest.raises(ConfigError, match="duplicate key 'tuner' at lines 1 and 4"):
        load_config(path)


def test_a_file_over_the_size_cap_is_refused_after_reading_only_the_cap(tmp_path: Path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * 300_000 + "\n")
    with pytest.raises(ConfigError, match=f"larger than {safe_yaml.MAX_BYTES} bytes"):
        load_config(path)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(Path("/dev/zero"))


def test_a_fifo_at_the_config_path_does_not_hang_the_reader(tmp_path: Path):
    fifo = tmp_path / "velod.yaml"
    os.mkfifo(fifo)
    outcome: list[object] = []

    def read() -> None:
        try:
            load_config(fifo)
        except ConfigError as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    assert outcome and "not a regular file" in str(outcome[0])


def test_a_dangling_symlink_reads_as_no_file(tmp_path: Path):
    link = tmp_path / "velod.yaml"
    link.symlink_to(tmp_path / "gone.yaml")
    assert config_module.read_config_text(link) is None
