"""Chat templates: llama.cpp's built-ins, Jinja in the sandbox, and bounds on bad templates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from velod.engine.models.chat import ChatTemplate, ChatTemplateError, load_chat_template

SYSTEM_CHAT = [{"role": "system", "content": " Be brief. "},
               {"role": "user", "content": " Hi "},
               {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "Bye"}]


def render(source: str, messages: list[dict[str, str]] | None = None, **options: object) -> str:
    template = ChatTemplate.from_jinja(source)
    return template.render(messages or [{"role": "user", "content": "hi"}], **options)


def test_gemma_folds_the_system_prompt_into_the_first_user_turn() -> None:
    assert ChatTemplate.builtin("gemma").render(SYSTEM_CHAT) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n")


def test_llama3_writes_headers_and_trims_content() -> None:
    assert ChatTemplate.builtin("llama3").render(SYSTEM_CHAT[:2]) == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_chatml_keeps_content_as_is_and_can_leave_out_the_generation_prompt() -> None:
    assert ChatTemplate.builtin("chatml").render(SYSTEM_CHAT[:2],
                                                 add_generation_prompt=False) == (
        "<|im_start|>system\n Be brief. <|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n")


def test_builtin_trim_leaves_unicode_spaces_as_llama_cpp_does() -> None:
    chat = [{"role": "user", "content": "\u00a0x\n"}]
    assert ChatTemplate.builtin("gemma").render(chat).startswith("<start_of_turn>user\n\u00a0x<")


def test_a_gguf_template_wins_over_the_architecture_default() -> None:
    template = load_chat_template({"general.architecture": "gemma3",
                                   "tokenizer.chat_template": "{{ messages[0].content }}!"})
    assert template.render([{"role": "user", "content": "hi"}]) == "hi!"


@pytest.mark.parametrize(("architecture", "name"), [
    ("gemma3", "gemma"), ("gemma2", "gemma"), ("llama", "llama3"), ("qwen2", "chatml"),
    ("phi3", "chatml")])
def test_a_gguf_without_a_template_gets_its_architectures_builtin(architecture: str,
                                                                 name: str) -> None:
    assert load_chat_template({"general.architecture": architecture}).name == name


def test_override_by_name_beats_the_gguf_template() -> None:
    metadata = {"tokenizer.chat_template": "{{ 'x' }}"}
    assert load_chat_template(metadata, override="chatml").name == "chatml"


def test_override_by_file_reads_a_jinja_template(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    template = load_chat_template({}, override=str(path))
    assert template.render([{"role": "user", "content": "hi"}]) == "[user]hi"


def test_override_that_is_neither_a_builtin_nor_a_file_lists_the_builtins() -> None:
    with pytest.raises(ChatTemplateError, match="'nope' is neither a built-in template "
                                                r"\(gemma, llama3, chatml\) nor a file"):
        load_chat_template({}, override="nope")


def test_jinja_gets_bos_eos_and_the_generation_prompt_flag() -> None:
    source = "{{ bos_token }}{{ messages[0].content }}{% if add_generation_prompt %}>{% endif %}"
    assert render(source, bos_token="<s>") == "<s>hi>"
    assert render(source, bos_token="<s>", add_generation_prompt=False) == "<s>hi"


def test_a_leading_bos_is_dropped_when_the_tokenizer_adds_one() -> None:
    source = "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"
    assert render(source, bos_token="<s>", eos_token="</s>", tokenizer_adds_bos=True,
                  tokenizer_adds_eos=True) == "hi"
    assert render(source, bos_token="<s>", eos_token="</s>") == "<s>hi</s>"


def test_jinja_has_transformers_helpers() -> None:
    source = ("{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|"
              "{% for m in messages %}{% generation %}{{ m.role }}{% endgeneration %}"
              "{% break %}{% endfor %}")
    assert render(source, [{"role": "user", "content": "<ü>"}]) == (
        '[{"role": "user", "content": "<ü>"}]|4|user')


def test_jinja_template_variables_reach_the_template() -> None:
    assert render("{{ tools | length }}", variables={"tools": [1, 2]}) == "2"


def test_raise_exception_becomes_an_error_with_the_templates_message() -> None:
    with pytest.raises(ChatTemplateError, match="raise_exception: roles must alternate"):
        render("{{ raise_exception('roles must alternate') }}")


def test_a_syntax_error_names_the_line() -> None:
    with pytest.raises(ChatTemplateError, match="line 2: "):
        ChatTemplate.from_jinja("ok\n{% for %}")


def test_a_failing_expression_is_a_template_error() -> None:
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render("{{ messages[0].content + 1 }}")


def test_the_sandbox_refuses_unsafe_attributes() -> None:
    with pytest.raises(ChatTemplateError, match="SecurityError: access to attribute '__class__'"):
        render("{{ messages.__class__.__mro__[1].__subclasses__() }}")


def test_the_sandbox_refuses_to_modify_the_messages() -> None:
    with pytest.raises(ChatTemplateError, match="SecurityError"):
        render("{{ messages.append(1) }}")


def test_a_loop_that_outputs_nothing_still_stops_at_the_deadline() -> None:
    source = ("{% for a in range(100000) %}{% for b in 'x' * 100000 %}"
              "{% endfor %}{% endfor %}")
    with pytest.raises(ChatTemplateError, match=r"longer than 0\.2 s"):
        render(source, timeout=0.2)


def test_output_beyond_the_size_limit_is_an_error() -> None:
    with pytest.raises(ChatTemplateError, match="prompt longer than 1000 chars"):
        render("{% for i in range(100) %}{{ 'x' * 100 }}{% endfor %}", max_chars=1000)


@pytest.mark.parametrize("expression", [
    "'x' * 10000000000", "[1] * 10000000000", "2 ** 100000000", "'x'.ljust(10000000000)",
    "'{:>10000000000}'.format(1)", "'{:>{}}'.format(1, 10000000000)", "'%10000000000s' % 1",
    "'%*s' % (10000000000, 1)", "'x' | center(10000000000)",
    "'%10000000000s' | format(1)"])
def test_values_that_would_eat_memory_are_refused(expression: str) -> None:
    with pytest.raises(ChatTemplateError, match="too large"):
        render("{{ " + expression + " }}")


def test_ordinary_numbers_and_formats_still_work() -> None:
    assert render("{{ '%05d' % 12345678 }} {{ 'ID {}'.format(12345678) }} "
                  "{{ 'ab' * 3 }} {{ 2 ** 10 }}") == "12345678 ID 12345678 ababab 1024"


def test_endless_recursion_is_a_template_error() -> None:
    with pytest.raises(ChatTemplateError, match="recursion"):
        render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}")


@pytest.mark.parametrize(("messages", "field"), [
    ([], "messages: is empty"),
    ("hello", "messages: must be a list"),
    ([{"content": "x"}], r"messages\[0\].role: must be a string"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content: must be a string"),
    (["x"], r"messages\[0\]: must be a map")])
def test_malformed_messages_are_errors_naming_the_field(messages: object, field: str) -> None:
    with pytest.raises(ChatTemplateError, match=field):
        ChatTemplate.builtin("gemma").render(messages)  # type: ignore[arg-type]


def test_jinja_templates_accept_content_given_as_parts() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert render("{{ messages[0].content[0].text }}", parts) == "hi"


def test_an_unknown_builtin_name_lists_the_known_ones() -> None:
    with pytest.raises(ChatTemplateError, match="built-in: gemma, llama3, chatml"):
        ChatTemplate.builtin("vicuna")


def test_importing_the_module_does_not_load_jinja2() -> None:
    code = ("import sys, velod.engine.models.chat as c; c.ChatTemplate.builtin('gemma')"
            ".render([{'role': 'user', 'content': 'x'}]); assert 'jinja2' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
