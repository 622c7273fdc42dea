"""YAML for config text from anyone: bounded in size, expansion and nesting, no duplicate keys.

``yaml.safe_load`` is safe against code execution, not against cost: a few hundred bytes of
nested aliases (``b: &b [*a, *a, ...]``) expand to billions of values once something walks
the result. Here the document is composed into nodes first (aliases stay shared there, so
this is cheap), its expanded size is counted over that graph, and only a document within
the budget is turned into Python data. The same walk refuses duplicate mapping keys, which
``safe_load`` silently resolves by keeping the last one.
"""

from __future__ import annotations

from typing import Any

import yaml

# A fully commented config is about 4 KiB and 80 values. Parsing costs about 600 bytes of
# memory per value (nodes and their marks), which Python keeps for reuse afterwards: these
# bounds keep one check of the largest document under 20 MB and 0.1 s.
MAX_BYTES = 64 * 1024
MAX_VALUES = 20_000  # scalars, lists and maps after alias expansion

# libyaml is 4x faster and bounds nesting itself (1000 levels); the pure-Python loader
# hits the recursion limit instead, which is caught below.
_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlRefused(ValueError):
    """The text is not a YAML document velod accepts; ``line`` is 1-based when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line


def load(text: str, *, max_bytes: int = MAX_BYTES, max_values: int = MAX_VALUES) -> Any:
    """The data of one YAML document; YamlRefused when it is too big, malformed or ambiguous."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise YamlRefused(f"the text is {size} bytes; at most {max_bytes} are accepted")
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = ", ".join(filter(None, (exc.context, exc.problem))) or "cannot be parsed"
            raise YamlRefused(f"YAML syntax error: {problem}",
                              mark.line + 1 if mark else None) from None
        except yaml.YAMLError as exc:
            raise YamlRefused(f"YAML syntax error: {exc}") from None
        except RecursionError:
            raise YamlRefused("nested too deeply") from None
        if node is None:
            return None
        check_nodes(node, max_values)
        try:
            return loader.construct_document(node)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc)
            raise YamlRefused(f"YAML error: {problem}",
                              mark.line + 1 if mark else None) from None
        except RecursionError:
            raise YamlRefused("nested too deeply") from None
    finally:
        loader.dispose()


def check_nodes(root: yaml.Node, max_values: int) -> int:
    """The document's size with every alias expanded; YamlRefused beyond ``max_values``,
    on a duplicate key or a self-referencing alias.

    Iterative post-order over the node graph, each shared node counted once per use but
    visited once, so a bomb costs its compressed size here, not its expanded one.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        children = _children(node)
        if children_done:
            open_nodes.discard(key)
            total = 1 + sum(sizes[id(c)] for c in children)
            if total > max_values:
                raise YamlRefused(
                    f"the document expands to more than {max_values} values (aliases "
                    "included); velod does not accept alias bombs",
                    node.start_mark.line + 1 if node.start_mark else None)
            sizes[key] = total
            continue
        if key in open_nodes:
            raise YamlRefused("an alias refers to the node that contains it",
                              node.start_mark.line + 1 if node.start_mark else None)
        open_nodes.add(key)
        if isinstance(node, yaml.MappingNode):
            _refuse_duplicate_keys(node)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _refuse_duplicate_keys(node: yaml.MappingNode) -> None:
    seen: dict[tuple[str, str], int] = {}
    for key_node, _value in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
            continue  # "<<: *base" merges are overridden by explicit keys on purpose
        line = key_node.start_mark.line + 1 if key_node.start_mark else 0
        ident = (key_node.tag, key_node.value)
        if ident in seen:
            raise YamlRefused(f"duplicate key {_excerpt(key_node.value)!r} at lines "
                              f"{seen[ident]} and {line}; the second would silently "
                              "replace the first", line)
        seen[ident] = line


def _excerpt(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
