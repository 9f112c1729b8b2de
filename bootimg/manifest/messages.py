"""jsonschema errors rewritten as short, human diagnostics at the right line.

jsonschema's messages are written for schema authors ("Additional properties
are not allowed ('contaners' was unexpected)", a wall of text for ``oneOf``).
Users need "unknown key 'contaners' (did you mean 'containers'?)" at the line
of that key. The rules here are generic over schema.json, so the schema stays
the only place that defines the manifest.
"""

from __future__ import annotations

import datetime
import difflib
import re
from typing import Any, Iterable, Iterator

import jsonschema

from . import schema as schema_mod
from .diagnostics import Diagnostic, Path
from .document import Document

# sandbox.system_calls: a system call name or one of systemd 252's groups.
SYSCALL_PATTERN = (r"^(@("
                   r"aio|basic-io|chown|clock|cpu-emulation|debug|default|file-system|io-event|ipc|keyring|known|"
                   r"memlock|module|mount|network-io|obsolete|pkey|privileged|process|raw-io|reboot|resources|"
                   r"setuid|signal|swap|sync|system-service|timer"
                   r")|[a-z_][a-z0-9_]*)$")

# What each pattern in schema.json means, in words. tests/test_manifest.py
# checks that every pattern in the schema has an entry here.
PATTERN_HINTS: dict[str, str] = {
    r"^(/(?!\.\.?(/|$))[^/]+)+$": "must be an absolute, normalized path (no '.', '..', '//' or trailing '/')",
    r"^[a-z0-9][a-z0-9-]{0,62}$": "use lowercase letters, digits and '-', starting with a letter or digit, "
                                  "at most 63 characters",
    r"^([a-z0-9][a-z0-9-]{0,62}|[A-Za-z0-9:_.\\@-]+\.(service|socket|target|mount|automount|swap|path|timer|device"
    r"|slice|scope))$": "must be a container name (lowercase letters, digits, '-') or a systemd unit name with "
                        "its suffix, e.g. 'network-online.target'",
    r"^[a-z0-9][a-z0-9._-]{0,62}$": "use lowercase letters, digits, '.', '_' and '-', starting with a letter or "
                                    "digit, at most 63 characters",
    r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}$": "use letters, digits and '.', '_', '+', '~', '-', starting with a "
                                            "letter or digit",
    r"^[A-Za-z0-9]+([-._:@+/]+[A-Za-z0-9]+)*$": "must be an OCI ref name such as 'latest' or a digest "
                                                "'sha256:<64 hex digits>'",
    r"^/.*[^/]": "must be an absolute path glob (starting with '/') naming more than the root",
    r"^0?[0-7]{3}$": "must be octal permission bits as a string, e.g. \"0644\"",
    r"^[A-Za-z_][A-Za-z0-9_]*$": "environment variable names use letters, digits and '_', not starting with a digit",
    r"^([a-z_][a-z0-9_-]{0,31}|[0-9]+(:[0-9]+)?)$": "must be a user name or UID[:GID], e.g. \"1000:1000\"",
    r"^\S+$": "must be one argument without whitespace",
    schema_mod.INPUT_LOCATION["pattern"]: "must be an input location of the osbuild stage: input://NAME or input://NAME/PATH "
                                          "(no '.', '..' or '//'), never a host path",
    r"^/": "must be an absolute path",
    r"^/dev(/(?!\.\.?(/|$))[A-Za-z0-9_.+@-]+)+$": "must be a device node path under /dev/ (letters, digits, '_', "
                                                 "'.', '+', '@', '-'; no '.', '..' or '//')",
    r"^[A-Za-z0-9_-]{1,55}$": "must be a kernel module name (letters, digits, '_' or '-', at most 55 characters), "
                              "e.g. 'virtio_blk'",
    r"^[A-Za-z][A-Za-z0-9_+.-]{0,63}$": "must be a dracut module name (its modules.d directory without the number), "
                                        "e.g. 'systemd-initrd'",
    SYSCALL_PATTERN: "must be a system call name such as 'sched_setattr' or a systemd system call group such as "
                     "'@clock' (systemd-analyze syscall-filter lists them)",
}

_YAML_TYPE = {
    "object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
    "number": "a number", "boolean": "a boolean (true/false)", "null": "null",
}


def describe(value: Any) -> str:
    """How a value's type reads to someone who wrote YAML."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (datetime.date, datetime.datetime)):
        return f"the date {value.isoformat()}"
    return f"a {type(value).__name__}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


def _quote_list(values: Iterable[Any]) -> str:
    return ", ".join(str(v) if isinstance(v, str) else repr(v) for v in values)


def _did_you_mean(word: str, options: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _quote_hint(value: Any, expected: str) -> str:
    """Why YAML gave a non-string where a string was wanted."""
    if expected != "string":
        return ""
    if isinstance(value, bool):
        return " (YAML reads yes/no/on/off/true/false as booleans; quote the value)"
    if isinstance(value, (int, float, datetime.date)):
        return " (quote the value to make it a string)"
    return ""


class Rewriter:
    """Turns the errors of one validation run into diagnostics at source positions."""

    def __init__(self, doc: Document, root: schema_mod.Schema | None = None):
        self.doc = doc
        self.root = schema_mod.schema() if root is None else root

    def diagnostics(self, errors: Iterable[jsonschema.ValidationError]) -> list[Diagnostic]:
        errors = list(errors)
        # A value of the wrong type makes every other complaint about it noise.
        typed = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
        out: list[Diagnostic] = []
        for error in errors:
            if error.validator != "type" and tuple(error.absolute_path) in typed:
                continue
            out.extend(self.rewrite(error))
        return out

    def rewrite(self, error: jsonschema.ValidationError) -> Iterator[Diagnostic]:
        path: Path = tuple(error.absolute_path)
        value = error.instance
        kind = error.validator
        doc = self.doc

        if kind == "additionalProperties":
            yield from self._unknown_keys(error, path)
        elif kind == "required":
            missing = [k for k in error.validator_value if isinstance(value, dict) and k not in value]
            for key in missing:
                yield doc.at_key(path, f"missing required key '{key}'")
        elif kind == "type":
            expected = error.validator_value
            names = [expected] if isinstance(expected, str) else list(expected)
            wanted = " or ".join(_YAML_TYPE.get(n, n) for n in names)
            yield doc.at_value(path, f"must be {wanted}, got {describe(value)}{_quote_hint(value, names[0])}")
        elif kind == "enum":
            yield doc.at_value(path, self._enum_message(value, error.validator_value))
        elif kind == "pattern":
            hint = PATTERN_HINTS.get(error.validator_value, f"must match {error.validator_value}")
            yield doc.at_value(path, f"invalid value {_short(value)}: {hint}")
        elif kind in ("minimum", "maximum"):
            op = ">=" if kind == "minimum" else "<="
            exclusive = error.schema.get("exclusiveMinimum" if kind == "minimum" else "exclusiveMaximum")
            op = op[0] if exclusive is True else op
            yield doc.at_value(path, f"must be {op} {error.validator_value}, got {value}")
        elif kind == "minItems":
            n = error.validator_value
            yield doc.at_value(path, "must not be empty" if n == 1 else f"must have at least {n} items")
        elif kind == "minLength":
            yield doc.at_value(path, "must not be empty")
        elif kind == "uniqueItems":
            yield from self._duplicates(path, value)
        elif kind == "oneOf":
            yield from self._one_of(error, path)
        else:
            yield doc.at_value(path, error.message)

    def _enum_message(self, value: Any, allowed: list[Any]) -> str:
        message = f"must be one of: {_quote_list(allowed)}; got {describe(value)}"
        if isinstance(value, str):
            guess = _did_you_mean(value, [a for a in allowed if isinstance(a, str)])
            if guess:
                message += f" (did you mean '{guess}'?)"
        elif isinstance(value, bool) and all(isinstance(a, str) for a in allowed):
            message += " (YAML reads yes/no/on/off as booleans; quote the value)"
        return message

    def _unknown_keys(self, error: jsonschema.ValidationError, path: Path) -> Iterator[Diagnostic]:
        fragment = error.schema
        value = error.instance
        if not isinstance(value, dict):
            return
        allowed = list(fragment.get("properties", {}))
        key_patterns = list(fragment.get("patternProperties", {}))
        for key in value:
            if key in allowed or any(re.search(p, key) for p in key_patterns):
                continue
            if key_patterns and not allowed:
                hint = PATTERN_HINTS.get(key_patterns[0], f"keys must match {key_patterns[0]}")
                yield self.doc.at_key(path + (key,), f"invalid key '{key}': {hint}")
                continue
            message = f"unknown key '{key}'"
            elsewhere = self._sibling_branch_owner(path, key)
            guess = _did_you_mean(key, allowed)
            if elsewhere:
                message += f" ({elsewhere})"
            elif guess:
                message += f" (did you mean '{guess}'?)"
            elif allowed:
                message += f" (allowed: {', '.join(allowed)})"
            yield self.doc.at_key(path + (key,), message)

    def _sibling_branch_owner(self, path: Path, key: str) -> str | None:
        """For a key valid only in another oneOf branch: 'only with type: oci'."""
        fragment = self._fragment_at(path)
        if fragment is None or "oneOf" not in fragment:
            return None
        branches = [schema_mod.resolve(b, self.root) for b in fragment["oneOf"]]
        disc = schema_mod.discriminator(branches, self.root)
        if disc is None:
            return None
        owners = [v for b in branches if key in b.get("properties", {})
                  for v in schema_mod.resolve(b["properties"][disc], self.root)["enum"]]
        return f"only allowed with {disc}: {' or '.join(owners)}" if owners else None

    def _fragment_at(self, path: Path) -> schema_mod.Schema | None:
        """The schema fragment (before oneOf selection) that applies at ``path``."""
        fragment = schema_mod.resolve(self.root, self.root)
        instance: Any = self.doc.data
        for part in path:
            if isinstance(part, int):
                fragment = schema_mod.resolve(fragment.get("items", {}), self.root)
                instance = instance[part] if isinstance(instance, list) and part < len(instance) else None
            else:
                props = schema_mod.property_schemas(fragment, instance, self.root)
                if part not in props:
                    return None
                fragment = schema_mod.resolve(props[part], self.root)
                instance = instance.get(part) if isinstance(instance, dict) else None
        return fragment

    def _duplicates(self, path: Path, value: Any) -> Iterator[Diagnostic]:
        if not isinstance(value, list):
            return
        seen: dict[str, int] = {}
        for index, item in enumerate(value):
            key = repr(item)
            if key in seen:
                yield self.doc.at_value(path + (index,), f"duplicate item {_short(item)} "
                                                         f"(same as item {seen[key]})")
            else:
                seen[key] = index

    def _one_of(self, error: jsonschema.ValidationError, path: Path) -> Iterator[Diagnostic]:
        branches = [schema_mod.resolve(b, self.root) for b in error.validator_value]
        value = error.instance
        disc = schema_mod.discriminator(branches, self.root)
        if disc is not None:
            yield from self._discriminated(error, path, branches, disc)
            return
        if all(set(b) == {"required"} for b in branches):
            names = [" and ".join(f"'{k}'" for k in b["required"]) for b in branches]
            present = [n for b, n in zip(branches, names) if isinstance(value, dict)
                       and all(k in value for k in b["required"])]
            if present:
                yield self.doc.at_value(path, f"give only one of {' or '.join(present)}")
            else:
                yield self.doc.at_value(path, f"missing one of the keys {' or '.join(names)}")
            return
        best = jsonschema.exceptions.best_match(error.context)
        if best is None:
            yield self.doc.at_value(path, error.message)
        else:
            yield from self.rewrite(best)

    def _discriminated(self, error: jsonschema.ValidationError, path: Path,
                       branches: list[schema_mod.Schema], disc: str) -> Iterator[Diagnostic]:
        value = error.instance
        if not isinstance(value, dict):
            yield self.doc.at_value(path, f"must be a mapping, got {describe(value)}")
            return
        allowed = [v for b in branches for v in schema_mod.resolve(b["properties"][disc], self.root)["enum"]]
        if disc not in value:
            yield self.doc.at_key(path, f"missing required key '{disc}' (one of: {_quote_list(allowed)})")
            return
        chosen = schema_mod.select_branch({"oneOf": branches}, value, self.root)
        if chosen is None:
            yield self.doc.at_value(path + (disc,), self._enum_message(value[disc], allowed))
            return
        index = chosen[0]
        yield from self.diagnostics(e for e in error.context if e.relative_schema_path[0] == index)
