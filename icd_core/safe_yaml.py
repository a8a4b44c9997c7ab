"""YAML with limits checked before any parsing cost grows: size, nesting depth and expanded size.

`yaml.safe_load` follows aliases, so a few hundred bytes of anchors (`&a [*b, *b, ...]`) stand for
millions of values, and every consumer (JSON encoding, validation) pays for the expansion; it also
composes nested collections recursively, so a document nested 100,000 deep raises RecursionError.
Here the event stream (an iterative parser) is scanned first for depth and alias count, then the
composed node graph's expanded size is counted with shared sub-trees counted once per use, and
only a document within every limit is constructed. A job spec needs none of these limits' room.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_CHARS = 1_000_000
MAX_DEPTH = 64
MAX_ALIASES = 1_000
MAX_EXPANDED_NODES = 100_000


class YamlRefused(ValueError):
    """A YAML document that is malformed or over one of the limits; the message says which, and
    `where` ('line:column', 1-based) where the parser stopped, for a malformed one."""

    def __init__(self, problem: str, where: str | None = None) -> None:
        super().__init__(f"{where}: {problem}" if where else problem)
        self.problem, self.where = problem, where


def _syntax_error(err: yaml.YAMLError) -> YamlRefused:
    """One line with the position: the parser's own message spans several lines about '<unicode string>'."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    where = f"{mark.line + 1}:{mark.column + 1}" if mark is not None else None
    return YamlRefused(f"invalid YAML: {problem}" + (f" ({context})" if context else ""), where)


_BRACKETS = re.compile(r"[\[\]{}]")


def _flow_depth_ok(text: str) -> bool:
    """A bracket count (quotes ignored: a spec holds no bracket-laden strings) before the scanner, which
    looks ahead up to 1,024 characters per token inside flow collections: 0.4 s for `[[[[...`."""
    depth = 0
    for m in _BRACKETS.finditer(text):
        depth += 1 if m.group() in "[{" else -1
        if depth > MAX_DEPTH:
            return False
    return True


def _scan_events(text: str) -> None:
    """Depth and alias limits, from the event stream: no tree is built yet."""
    if not _flow_depth_ok(text):
        raise YamlRefused(f"YAML nested more than {MAX_DEPTH} levels deep")
    depth = aliases = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise YamlRefused(f"YAML nested more than {MAX_DEPTH} levels deep")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise YamlRefused(f"YAML with more than {MAX_ALIASES} aliases")


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes the document stands for once every alias is expanded (a shared node counts at each use)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once instead of looping forever
    total = 1
    if isinstance(node, yaml.SequenceNode):
        total += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[key] = min(total, MAX_EXPANDED_NODES + 1)
    return memo[key]


def load_yaml(text: str) -> Any:
    """The document in `text` (None when empty), or YamlRefused naming the problem."""
    if len(text) > MAX_CHARS:
        raise YamlRefused(f"YAML over {MAX_CHARS:,} characters")
    try:
        _scan_events(text)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if _expanded_size(node, {}) > MAX_EXPANDED_NODES:
                raise YamlRefused(f"YAML that expands to more than {MAX_EXPANDED_NODES:,} values (aliases)")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise _syntax_error(exc) from None
