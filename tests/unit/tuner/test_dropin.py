"""velod's systemd drop-in: exact text, systemd's parsing rules, atomic writes, rollback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from velod.tuner.dropin import (
    MARKER,
    DropinDir,
    DropinError,
    atomic_write,
    parse,
    render,
    split_assignments,
)

UNIT = "ollama.service"


@pytest.fixture
def dropins(tmp_path: Path) -> DropinDir:
    return DropinDir(tmp_path, UNIT)


def test_render_marks_the_file_and_quotes_values() -> None:
    text = render({"OLLAMA_NUM_PARALLEL": "2", "OLLAMA_KEEP_ALIVE": "30m",
                   "X_ODD": 'a "b" 100% c\\d'}, UNIT)
    assert text.startswith(MARKER)
    body = text.split("[Service]\n", 1)[1]
    assert body == ('Environment="OLLAMA_KEEP_ALIVE=30m"\n'
                    'Environment="OLLAMA_NUM_PARALLEL=2"\n'
                    'Environment="X_ODD=a \\"b\\" 100%% c\\\\d"\n')


def test_render_then_parse_round_trips() -> None:
    env = {"OLLAMA_CONTEXT_LENGTH": "8192", "SPACED": "a b  c", "PCT": "50%", "Q": "'\""}
    parsed = parse(render(env, UNIT))
    assert parsed.environment == env and parsed.managed


@pytest.mark.parametrize("value", ["a\nb", "x\0"])
def test_render_refuses_values_that_would_break_the_file(value: str) -> None:
    with pytest.raises(DropinError, match="line break or NUL"):
        render({"A": value}, UNIT)


def test_render_refuses_bad_names() -> None:
    with pytest.raises(DropinError, match="not an environment variable name"):
        render({"A B": "1"}, UNIT)


def test_parse_follows_systemd_quoting() -> None:
    assert split_assignments('A=1 "B=two words" C=x\\ y \'D=q"\'') == [
        "A=1", "B=two words", "C=x y", 'D=q"']


def test_parse_reads_hand_written_files_with_continuations_and_comments() -> None:
    text = ("# my tweaks\n; also a comment\n[Unit]\nDescription=x\n\n[Service]\n"
            "Environment=OLLAMA_HOST=0.0.0.0 \\\n  OLLAMA_ORIGINS=*\n"
            "Environment=\"OLLAMA_MODELS=/srv/models\"\nExecStart=\n")
    parsed = parse(text)
    assert parsed.environment == {"OLLAMA_HOST": "0.0.0.0", "OLLAMA_ORIGINS": "*",
                                  "OLLAMA_MODELS": "/srv/models"}
    assert not parsed.managed


def test_empty_environment_resets_earlier_assignments() -> None:
    parsed = parse("[Service]\nEnvironment=A=1\nEnvironment=\nEnvironment=B=2\n")
    assert parsed.environment == {"B": "2"} and parsed.resets


@pytest.mark.parametrize(("text", "reason"), [
    ("[Service\nEnvironment=A=1\n", "not closed"),
    ("Environment=A=1\n", "before any"),
    ("[Service]\nthis is not a setting\n", "not 'Key=value'"),
    ("[Service]\nEnvironment=\"A=1\n", "unterminated"),
    ("[Service]\nEnvironment=JUSTANAME\n", "not NAME=value"),
])
def test_malformed_files_raise_with_file_and_line(text: str, reason: str) -> None:
    with pytest.raises(DropinError, match=reason) as info:
        parse(text, "/etc/x.conf")
    assert "/etc/x.conf, line" in str(info.value)


def test_write_creates_directory_and_backup_of_nothing(dropins: DropinDir) -> None:
    assert dropins.write({"OLLAMA_NUM_PARALLEL": "2"}) is True
    assert dropins.read_velod() == {"OLLAMA_NUM_PARALLEL": "2"}
    assert oct(dropins.path.stat().st_mode & 0o777) == "0o644"
    assert dropins.has_backup()
    assert dropins.write({"OLLAMA_NUM_PARALLEL": "2"}) is False  # nothing to change


def test_rollback_restores_previous_then_refuses_a_second_time(dropins: DropinDir) -> None:
    dropins.write({"OLLAMA_NUM_PARALLEL": "2"})
    dropins.write({"OLLAMA_NUM_PARALLEL": "4"})
    assert dropins.rollback() == {"OLLAMA_NUM_PARALLEL": "2"}
    assert dropins.read_velod() == {"OLLAMA_NUM_PARALLEL": "2"}
    with pytest.raises(DropinError, match="nothing to roll back"):
        dropins.rollback()


def test_rollback_of_the_first_write_removes_velods_file(dropins: DropinDir) -> None:
    dropins.write({"A": "1"})
    assert dropins.rollback() == {}
    assert not dropins.path.exists()


def test_other_files_are_never_touched(dropins: DropinDir) -> None:
    dropins.directory.mkdir(parents=True)
    mine = dropins.directory / "10-user.conf"
    mine.write_text("[Service]\nEnvironment=OLLAMA_KEEP_ALIVE=1h\n")
    broken = dropins.directory / "20-broken.conf"
    broken.write_text("garbage line\n")
    notes = dropins.directory / "README"
    notes.write_text("hello")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
              for p in (mine, broken, notes)}
    dropins.write({"OLLAMA_NUM_PARALLEL": "2"})
    dropins.write({"OLLAMA_NUM_PARALLEL": "3"})
    dropins.rollback()
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (mine, broken, notes)}
    assert after == before
    names = sorted(p.name for p in dropins.directory.iterdir())
    assert names == ["10-user.conf", "20-broken.conf", "50-velod.conf", "README"]


def test_a_same_named_file_not_written_by_velod_is_refused(dropins: DropinDir) -> None:
    dropins.directory.mkdir(parents=True)
    dropins.path.write_text("[Service]\nEnvironment=OLLAMA_NUM_PARALLEL=9\n")
    with pytest.raises(DropinError, match="not written by velod"):
        dropins.write({"OLLAMA_NUM_PARALLEL": "2"})
    assert "=9" in dropins.path.read_text()


def test_effective_environment_follows_systemd_order_and_reports_conflicts(
        dropins: DropinDir) -> None:
    dropins.unit_file.write_text("[Service]\nExecStart=/usr/bin/ollama serve\n"
                                 "Environment=\"PATH=/usr/bin\" OLLAMA_KEEP_ALIVE=5m\n")
    dropins.write({"OLLAMA_NUM_PARALLEL": "2", "OLLAMA_KEEP_ALIVE": "10m",
                   "OLLAMA_CONTEXT_LENGTH": "8192"})
    (dropins.directory / "10-early.conf").write_text(
        "[Service]\nEnvironment=OLLAMA_NUM_PARALLEL=8\n")
    (dropins.directory / "90-late.conf").write_text(
        "[Service]\nEnvironment=OLLAMA_CONTEXT_LENGTH=262144\n")
    (dropins.directory / "95-bad.conf").write_text("[Service]\nEnvironment=\"X=1\n")
    eff = dropins.effective()
    assert eff.environment == {"PATH": "/usr/bin", "OLLAMA_KEEP_ALIVE": "10m",
                               "OLLAMA_NUM_PARALLEL": "2", "OLLAMA_CONTEXT_LENGTH": "262144"}
    assert eff.sources["OLLAMA_CONTEXT_LENGTH"].endswith("90-late.conf")
    assert eff.velod["OLLAMA_CONTEXT_LENGTH"] == "8192"
    by_name = {c.name: c for c in eff.conflicts}
    assert by_name["OLLAMA_CONTEXT_LENGTH"].wins
    assert "overrides velod" in by_name["OLLAMA_CONTEXT_LENGTH"].describe()
    assert not by_name["OLLAMA_NUM_PARALLEL"].wins
    assert not by_name["OLLAMA_KEEP_ALIVE"].wins  # the unit file always comes first
    assert len(eff.errors) == 1 and "95-bad.conf" in eff.errors[0]


def test_atomic_write_leaves_no_temp_file_and_replaces_in_one_step(tmp_path: Path) -> None:
    target = tmp_path / "x.conf"
    target.write_text("old")
    inode = target.stat().st_ino
    atomic_write(target, "new")
    assert target.read_text() == "new" and target.stat().st_ino != inode
    assert os.listdir(tmp_path) == ["x.conf"]


def test_drop_in_name_must_end_in_conf(tmp_path: Path) -> None:
    with pytest.raises(DropinError, match=r"\.conf"):
        DropinDir(tmp_path, UNIT, "velod.txt")
