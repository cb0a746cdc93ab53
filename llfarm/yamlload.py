"""YAML the way llfarm reads a user's file: safe, bounded, strict.

- ``yaml.SafeLoader`` only (no Python objects);
- the text must be UTF-8 (a BOM is fine); anything else is one line naming the line of the first bad byte;
- the document is composed once, then checked before it is constructed: a key repeated in one mapping is an error
  naming both lines (YAML would silently keep the last), and anchors/aliases may not expand to more than
  :data:`MAX_VALUES` values or refer to themselves — so a few lines of nested aliases (an "alias bomb") are refused
  in milliseconds instead of growing without bound in whatever walks the data next.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import StrategyError

MAX_VALUES = 100_000          # nodes after alias expansion; a strategy has a few hundred
MERGE_TAG = "tag:yaml.org,2002:merge"


def read_text(path: Path) -> str:
    """A text file as UTF-8 (BOM tolerated); a clear error for unreadable or non-UTF-8 files."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StrategyError([f"cannot read: {exc.strerror}"], where=str(path)) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise StrategyError([f"not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line})"],
                            where=f"{path}:{line}", hint="save the file as UTF-8") from None


def load(text: str, where: str) -> tuple[Any, yaml.Node | None]:
    """(data, root node) of one YAML document; ``where`` names it in errors (a file path, or '--set ...')."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)        # refuses control characters (a NUL byte) right here
        node = loader.get_single_node()
        if node is not None:
            check(node, where)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        if isinstance(exc, yaml.reader.ReaderError):
            line = text[:exc.position].count("\n") + 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise StrategyError([f"malformed YAML: {problem}"], where=f"{where}:{line}" if line else where,
                            hint="check indentation and quoting on that line") from None
    except RecursionError:
        raise StrategyError(["YAML nested too deeply"], where=where, hint="a strategy is a few levels deep") from None
    finally:
        if loader is not None:
            loader.dispose()
    return data, node


def check(root: yaml.Node, where: str) -> None:
    """Refuse duplicate keys and alias expansions that are too big or recursive. Each distinct node is visited once
    (aliases share nodes), so this is linear in the size of the text, whatever the expansion."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: yaml.Node, path: str) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in in_progress:
            raise StrategyError([f"'{path or '(top)'}' refers to itself through an alias"],
                                where=f"{where}:{node.start_mark.line + 1}",
                                hint="an anchor (&name) cannot be used (*name) inside its own value")
        in_progress.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == MERGE_TAG:
                    total += size(value_node, path)
                    continue
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                line = key_node.start_mark.line + 1
                child = f"{path}.{name}" if path else str(name)
                if name is not None and name in seen:
                    shown = child if len(child) <= 80 else child[:77] + "..."
                    raise StrategyError([f"duplicate key '{shown}' on lines {seen[name]} and {line}"],
                                        where=f"{where}:{line}",
                                        hint="YAML would keep only the last one; merge the two or remove one")
                if name is not None:
                    seen[name] = line
                total += 1 + size(value_node, child)
                _limit(total, where, node)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                total += size(item, f"{path}[{i}]")
                _limit(total, where, node)
        in_progress.discard(key)
        sizes[key] = total
        return total

    size(root, "")


def _limit(total: int, where: str, node: yaml.Node) -> None:
    if total > MAX_VALUES:
        raise StrategyError([f"YAML aliases expand to more than {MAX_VALUES:,} values (an alias bomb?)"],
                            where=f"{where}:{node.start_mark.line + 1}",
                            hint="a strategy holds a few hundred values; check the anchors (&) and aliases (*)")
