"""Chat prompts velod renders against llama-server's /apply-template on the real Gemma GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.assets import llama_server
from velod.engine.models.chat import ChatTemplate, load_chat_template

pytestmark = pytest.mark.real_model

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": " Hi there \n"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "Ünïcödé 日本語 😀\n\ncode:\n```\nx = 1\n```"},
     {"role": "assistant", "content": "  ok  "}, {"role": "user", "content": "<b>bold</b>"}],
    [{"role": "system", "content": "S1"}, {"role": "system", "content": "S2"},
     {"role": "user", "content": "u"}],
]

# A Gemma-style template with what real ones use: slicing, set, loop.index0, trim,
# raise_exception, bos_token, the generation prompt.
JINJA_TEMPLATE = """\
{{ bos_token }}{% if messages[0]['role'] == 'system' %}\
{% set system = messages[0]['content'] | trim %}{% set rest = messages[1:] %}\
{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}
{% for message in rest %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('roles must alternate user/assistant') }}{% endif %}
{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}
<start_of_turn>{{ role }}
{% if loop.first and system %}{{ system }}

{% endif %}{{ message['content'] | trim }}<end_of_turn>
{% endfor %}
{% if add_generation_prompt %}<start_of_turn>model
{% endif %}
"""


def test_gemma_gguf_without_a_template_gets_the_builtin_gemma_one(
        gemma_metadata: dict[str, Any]) -> None:
    assert "tokenizer.chat_template" not in gemma_metadata
    assert load_chat_template(gemma_metadata).name == "gemma"


@pytest.mark.parametrize("name", ["gemma", "llama3", "chatml"])
def test_builtin_template_renders_what_llama_cpp_renders(name: str, gemma_gguf: Path) -> None:
    template = ChatTemplate.builtin(name)
    with llama_server(gemma_gguf, "--no-jinja", "--chat-template", name, "-np", "1",
                      ctx=1024) as server:
        for messages in CONVERSATIONS:
            assert template.render(messages) == server.apply_template(messages)


def test_jinja_template_renders_what_llama_cpp_renders(gemma_gguf: Path,
                                                       tmp_path: Path) -> None:
    path = tmp_path / "gemma-like.jinja"
    path.write_text(JINJA_TEMPLATE)
    template = load_chat_template({}, override=str(path))
    with llama_server(gemma_gguf, "--jinja", "--chat-template-file", str(path), "-np", "1",
                      ctx=1024) as server:
        for messages in CONVERSATIONS[:3]:
            # llama.cpp drops the template's BOS, as the tokenizer adds one: so do we.
            ours = template.render(messages, bos_token="<bos>", eos_token="<eos>",
                                   tokenizer_adds_bos=True)
            assert ours == server.apply_template(messages)
