import pytest

from velod.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("30s", 30), ("10m", 600), ("1h", 3600), ("1d", 86400), ("1m30s", 90),
    ("1.5s", 1.5), (" 2s ", 2), (5, 5.0), (0.25, 0.25), ("0s", 0),
])
def test_parse_duration_accepts_the_documented_forms(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5", "fast", "5 sec", "-1s", "1s2", "ms", True, -3])
def test_parse_duration_rejects_everything_else(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(("text", "n"), [
    ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("1GB", 10**9), ("1.5GiB", 3 * 2**29),
    ("4096", 4096), (4096, 4096), ("1kib", 1024), ("10 MB", 10**7), ("1TiB", 2**40),
])
def test_parse_size_accepts_binary_and_decimal_units(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["2XB", "GiB", "-1GiB", 1.5, True, -1, "1.2.3GB"])
def test_parse_size_rejects_everything_else(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_formatters_round_trip_common_values():
    assert format_duration(600) == "10m"
    assert format_duration(0.25) == "250ms"
    assert format_duration(90) == "1m30s"
    assert parse_duration(format_duration(5400)) == 5400
    assert format_size(3 * 2**30) == "3.0 GiB"
    assert format_size(None) == "-"
