"""Config validation: every key has a type and a range, and errors name path, value, reason."""

from pathlib import Path

import pytest

from tools.gen_config import TARGET, render
from velod.config import (
    Config,
    ConfigError,
    MemoryAmount,
    describe,
    load_config,
    parse_config,
    to_plain,
)

GOOD_VALUES = {
    "log.level": "debug",
    "control.socket": "/tmp/x.sock",
    "control.admin_group": "wheel",
    "control.max_message_size": "2MiB",
    "control.max_connections": 32,
    "control.max_connections_per_uid": 4,
    "control.admin_reserved_connections": 2,
    "control.idle_timeout": "5s",
    "control.message_timeout": "3s",
    "control.max_inflight": 4,
    "hardware.enabled": False,
    "hardware.interval": "1s",
    "hardware.timeout": "3s",
    "hardware.nvml": False,
    "hardware.sysfs_root": "/tmp/sys",
    "hardware.vram_change_threshold": "1GiB",
    "hardware.vram_change_percent": 5,
    "hardware.ram_available_threshold": "4GiB",
    "hardware.history_size": 10,
    "ollama.url": "http://127.0.0.1:11434",
    "ollama.service": "ollama.service",
    "ollama.systemd_dir": "/tmp/systemd",
    "ollama.dropin": "60-velod.conf",
    "ollama.systemctl": "/bin/systemctl",
    "ollama.request_timeout": "5s",
    "ollama.enabled": False,
    "llama_server": [{"url": "http://127.0.0.1:8080", "unit": "llama.service",
                      "pin": {"LLAMA_ARG_N_GPU_LAYERS": "all"}, "start_timeout": "5m"}],
    "tuner.enabled": False,
    "tuner.mode": "apply",
    "tuner.profile": "long-context",
    "tuner.reserve_vram": "1GiB",
    "tuner.pin": {"OLLAMA_KEEP_ALIVE": "30m"},
    "tuner.models": ["llama3.1:8b"],
    "tuner.interval": "30s",
    "tuner.settle": "0s",
    "tuner.restart_when_idle_for": "1m",
    "tuner.min_restart_interval": "1h",
    "tuner.model_variants": True,
    "tuner.variant_suffix": "-fast",
    "tuner.verify": True,
    "tuner.explore": True,
    "tuner.verify_tokens": 32,
    "tuner.verify_repeat": 5,
    "tuner.verify_tolerance": 0.1,
    "tuner.verify_timeout": "30s",
    "engine.enabled": False,
    "engine.model": "llama3.1-8b",
    "engine.geometry": {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 64,
                        "max_context": 1024},
    "engine.dtype": "float32",
    "engine.device": "cpu",
    "engine.kv_cache": "0.5",
    "engine.block_size": 32,
    "engine.max_batch_size": 8,
    "engine.max_tokens_per_step": 512,
    "engine.max_waiting": 10,
    "engine.idle_release": "1m",
    "http.listen": "127.0.0.1:11435",
    "http.api_key_file": "/etc/velod/api-key",
    "http.max_body_size": "1MiB",
    "http.max_requests": 32,
    "http.request_timeout": "2m",
    "http.retry_after": "5s",
    "http.max_connections": 512,
    "http.max_connections_per_client": 64,
    "http.idle_timeout": "10s",
    "state_dir": "/tmp/state",
}

BAD_VALUES = {
    "log.level": ("loud", "must be one of"),
    "control.max_message_size": ("10", "between 1KiB and 64MiB"),
    "control.max_connections": (0, "between 1 and 4096"),
    "control.max_connections_per_uid": (0, "between 1 and 4096"),
    "control.admin_reserved_connections": (-1, "between 0 and 4095"),
    "control.message_timeout": ("100000d", "at most"),
    "control.socket": ("relative.sock", "absolute path"),
    "control.admin_group": ("no spaces", "a group name"),
    "control.idle_timeout": ("soon", "not a duration"),
    "control.max_inflight": ("4", "must be an integer"),
    "hardware.enabled": ("yes please", "true or false"),
    "hardware.interval": ("10ms", "at least 100ms"),
    "hardware.vram_change_percent": (150, "between 0 and 100"),
    "hardware.history_size": (10**20, "between 1 and 100000"),
    "hardware.sysfs_root": ("sys", "absolute path"),
    "ollama.url": ("ftp://x", "http:// or https://"),
    "ollama.service": ("ollama", "a unit name"),
    "ollama.systemd_dir": ("/etc/../tmp", "must not contain '..'"),
    "ollama.dropin": ("../evil.conf", "plain file name ending in .conf"),
    "ollama.systemctl": ("bin/systemctl", "absolute path"),
    "ollama.request_timeout": (float("inf"), "at most"),
    "tuner.interval": (float("inf"), "at most 366d"),
    "tuner.reserve_vram": (2**60, "at most 1024TiB"),
    "tuner.verify_tolerance": (float("-inf"), "finite"),
    "tuner.mode": ("aply", "did you mean 'apply'"),
    "tuner.pin": (["OLLAMA_KEEP_ALIVE"], "must be a map"),
    "tuner.models": ("llama3", "must be a list"),
    "tuner.variant_suffix": ("", "not empty"),
    "engine.kv_cache": ("1.5", "fraction of free memory"),
    "engine.block_size": (12, "8, 16 or 32"),
    "engine.geometry": ("big", "must be a map"),
    "http.listen": ("localhost", "HOST:PORT"),
    "http.max_body_size": ("1", "between 1KiB and 256MiB"),
    "http.max_connections": (0, "between 1 and 16384"),
    "state_dir": (3, "must be a string"),
    "llama_server": ({"url": "http://127.0.0.1:8080"}, "must be a list"),
}


def test_llama_servers_are_a_list_of_maps_with_unique_plain_names():
    config = parse_config({"llama_server": [{"url": "http://127.0.0.1:8080"},
                                            {"url": "http://127.0.0.1:8081", "name": "big"},
                                            {"url": ""}]})
    assert [s.unit for s in config.llama_server] == ["llama-server.service"] * 3
    with pytest.raises(ConfigError, match=r"llama_server\[0\].nmae: unknown key; did you mean "
                       "'name'"):
        parse_config({"llama_server": [{"url": "http://c", "nmae": "x"}]})
    with pytest.raises(ConfigError, match=r"llama_server\[0\].url: must be an http:// or "
                       "https:// address"):
        parse_config({"llama_server": [{"url": "127.0.0.1:8080"}]})
    with pytest.raises(ConfigError) as err:
        parse_config({"llama_server": [{"url": "http://a", "name": "big"},
                                       {"url": "http://b", "name": "big"}, {"url": "http://c"},
                                       {"url": "http://d", "name": "ollama"},
                                       {"url": "http://e", "pin": {"n_ctx": "1"}}]})
    text = str(err.value)
    assert "llama_server[1].name: another llama_server has this name" in text
    assert "llama_server[3].name" in text and "not 'ollama'" in text
    assert "llama_server[4].pin.n_ctx" in text


def nested(path: str, value: object) -> dict:
    out: dict = {}
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def test_every_key_is_covered_by_these_tests():
    keys = {path for path, _default, _doc in describe()}
    assert set(GOOD_VALUES) == keys


@pytest.mark.parametrize(("path", "value"), sorted(GOOD_VALUES.items()))
def test_each_key_accepts_a_good_value(path, value):
    raw = nested(path, value)
    if path == "engine.geometry":
        raw["engine"]["model"] = "custom"
    config = parse_config(raw)
    section, _, key = path.partition(".")
    got = getattr(getattr(config, section), key) if key else getattr(config, section)
    assert got is not None


@pytest.mark.parametrize(("path", "bad"), sorted(BAD_VALUES.items()))
def test_each_bad_value_is_refused_with_path_value_and_reason(path, bad):
    value, reason = bad
    with pytest.raises(ConfigError) as err:
        parse_config(nested(path, value))
    (issue,) = err.value.issues
    assert issue.path == path
    assert issue.value == value
    assert reason in issue.reason


def test_unknown_keys_are_errors_with_a_did_you_mean():
    with pytest.raises(ConfigError) as err:
        parse_config({"tuner": {"mod": "apply"}, "hardwre": {}})
    paths = {i.path: i.reason for i in err.value.issues}
    assert "did you mean 'mode'" in paths["tuner.mod"]
    assert "did you mean 'hardware'" in paths["hardwre"]


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        parse_config({"log": {"level": 1}, "engine": {"block_size": 3, "max_batch_size": 0}})
    assert len(err.value.issues) == 3


def test_cross_field_rules():
    with pytest.raises(ConfigError, match=r"max_tokens_per_step: must be >= max_batch_size"):
        parse_config({"engine": {"max_batch_size": 64, "max_tokens_per_step": 32}})
    with pytest.raises(ConfigError, match=r"required when engine\.model is .custom."):
        parse_config({"engine": {"model": "custom"}})
    with pytest.raises(ConfigError, match="must divide"):
        parse_config({"engine": {"model": "custom", "geometry": {"heads": 12, "kv_heads": 5}}})
    with pytest.raises(ConfigError, match=r"did you mean 'llama3\.1-8b'"):
        parse_config({"engine": {"model": "llama3.1-8"}})
    with pytest.raises(ConfigError, match="environment variable name"):
        parse_config({"tuner": {"pin": {"keep alive": "5m"}}})


def test_memory_amount_is_bytes_or_a_fraction():
    assert parse_config({"engine": {"kv_cache": "4GiB"}}).engine.kv_cache == MemoryAmount(
        bytes=4 * 2**30)
    amount = parse_config({"engine": {"kv_cache": 0.5}}).engine.kv_cache
    assert amount == MemoryAmount(fraction=0.5)
    assert amount.resolve(10_000) == 5_000


def test_pinned_values_become_strings_like_environment_values():
    config = parse_config({"tuner": {"pin": {"OLLAMA_NUM_PARALLEL": 2,
                                             "OLLAMA_FLASH_ATTENTION": True}}})
    assert config.tuner.pin == {"OLLAMA_NUM_PARALLEL": "2", "OLLAMA_FLASH_ATTENTION": "true"}


def test_top_level_must_be_a_map_and_empty_means_defaults():
    assert parse_config(None) == Config()
    with pytest.raises(ConfigError, match="map of sections"):
        parse_config(["log"])


def test_missing_file_means_defaults_and_yaml_errors_have_a_line(tmp_path: Path):
    assert load_config(tmp_path / "absent.yaml") == Config()
    broken = tmp_path / "broken.yaml"
    broken.write_text("log:\n  level: [info\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(broken)


def test_plain_form_round_trips_through_the_parser():
    config = parse_config({key.split(".")[0]: {} for key in GOOD_VALUES if "." in key})
    assert parse_config(to_plain(config)) == config
    custom = parse_config({"engine": {"kv_cache": "0.25", "idle_release": "90s"}})
    assert parse_config(to_plain(custom)) == custom


def test_shipped_config_file_equals_the_built_in_defaults_and_is_current():
    assert load_config(TARGET) == Config()
    assert TARGET.read_text() == render(), "run tools/gen_config.py"
