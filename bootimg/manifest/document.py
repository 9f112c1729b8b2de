"""YAML to plain data plus the source position of every node.

PyYAML's constructor forgets where values came from and silently lets a later
duplicate key win. We therefore compose the node graph ourselves and build the
data from it, recording for every JSON path the mark of the value and, for
mapping entries, of the key; duplicate keys become diagnostics. Scalars are
still typed by PyYAML's SafeLoader resolver (so ``yes`` is a boolean, as any
other YAML tool would read it), while mapping keys keep their source text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from .diagnostics import Diagnostic, Path


@dataclass(frozen=True)
class Place:
    """1-based positions of a node's key (for mapping entries) and value."""

    line: int
    column: int
    key_line: int | None = None
    key_column: int | None = None
    empty: bool = False  # an implicit null such as `rootfs:` with nothing after it

    @property
    def key(self) -> tuple[int, int]:
        """Where the entry's key is, falling back to the value (list items, the root)."""
        if self.key_line is None or self.key_column is None:
            return self.line, self.column
        return self.key_line, self.key_column

    @property
    def value(self) -> tuple[int, int]:
        """Where the value is; an empty value is reported at its key."""
        return self.key if self.empty else (self.line, self.column)


@dataclass
class Document:
    """Parsed manifest data, a position for every path in it, and parse problems."""

    data: Any
    places: dict[Path, Place] = field(default_factory=dict)
    problems: list[Diagnostic] = field(default_factory=list)
    unreadable: set[Path] = field(default_factory=set)  # values that became None because they could not be read

    def place(self, path: Path) -> Place:
        """The place of ``path`` or, for nodes that are absent (defaults, missing keys), its nearest ancestor."""
        path = tuple(path)
        while path not in self.places and path:
            path = path[:-1]
        return self.places.get(path, Place(1, 1))

    def at_value(self, path: Path, message: str, severity: str = "error") -> Diagnostic:
        """A diagnostic at the value of ``path`` (or at the key of its nearest present ancestor)."""
        place = self.places.get(tuple(path))
        line, column = place.value if place else self.place(path).key
        return Diagnostic(line, column, tuple(path), message, severity)  # type: ignore[arg-type]

    def at_key(self, path: Path, message: str, severity: str = "error") -> Diagnostic:
        line, column = self.place(path).key
        return Diagnostic(line, column, tuple(path), message, severity)  # type: ignore[arg-type]


_SURROGATE = re.compile("[\ud800-\udfff]")
_COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
# Aliases are expanded into copies; this bounds the work a "billion laughs" file can cause.
MAX_NODES = 200_000


class _TooLarge(Exception):
    def __init__(self, node: yaml.Node):
        self.node = node


class _Builder:
    """Turns a composed node graph into data, recording places and duplicate keys."""

    def __init__(self, loader: yaml.SafeLoader):
        self.loader = loader
        self.doc = Document(data=None)
        self._active: set[int] = set()  # nodes being built: an alias cycle guard
        self._count = 0

    def build(self, node: yaml.Node, path: Path, key_node: yaml.Node | None = None) -> Any:
        self._count += 1
        if self._count > MAX_NODES:
            raise _TooLarge(node)
        mark = node.start_mark
        empty = isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null" and node.value == ""
        self.doc.places[path] = Place(
            mark.line + 1, mark.column + 1,
            key_node.start_mark.line + 1 if key_node else None,
            key_node.start_mark.column + 1 if key_node else None,
            empty,
        )
        if id(node) in self._active:
            return self._unreadable(node, path, "recursive alias: a node cannot contain itself")
        if not isinstance(node, yaml.ScalarNode) and node.tag not in _COLLECTION_TAGS:
            return self._unreadable(node, path, f"unsupported YAML tag '{node.tag}'")
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
            return self._scalar(node, path)
        finally:
            self._active.discard(id(node))

    def _problem(self, node: yaml.Node, path: Path, message: str) -> None:
        mark = node.start_mark
        self.doc.problems.append(Diagnostic(mark.line + 1, mark.column + 1, path, message))

    def _unreadable(self, node: yaml.Node, path: Path, message: str) -> None:
        self._problem(node, path, message)
        self.doc.unreadable.add(path)
        return None

    def _scalar(self, node: yaml.Node, path: Path) -> Any:
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as err:
            return self._unreadable(node, path, f"cannot read value: {err.problem}")
        if isinstance(value, str) and _SURROGATE.search(value):
            # "\ud83d\ude00" escapes (as JSON writes them) are one character in UTF-16 form; a lone
            # half is no character at all, and UTF-8 cannot encode it.
            value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
            lone = _SURROGATE.search(value)
            if lone is not None:
                return self._unreadable(node, path, f"cannot read value: \\u{ord(lone.group()):04x} is a lone "
                                                    "UTF-16 surrogate, not a character")
        return value

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        result: dict[str, Any] = {}
        first_seen: dict[str, yaml.Node] = {}
        for key_node, value_node in self._merged_pairs(node, path):
            if not isinstance(key_node, yaml.ScalarNode):
                self._problem(key_node, path, "mapping keys must be plain strings")
                continue
            key = key_node.value
            if key in first_seen:
                first = first_seen[key].start_mark
                self._problem(key_node, path + (key,),
                              f"duplicate key '{key}' (first given at line {first.line + 1})")
            first_seen[key] = key_node
            result[key] = self.build(value_node, path + (key,), key_node)
        return result

    def _merged_pairs(self, node: yaml.MappingNode, path: Path,
                      merging: frozenset[int] = frozenset()) -> list[tuple[yaml.Node, yaml.Node]]:
        """The mapping's own pairs after the pairs merged in with ``<<: *anchor``.

        Explicit keys override merged ones without being duplicates, as YAML's
        merge-key type specifies; merged keys keep their original positions.
        """
        own: list[tuple[yaml.Node, yaml.Node]] = []
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        merging = merging | {id(node)}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for source in sources:
                    if not isinstance(source, yaml.MappingNode):
                        self._problem(source, path, "'<<' merges only mappings")
                    elif id(source) in merging:
                        self._problem(source, path, "recursive alias: a mapping cannot merge itself")
                    else:
                        merged.extend(self._merged_pairs(source, path, merging))
            else:
                own.append((key_node, value_node))
        own_keys = {k.value for k, _ in own if isinstance(k, yaml.ScalarNode)}
        seen: set[str] = set()
        kept: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in reversed(merged):  # later merge sources lose to earlier ones
            name = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if name in own_keys or name in seen:
                continue
            seen.add(name)  # type: ignore[arg-type]
            kept.append((key_node, value_node))
        return list(reversed(kept)) + own


def _at(mark: yaml.Mark | None) -> tuple[int, int]:
    return (mark.line + 1, mark.column + 1) if mark else (1, 1)


def _syntax_error(err: yaml.YAMLError, text: str) -> Diagnostic:
    """A YAML error as a diagnostic at its position."""
    if isinstance(err, yaml.reader.ReaderError):
        before = text[: err.position]
        line, column = before.count("\n") + 1, err.position - (before.rfind("\n") + 1) + 1
        return Diagnostic(line, column, (), f"YAML syntax error: character U+{err.character:04X} is not allowed")
    if isinstance(err, yaml.MarkedYAMLError):
        line, column = _at(err.problem_mark or err.context_mark)
        if err.context and "single document" in err.context:
            message = "expected a single YAML document, found another one"
        else:
            context = f" ({err.context})" if err.context else ""
            message = f"{err.problem or 'invalid YAML'}{context}"
        return Diagnostic(line, column, (), f"YAML syntax error: {message}")
    return Diagnostic(1, 1, (), f"YAML syntax error: {err}")


def parse(text: str) -> Document:
    """Parse one YAML document; syntax errors become diagnostics (the data is then None)."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks for unprintable characters already
        node = loader.get_single_node()
    except yaml.YAMLError as err:
        return Document(None, {}, [_syntax_error(err, text)])
    except RecursionError:
        return Document(None, {}, [Diagnostic(1, 1, (), "YAML nested too deeply")])
    finally:
        if loader is not None:
            loader.dispose()
    if node is None:
        return Document(None, {(): Place(1, 1)}, [Diagnostic(1, 1, (), "the file has no YAML document; "
                                                            "expected a mapping starting with 'apiVersion: bootimg/v1'")])
    builder = _Builder(yaml.SafeLoader(""))
    try:
        builder.doc.data = builder.build(node, ())
    except _TooLarge as err:
        line, column = _at(err.node.start_mark)
        return Document(None, {}, [Diagnostic(line, column, (), f"more than {MAX_NODES} values after expanding "
                                                                "aliases; a manifest is never this large")])
    except RecursionError:
        return Document(None, {}, [Diagnostic(1, 1, (), "YAML nested too deeply")])
    return builder.doc
