"""Chat messages to one prompt string: the GGUF's Jinja chat template, or llama.cpp's built-ins.

A GGUF's ``tokenizer.chat_template`` is rendered with ``jinja2`` in its immutable sandbox,
with what transformers gives templates (``raise_exception``, ``strftime_now``, a ``tojson``
that does not escape HTML, ``{% generation %}``, loop controls, trimmed blocks) and the
generation prompt. Templates are untrusted code: rendering is bounded in time and size,
and every failure is a :class:`ChatTemplateError`. A GGUF without a template gets the
built-in one of its architecture, written as llama.cpp's ``llm_chat_apply_template``
writes it (gemma, llama3, chatml).
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

Messages = Sequence[Mapping[str, Any]]

MAX_TEMPLATE_BYTES = 1 << 20
MAX_PROMPT_CHARS = 8 << 20
RENDER_TIMEOUT = 2.0
# Bounds on values a template computes (string repetition, padding widths, powers).
MAX_VALUE_SIZE = 1 << 20
MAX_EXPONENT = 4096
# The variable through which every {% for %} of a compiled template iterates (see _parse).
LOOP_GUARD = "velod_loop_guard"


# A width or precision of 8+ digits (10 million or more) in a %-format or str.format field.
_HUGE_WIDTH = re.compile(r"%[-+ #0]*\d*\.?\d{8,}|\{[^{}]*:[^{}]*\d{8,}[^{}]*\}")

# A str.format field whose spec takes a value from the arguments: "{:>{width}}".
_NESTED_FIELD = re.compile(r"\{[^{}]*\{")


class ChatTemplateError(ValueError):
    """A template or the messages given to it cannot make a prompt; ``field`` says where."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _trim(text: str) -> str:
    """llama.cpp's trim(): C ``isspace`` characters only, not all of Unicode's spaces."""
    return text.strip(" \t\n\v\f\r")


def _render_gemma(messages: Messages, add_generation_prompt: bool) -> str:
    # Gemma has no system role: llama.cpp folds the system text into the next user turn.
    out, system = [], ""
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            system += _trim(content)
            continue
        role = "model" if role == "assistant" else role
        out.append(f"<start_of_turn>{role}\n")
        if system and role != "model":
            out.append(system + "\n\n")
            system = ""
        out.append(_trim(content) + "<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


def _render_llama3(messages: Messages, add_generation_prompt: bool) -> str:
    out = [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{_trim(m['content'])}<|eot_id|>"
           for m in messages]
    if add_generation_prompt:
        out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


def _render_chatml(messages: Messages, add_generation_prompt: bool) -> str:
    out = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


BUILTIN: Mapping[str, Callable[[Messages, bool], str]] = {
    "gemma": _render_gemma, "llama3": _render_llama3, "chatml": _render_chatml,
}
# A GGUF without a template: its architecture's built-in; anything else gets chatml,
# as llama-server does.
ARCHITECTURE_DEFAULTS: Mapping[str, str] = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "llama": "llama3", "qwen2": "chatml",
}


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template ready to render: a built-in's name, or Jinja source (compiled here).

    ``ChatTemplate("gemma")`` is a built-in; ``ChatTemplate(name, source)`` compiles
    ``source`` in the sandbox, and a syntax error is a ChatTemplateError naming the line.
    """

    name: str
    source: str | None = None
    _compiled: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.source is None:
            if self.name not in BUILTIN:
                raise ChatTemplateError("chat_template", (
                    f"{self.name!r} is not a built-in template; built-in: {', '.join(BUILTIN)}"))
            return
        import jinja2

        if len(self.source.encode()) > MAX_TEMPLATE_BYTES:
            raise ChatTemplateError(self.name, f"longer than {MAX_TEMPLATE_BYTES} bytes")
        try:
            compiled = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as error:
            raise ChatTemplateError(self.name, f"line {error.lineno}: {error.message}") from None
        object.__setattr__(self, "_compiled", compiled)

    @classmethod
    def builtin(cls, name: str) -> ChatTemplate:
        """One of llama.cpp's built-in templates (gemma, llama3, chatml)."""
        return cls(name)

    @classmethod
    def from_jinja(cls, source: str, name: str = "tokenizer.chat_template") -> ChatTemplate:
        """A Jinja template compiled in the sandbox; a syntax error names the line."""
        return cls(name, source)

    def render(self, messages: Messages, *, add_generation_prompt: bool = True,
               bos_token: str = "", eos_token: str = "", tokenizer_adds_bos: bool = False,
               tokenizer_adds_eos: bool = False, variables: Mapping[str, Any] | None = None,
               timeout: float = RENDER_TIMEOUT, max_chars: int = MAX_PROMPT_CHARS) -> str:
        """The prompt for ``messages``, ending with the model's turn when asked.

        ``tokenizer_adds_bos``/``_eos``: the prompt will be tokenized with BOS (EOS) added,
        so a BOS the template writes first (an EOS it writes last) is dropped, as llama.cpp
        does; the model sees one. ``variables`` go to Jinja templates (``tools``, ...).
        """
        _check_messages(messages, typed_content=self.source is not None)
        if self.source is None:
            prompt = BUILTIN[self.name](messages, add_generation_prompt)
        else:
            prompt = self._render_jinja(messages, add_generation_prompt, bos_token, eos_token,
                                        variables or {}, timeout, max_chars)
        if tokenizer_adds_bos and bos_token and prompt.startswith(bos_token):
            prompt = prompt[len(bos_token):]
        if tokenizer_adds_eos and eos_token and prompt.endswith(eos_token):
            prompt = prompt[:-len(eos_token)]
        return prompt

    def _render_jinja(self, messages: Messages, add_generation_prompt: bool, bos_token: str,
                      eos_token: str, variables: Mapping[str, Any], timeout: float,
                      max_chars: int) -> str:
        deadline = time.monotonic() + timeout
        context = {**variables, "messages": [dict(m) for m in messages],
                   "add_generation_prompt": add_generation_prompt, "bos_token": bos_token,
                   "eos_token": eos_token,
                   LOOP_GUARD: _loop_guard(deadline, self.name, timeout)}
        parts: list[str] = []
        size = 0
        try:
            for part in self._compiled.generate(context):
                size += len(part)
                if size > max_chars:
                    raise ChatTemplateError(self.name, f"prompt longer than {max_chars} chars")
                if time.monotonic() > deadline:
                    raise _timeout(self.name, timeout)
                parts.append(part)
        except ChatTemplateError:
            raise
        except _TemplateRaised as error:
            raise ChatTemplateError(self.name, f"raise_exception: {error}") from None
        except RecursionError:
            raise ChatTemplateError(self.name, "recursion too deep") from None
        except Exception as error:  # untrusted template code: any failure is the template's
            raise ChatTemplateError(self.name, f"{type(error).__name__}: {error}") from None
        return "".join(parts)


def load_chat_template(metadata: Mapping[str, Any], override: str | None = None) -> ChatTemplate:
    """The template for a model: ``override`` (a built-in's name or a Jinja file), else the
    GGUF's ``tokenizer.chat_template``, else the built-in for ``general.architecture``."""
    if override:
        if override in BUILTIN:
            return ChatTemplate.builtin(override)
        return ChatTemplate.from_jinja(_read_template_file(override), name=override)
    source = metadata.get("tokenizer.chat_template")
    if source:
        return ChatTemplate.from_jinja(str(source))
    architecture = str(metadata.get("general.architecture", ""))
    return ChatTemplate.builtin(ARCHITECTURE_DEFAULTS.get(architecture, "chatml"))


def _read_template_file(value: str) -> str:
    path = Path(value)
    try:
        if path.stat().st_size > MAX_TEMPLATE_BYTES:
            raise ChatTemplateError("chat_template", (
                f"{value} is larger than {MAX_TEMPLATE_BYTES} bytes"))
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ChatTemplateError("chat_template", (
            f"{value!r} is neither a built-in template ({', '.join(BUILTIN)}) nor a file"
        )) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ChatTemplateError("chat_template", f"cannot read {value}: {error}") from None


def _check_messages(messages: Messages, *, typed_content: bool) -> None:
    """Each message has a string role and string content (or, for Jinja, a list of parts)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages", "must be a list of {role, content} maps")
    if not messages:
        raise ChatTemplateError("messages", "is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"messages[{i}]", "must be a map with role and content")
        if not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"messages[{i}].role", "must be a string")
        content = message.get("content")
        if not (isinstance(content, str) or (typed_content and isinstance(content, list))):
            kinds = "a string or a list of parts" if typed_content else "a string"
            raise ChatTemplateError(f"messages[{i}].content", f"must be {kinds}")


def _timeout(name: str, timeout: float) -> ChatTemplateError:
    return ChatTemplateError(name, f"rendering took longer than {timeout:g} s")


def _loop_guard(deadline: float, name: str, timeout: float) -> Callable[[Any], Iterator[Any]]:
    """What every ``{% for %}`` iterates through: its items, with a deadline on each step."""

    def guarded(items: Any) -> Iterator[Any]:
        for item in items:
            if time.monotonic() > deadline:
                raise _timeout(name, timeout)
            yield item

    return guarded


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers' tojson: JSON as is; Jinja's own escapes <, >, & and ' for HTML.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _TemplateRaised(Exception):
    """What a template's raise_exception(message) raises; render() names the template."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


_ENVIRONMENT: Any = None


def _environment() -> Any:
    """The sandboxed Jinja environment every template compiles in (built once)."""
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        _ENVIRONMENT = _build_environment()
    return _ENVIRONMENT


def _build_environment() -> Any:
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def bounded_arguments(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """A filter that refuses widths and format strings that would allocate too much."""

        @functools.wraps(function)  # keeps jinja's pass_environment marker
        def checked(*args: Any, **kwargs: Any) -> Any:
            if (any(map(too_big, args)) or any(map(too_big, kwargs.values()))
                    or (name == "format" and _HUGE_WIDTH.search(str(args[0])))):
                raise SecurityError(f"an argument of the {name} filter is too large")
            return function(*args, **kwargs)

        return checked

    class GenerationTags(Extension):
        """transformers' ``{% generation %}…{% endgeneration %}``: renders its body."""

        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> list[nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def too_big(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > MAX_VALUE_SIZE

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox, plus limits on values that could eat memory or time."""

        intercepted_binops = frozenset({"*", "**", "%"})

        def _parse(self, source: str, name: str | None, filename: str | None) -> Any:
            # Every for loop iterates through the per-render loop guard, so a loop that
            # outputs nothing still stops at the deadline.
            tree = super()._parse(source, name, filename)
            for loop in tree.find_all(nodes.For):
                loop.iter = nodes.Call(nodes.Name(LOOP_GUARD, "load"), [loop.iter], [],
                                       None, None)
            return tree

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"exponent {right} is too large")
            if operator == "%" and isinstance(left, str) and (
                    _HUGE_WIDTH.search(left) or ("*" in left and any(map(
                        too_big, right if isinstance(right, tuple) else (right,))))):
                raise SecurityError("format width is too large")
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if (isinstance(seq, (str, list, tuple)) and isinstance(times, int)
                            and len(seq) * times > MAX_VALUE_SIZE):
                        raise SecurityError("repetition result is too large")
            return super().call_binop(context, operator, left, right)

        def wrap_str_format(self, value: Any) -> Any:
            owner = getattr(value, "__self__", None)
            if isinstance(owner, str) and _HUGE_WIDTH.search(owner):
                raise SecurityError("format width is too large")
            return super().wrap_str_format(value)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            # str.ljust(10**9), "{:>{}}".format(x, 10**9) and friends allocate what they are
            # told to. (str.format comes wrapped by the sandbox, hence __wrapped__.)
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            sizes_args = isinstance(owner, str) and (
                not hasattr(__obj, "__wrapped__") or _NESTED_FIELD.search(owner))
            if sizes_args and (any(map(too_big, args)) or any(map(too_big, kwargs.values()))):
                raise SecurityError("string method argument is too large")
            return super().call(__context, __obj, *args, **kwargs)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[GenerationTags, loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters.update({name: bounded_arguments(name, env.filters[name])
                        for name in ("center", "indent", "wordwrap", "truncate", "format")})
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
