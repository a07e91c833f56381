"""The one hardened YAML reader behind every loader (run configs, ``--set`` values,
topology specs and their overrides, sweep files).

YAML is parsed by PyYAML's *safe* loader (no tags that build Python objects), and
before a value is handed back:

- the text is at most :data:`MAX_BYTES` (checked on the file's size, before reading);
- it is strict UTF-8 (an error names the file and the byte offset);
- the composed document is at most :data:`MAX_DEPTH` levels deep and, with every alias
  expanded, at most :data:`MAX_NODES` nodes. A "billion laughs" document (aliases of
  aliases, a few hundred bytes) is refused here, at load time, instead of exploding
  later when the config is copied or dumped after the run. The expanded size is
  computed on the node graph with memoization, so checking costs O(document), not
  O(expansion).

Every failure is a :class:`~fedmerge.errors.ConfigError` naming ``what`` was read.

>>> parse_yaml("a: [1, 2]", "--set a")
{'a': [1, 2]}
>>> parse_yaml("a: &x [1, 2]\\nb: [*x, *x, *x]", "spec", max_nodes=8)
Traceback (most recent call last):
...
fedmerge.errors.ConfigError: spec: more than 8 YAML nodes once aliases are expanded
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from fedmerge.errors import ConfigError

MAX_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
MAX_NODES = 100_000


def read_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """Read and parse the YAML file ``path`` (see the module docstring for the limits)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size > MAX_BYTES:
                raise ConfigError(f"cannot read {what} {path}: larger than the {MAX_BYTES}-byte "
                                  "limit")  # fmt: skip
            raw = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"cannot read {what} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    return parse_yaml(text, f"{what} {path}")


def read_mapping(path: str | os.PathLike[str], what: str = "config") -> dict[str, Any]:
    """The mapping in YAML file ``path`` (an empty file: ``{}``); ConfigError naming the file."""
    data = read_yaml(path, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a mapping of fields")
    return data


def parse_yaml(text: str, what: str, *, max_nodes: int = MAX_NODES) -> Any:
    """Parse YAML ``text``; a ConfigError naming ``what`` if it breaks a limit or the syntax."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{what}: larger than the {MAX_BYTES}-byte limit")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"{what}: not valid YAML ({str(exc)[:200]})") from None
    if node is None:
        return None
    _check_shape(node, what, max_nodes)
    try:
        return yaml.SafeLoader("").construct_document(node)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # e.g. an int of 10⁵ digits
        raise ConfigError(f"{what}: cannot read a value ({str(exc)[:200]})") from None


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_shape(root: Node, what: str, max_nodes: int) -> None:
    """Depth ≤ MAX_DEPTH and expanded size ≤ ``max_nodes``, iteratively (no recursion)."""
    size: dict[int, int] = {}
    stack: list[tuple[Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"{what}: nested deeper than {MAX_DEPTH} levels")
        if id(node) in size:
            continue
        kids = _children(node)
        if done:
            size[id(node)] = 1 + sum(size[id(k)] for k in kids)
            if size[id(node)] > max_nodes:
                raise ConfigError(f"{what}: more than {max_nodes} YAML nodes once aliases are "
                                  "expanded")  # fmt: skip
            continue
        stack.append((node, depth, True))
        stack.extend((k, depth + 1, False) for k in kids if id(k) not in size)
