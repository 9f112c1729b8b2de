"""systemd unit-file syntax: filling the unit templates and writing values systemd reads back
exactly.

Kept apart from what the units say (``units.py``) so that the rules of the file format are in
one place and the generators only choose settings.

Templates. The file skeletons are in ``bootimg/boot/templates/`` (``units/`` at the top of the
repository is a link to it); ``@KEY@`` fills a value, a line holding only ``@BLOCK@`` expands
to zero or more lines.

Quoting. ExecStart= words: systemd unquotes and C-unescapes each word, expands ``%``
specifiers in it and ``$VAR`` at run time, and takes a lone ``;`` as a separator, so every
``%`` is written ``%%``, every ``$`` ``$$``, and a word with whitespace, quotes, a backslash,
``;`` or control characters is double-quoted with C escapes. Environment= assignments get the
same quoting but keep ``$`` (systemd does not expand variables there). The quadlet keys that
end up in podman's ExecStart (Exec=, Environment=) are escaped like ExecStart words. Paths in
list-valued settings cannot be escaped, so those are refused (:func:`check_path`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from importlib import resources

from ..errors import BootimgError
from ..manifest import limits

_NEEDS_QUOTES = re.compile(r"[\s\"'\\;]|[\x00-\x1f\x7f]")
_C_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "\a": "\\a",
              "\b": "\\b", "\f": "\\f", "\v": "\\v"}
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


# -- templates -----------------------------------------------------------------------------------

def template_text(name: str) -> str:
    """A template shipped in bootimg/boot/templates (package data, so it works from a wheel too)."""
    return resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")


def render(name: str, values: Mapping[str, str | list[str]]) -> str:
    """Fill template ``name``: ``@KEY@`` takes a string; a line that is exactly ``@KEY@`` takes a
    list of lines (none: the line goes). Unknown or unused keys are errors (a template and its
    caller must agree)."""
    used: set[str] = set()
    out: list[str] = []

    def fill(m: re.Match) -> str:
        key = m.group(1)
        if key not in values:
            raise KeyError(f"template {name}: no value for @{key}@")
        value = values[key]
        if not isinstance(value, str):
            raise TypeError(f"template {name}: @{key}@ is inside a line, so it takes a string")
        used.add(key)
        return value

    for line in template_text(name).split("\n"):
        whole = _PLACEHOLDER.fullmatch(line)
        if whole and not isinstance(values.get(whole.group(1)), str):
            key = whole.group(1)
            if key not in values:
                raise KeyError(f"template {name}: no value for @{key}@")
            used.add(key)
            out.extend(values[key])
            continue
        out.append(_PLACEHOLDER.sub(fill, line))
    unused = set(values) - used
    if unused:
        raise KeyError(f"template {name}: unused values {sorted(unused)}")
    return "\n".join(out)


# -- systemd quoting -------------------------------------------------------------------------------

def _c_escape(s: str) -> str:
    return "".join(_C_ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x20 or ord(ch) == 0x7f else ch)
                   for ch in s)


def exec_word(arg: str) -> str:
    """One ExecStart= argument, written so systemd hands the program exactly ``arg``."""
    s = arg.replace("%", "%%").replace("$", "$$")
    if s and not _NEEDS_QUOTES.search(s):
        return s
    return '"' + _c_escape(s) + '"'


def exec_line(argv: Iterable[str], *, container: str = "?") -> str:
    """A whole command line. argv[0] is the executable: systemd reads prefix characters
    (``-@:+!``) off its front, and expands no variables in it, so those are refused."""
    argv = list(argv)
    problem = limits.executable_problem(argv[0])
    if problem is not None:
        raise BootimgError(f"container '{container}': command {argv[0]!r} {problem}")
    return " ".join(exec_word(a) for a in argv)


def env_assignment(key: str, value: str) -> str:
    """An Environment= value: specifiers are expanded there, variables are not."""
    s = f"{key}={value}".replace("%", "%%")
    if not _NEEDS_QUOTES.search(s):
        return s
    return '"' + _c_escape(s) + '"'


def check_path(path: str, *, container: str, what: str) -> str:
    """A path that goes into a list-valued setting (BindReadOnlyPaths=, quadlet Volume=, the
    helper's --bind=): ':' and whitespace separate there, so such paths are refused rather
    than escaped."""
    problem = limits.list_path_problem(path)
    if problem is not None:
        raise BootimgError(f"container '{container}': {what} {path!r} {problem}")
    return path


def unit_path(path: str, *, container: str, what: str) -> str:
    """check_path, then ``%`` escaped for a unit file setting."""
    return check_path(path, container=container, what=what).replace("%", "%%")


def timespan_ms(ms: int) -> str:
    """A duration in milliseconds as a systemd time span (whole seconds as "Ns")."""
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"

