"""YAML from anyone: alias bombs, huge or deep documents and duplicate keys are refused cheaply."""

import time

import pytest
import yaml

from velod import safe_yaml
from velod.safe_yaml import MAX_VALUES, YamlRefused


def alias_bomb(levels: int = 7, width: int = 9) -> str:
    """The classic "billion laughs" in YAML: each level repeats the previous one ``width`` times."""
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * width)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_before_it_expands():
    text = alias_bomb()
    assert len(text) < 400
    start = time.perf_counter()
    with pytest.raises(YamlRefused, match=f"expands to more than {MAX_VALUES} values") as err:
        safe_yaml.load(text)
    assert time.perf_counter() - start < 0.5
    assert len(str(err.value)) < 300


def test_a_few_aliases_within_the_budget_are_fine():
    data = safe_yaml.load("base: &b {level: debug}\nlog: *b\nother: *b\n")
    assert data == {"base": {"level": "debug"}, "log": {"level": "debug"},
                    "other": {"level": "debug"}}


def test_merge_keys_may_be_overridden_by_explicit_keys():
    data = safe_yaml.load("base: &b {a: 1, b: 2}\nx:\n  <<: *b\n  b: 3\n")
    assert data["x"] == {"a": 1, "b": 3}


def test_a_self_referencing_alias_is_refused():
    with pytest.raises(YamlRefused, match="refers to the node that contains it"):
        safe_yaml.load("a: &a [1, *a]\n")


def test_duplicate_keys_name_both_lines():
    text = "tuner:\n  mode: apply\nlog:\n  level: info\ntuner:\n  profile: throughput\n"
    with pytest.raises(YamlRefused) as err:
        safe_yaml.load(text)
    assert "duplicate key 'tuner' at lines 1 and 5" in str(err.value)
    assert err.value.line == 5


def test_duplicate_keys_are_found_at_any_depth():
    with pytest.raises(YamlRefused, match="duplicate key 'mode' at lines 2 and 3"):
        safe_yaml.load("tuner:\n  mode: apply\n  mode: observe\n")


def test_keys_that_only_look_alike_are_not_duplicates():
    assert safe_yaml.load("a: {1: x, '1': y}\n") == {"a": {1: "x", "1": "y"}}


def test_text_over_the_size_cap_is_refused_without_parsing():
    with pytest.raises(YamlRefused, match="at most 1024 are accepted"):
        safe_yaml.load("x: " + "y" * 2000, max_bytes=1024)


def test_a_document_with_too_many_values_is_refused_even_without_aliases():
    with pytest.raises(YamlRefused, match="more than 100 values"):
        safe_yaml.load("[" + ", ".join(["1"] * 200) + "]", max_values=100)


@pytest.mark.parametrize("text", ["a: " + "[" * 5000 + "]" * 5000,
                                  "a: " + "{k: " * 5000 + "1" + "}" * 5000])
def test_deep_nesting_is_a_clear_error(text):
    with pytest.raises(YamlRefused, match=r"(?i)nest"):
        safe_yaml.load(text)


def test_syntax_errors_carry_the_line():
    with pytest.raises(YamlRefused) as err:
        safe_yaml.load("log:\n  level: [info\n")
    assert err.value.line == 3 and "YAML syntax error" in str(err.value)


def test_several_documents_are_refused():
    with pytest.raises(YamlRefused, match="single document"):
        safe_yaml.load("a: 1\n---\nb: 2\n")


def test_empty_and_comment_only_text_is_none_and_braces_are_a_map():
    assert safe_yaml.load("") is None
    assert safe_yaml.load("# nothing here\n\n") is None
    assert safe_yaml.load("{}\n") == {}


def test_the_pure_python_loader_gives_the_same_answers(monkeypatch):
    monkeypatch.setattr(safe_yaml, "_Loader", yaml.SafeLoader)
    with pytest.raises(YamlRefused, match="expands to more than"):
        safe_yaml.load(alias_bomb())
    with pytest.raises(YamlRefused, match="nested too deeply"):
        safe_yaml.load("a: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(YamlRefused, match="duplicate key 'a' at lines 1 and 2"):
        safe_yaml.load("a: 1\na: 2\n")
