"""Checks a JSON Schema cannot express: cross-references, uniqueness, cycles, consistency.

They run on the normalized data even when schema validation failed, so a user
sees every problem in one run; each check therefore skips values of the wrong
type (the schema has already reported those). Every diagnostic points at the
offending node through the document's position map.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterator

from ..composefs.tree import NAME_MAX, PATH_MAX
from . import limits, reserved
from .diagnostics import Diagnostic, Path
from .document import Document

PHASES = ("early", "basic", "default")
CONTAINER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# The dracut modules of the initramfs's emergency shell (dracut-systemd's emergency.service runs
# dracut-emergency, which needs base's dracut-lib.sh).
EMERGENCY_SHELL = ("dracut-systemd", "base")
# Milestones reached before the switch to the real root: meaningless against userspace_start.
BEFORE_USERSPACE = ("initrd", "root_mounted", "root_hook", "userspace")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def container_of(ref: str, names: set[str]) -> str | None:
    """The container an ordering entry or KPI unit names: 'x' or 'x.service' for a container x."""
    if ref in names:
        return ref
    if ref.endswith(".service") and ref[: -len(".service")] in names:
        return ref[: -len(".service")]
    return None


def is_bare(ref: str) -> bool:
    """A bare name (no unit suffix) always means a container of this manifest."""
    return "." not in ref and bool(CONTAINER_NAME.match(ref))


class Checker:
    def __init__(self, doc: Document, data: Any):
        self.doc = doc
        self.data = data if isinstance(data, dict) else {}
        self.out: list[Diagnostic] = []
        self.containers: list[tuple[int, dict[str, Any]]] = [
            (i, c) for i, c in enumerate(self._list("containers")) if isinstance(c, dict)]
        self.names: dict[str, int] = {}
        for i, c in self.containers:
            name = c.get("name")
            if isinstance(name, str) and name not in self.names:
                self.names[name] = i

    def _list(self, *keys: str) -> list[Any]:
        node: Any = self.data
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, list) else []

    def error(self, path: Path, message: str) -> None:
        self.out.append(self.doc.at_value(path, message))

    def warning(self, path: Path, message: str) -> None:
        self.out.append(self.doc.at_value(path, message, "warning"))

    def run(self) -> list[Diagnostic]:
        self.unique_names()
        self.reserved_names()
        edges = self.references()
        cycles = self.cycles(edges)
        self.phases(edges)
        if not cycles:
            self.deadlines(edges)
        self.commands()
        self.users()
        self.binds()
        self.sandboxes()
        self.add_files()
        self.integrity()
        self.boot()
        self.kpis()
        return self.out

    # -- containers ---------------------------------------------------------

    def unique_names(self) -> None:
        for i, c in self.containers:
            name = c.get("name")
            if isinstance(name, str) and self.names.get(name) != i:
                first = self.doc.place(("containers", self.names[name], "name")).line
                self.error(("containers", i, "name"), f"duplicate container name '{name}' (first defined at line {first})")

    def reserved_names(self) -> None:
        for i, c in self.containers:
            name = c.get("name")
            problem = reserved.container_name_problem(name) if isinstance(name, str) else None
            if problem is not None:
                self.error(("containers", i, "name"), problem)

    def _unknown(self, ref: str) -> str:
        message = f"unknown container '{ref}'"
        guess = difflib.get_close_matches(ref, list(self.names), n=1, cutoff=0.6)
        if guess:
            return message + f" (did you mean '{guess[0]}'?)"
        return message + " (a unit outside this manifest needs its suffix, e.g. '" + ref + ".service')"

    def references(self) -> list[tuple[str, str, Path]]:
        """Check every ordering entry; return the start-order edges (first, then, entry path) among containers."""
        edges: list[tuple[str, str, Path]] = []
        for i, c in self.containers:
            own = c.get("name")
            ordering = c.get("ordering")
            if not isinstance(ordering, dict):
                continue
            for relation in ("after", "before", "requires", "wants"):
                entries = ordering.get(relation)
                for j, ref in enumerate(entries if isinstance(entries, list) else []):
                    if not isinstance(ref, str):
                        continue
                    path = ("containers", i, "ordering", relation, j)
                    target = container_of(ref, set(self.names))
                    if target is None:
                        if is_bare(ref):
                            self.error(path, self._unknown(ref))
                        continue
                    if target == own:
                        self.error(path, f"container '{own}' cannot be ordered against itself")
                        continue
                    if not isinstance(own, str):
                        continue
                    if relation == "after":
                        edges.append((target, own, path))
                    elif relation == "before":
                        edges.append((own, target, path))
        return edges

    def cycles(self, edges: list[tuple[str, str, Path]]) -> bool:
        """Report each start-order cycle once, at the entry that closes it."""
        graph: dict[str, list[tuple[str, Path]]] = {}
        for first, then, path in edges:
            graph.setdefault(first, []).append((then, path))
        state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done
        stack: list[str] = []
        reported: set[frozenset[str]] = set()

        def visit(node: str) -> None:
            state[node] = 1
            stack.append(node)
            for nxt, path in graph.get(node, []):
                if state.get(nxt) == 1:
                    loop = stack[stack.index(nxt):] + [nxt]
                    key = frozenset(loop)
                    if key not in reported:
                        reported.add(key)
                        self.error(path, "ordering cycle: " + " -> ".join(loop)
                                   + " (each must start before the next)")
                elif nxt not in state:
                    visit(nxt)
            stack.pop()
            state[node] = 2

        for name in self.names:
            if name not in state:
                visit(name)
        return bool(reported)

    def _phase(self, name: str) -> str | None:
        phase = self.data["containers"][self.names[name]].get("phase")
        return phase if phase in PHASES else None

    def phases(self, edges: list[tuple[str, str, Path]]) -> None:
        """A container cannot wait for one that starts in a later phase."""
        for first, then, path in edges:
            p_first, p_then = self._phase(first), self._phase(then)
            if p_first is None or p_then is None or PHASES.index(p_first) <= PHASES.index(p_then):
                continue
            if path[3] == "after":
                self.error(path, f"cannot start after '{first}': this container starts in phase {p_then}, "
                                 f"'{first}' only in the later phase {p_first}")
            else:
                self.error(path, f"cannot start before '{then}': this container starts in phase {p_first}, "
                                 f"'{then}' already in the earlier phase {p_then}")

    def deadlines(self, edges: list[tuple[str, str, Path]]) -> None:
        """A deadline earlier than one of a container that must be active first can never be the binding one."""
        preds: dict[str, set[str]] = {}
        for first, then, _ in edges:
            preds.setdefault(then, set()).add(first)

        def deadline(name: str) -> int | None:
            value = self.data["containers"][self.names[name]].get("deadline_ms")
            return value if _is_int(value) and value > 0 else None

        for name, index in self.names.items():
            own = deadline(name)
            if own is None:
                continue
            seen: set[str] = set()
            pending = list(preds.get(name, ()))
            worst: tuple[int, str] | None = None
            while pending:
                pred = pending.pop()
                if pred in seen:
                    continue
                seen.add(pred)
                pending.extend(preds.get(pred, ()))
                theirs = deadline(pred)
                if theirs is not None and theirs > own and (worst is None or theirs > worst[0]):
                    worst = (theirs, pred)
            if worst is not None:
                self.error(("containers", index, "deadline_ms"),
                           f"deadline {own} ms is earlier than the {worst[0]} ms deadline of '{worst[1]}', "
                           "which must be active first")

    def commands(self) -> None:
        for i, c in self.containers:
            image = c.get("image")
            kind = image.get("type") if isinstance(image, dict) else None
            if kind in ("directory", "tar") and "command" not in c:
                self.error(("containers", i), f"missing required key 'command' (a {kind} image has no default command)")
            command = c.get("command")
            for j, arg in enumerate(command if isinstance(command, list) else []):
                if not isinstance(arg, str):
                    continue
                problem = limits.executable_problem(arg) if j == 0 else None
                if problem is None and "\0" in arg:
                    problem = "contains a NUL byte, which no command line can hold"
                if problem is not None:
                    self.error(("containers", i, "command", j), f"{_short(arg)} {problem}")
            environment = c.get("environment")
            for key, value in (environment.items() if isinstance(environment, dict) else []):
                if isinstance(value, str) and "\0" in value:
                    self.error(("containers", i, "environment", key), "contains a NUL byte, which no environment "
                                                                       "variable can hold")

    def users(self) -> None:
        """A numeric UID[:GID] becomes User=/Group=: systemd refuses ids it cannot use (a fatal unit error)."""
        for i, c in self.containers:
            user = c.get("user")
            if not isinstance(user, str) or not re.fullmatch(r"[0-9]+(:[0-9]+)?", user):
                continue
            for what, value in zip(("uid", "gid"), user.split(":")):
                problem = limits.id_problem(value)
                if problem is not None:
                    self.error(("containers", i, "user"), f"{what} {problem}")

    def binds(self) -> None:
        for i, c in self.containers:
            seen: dict[str, int] = {}
            binds = c.get("binds")
            for j, bind in enumerate(binds if isinstance(binds, list) else []):
                for end in ("source", "target"):
                    value = bind.get(end) if isinstance(bind, dict) else None
                    problem = limits.list_path_problem(value) if isinstance(value, str) else None
                    if problem is not None:
                        self.error(("containers", i, "binds", j, end), f"{_short(value)} {problem}")
                target = bind.get("target") if isinstance(bind, dict) else None
                if not isinstance(target, str):
                    continue
                if target in seen:
                    self.error(("containers", i, "binds", j, "target"),
                               f"'{target}' is already a bind target (binds[{seen[target]}])")
                seen.setdefault(target, j)

    def sandboxes(self) -> None:
        """Relaxations that cannot mean what they say: a device listed twice, one
        bound from a different host path than its own, notify access without notify readiness."""
        for i, c in self.containers:
            sandbox = c.get("sandbox")
            if not isinstance(sandbox, dict):
                continue
            binds = c.get("binds") if isinstance(c.get("binds"), list) else []
            bound = {b.get("target"): (j, b.get("source")) for j, b in enumerate(binds) if isinstance(b, dict)}
            devices = sandbox.get("devices")
            seen: dict[str, int] = {}
            for j, device in enumerate(devices if isinstance(devices, list) else []):
                path = device.get("path") if isinstance(device, dict) else None
                if not isinstance(path, str):
                    continue
                where = ("containers", i, "sandbox", "devices", j, "path")
                if path in seen:
                    self.error(where, f"'{path}' is already listed (devices[{seen[path]}])")
                elif path in bound and bound[path][1] != path:
                    self.error(where, f"binds[{bound[path][0]}] puts '{bound[path][1]}' at '{path}'; a device "
                                      "is used at the path it has on the system")
                seen.setdefault(path, j)
            if "notify_access" in sandbox and c.get("readiness") != "notify":
                self.error(("containers", i, "sandbox", "notify_access"),
                           "notify_access only applies to a container with readiness: notify")

    # -- rootfs, integrity, boot --------------------------------------------

    def add_files(self) -> None:
        """What treeops.add_file would refuse, and paths bootimg writes itself (it would replace them)."""
        seen: dict[str, int] = {}
        names = [n for n in self.names if isinstance(n, str)]
        owned = reserved.root_paths(names)
        for j, item in enumerate(self._list("rootfs", "add_files")):
            path = item.get("path") if isinstance(item, dict) else None
            if not isinstance(path, str) or not IMAGE_PATH.match(path):
                continue
            where = ("rootfs", "add_files", j, "path")
            if path in seen:
                self.error(where, f"'{shown(path)}' is already added (add_files[{seen[path]}])")
            seen.setdefault(path, j)
            problem = image_path_problem(path) or reserved_path_problem(path, owned)
            if problem is not None:
                self.error(where, problem)
        for path, j in seen.items():
            for parent in parents(path):
                if parent in seen:
                    self.error(("rootfs", "add_files", j, "path"),
                               f"'{shown(path)}' is under '{shown(parent)}', which add_files[{seen[parent]}] adds "
                               "as a file")
                    break

    def integrity(self) -> None:
        integrity = self.data.get("integrity")
        if isinstance(integrity, dict) and integrity.get("fsverity") == "optional":
            self.warning(("integrity", "fsverity"),
                         "fs-verity is OPTIONAL: file contents are not verified and a tampered image still "
                         "boots; development images only, never ship this")

    def boot(self) -> None:
        boot = self.data.get("boot")
        if not isinstance(boot, dict):
            return
        if boot.get("on_verification_failure") == "emergency":
            self.warning(("boot", "on_verification_failure"),
                         "a failed verification opens an emergency shell on an unverified system; "
                         "development images only (use reboot)")
        self.initramfs(boot.get("initramfs"), boot.get("on_verification_failure"))
        for j, ref in enumerate(self._list("boot", "assessment", "requires")):
            if isinstance(ref, str) and is_bare(ref) and container_of(ref, set(self.names)) is None:
                self.error(("boot", "assessment", "requires", j), self._unknown(ref))
        indexed = [(j, a) for j, a in enumerate(self._list("boot", "kernel_args")) if isinstance(a, str)]
        args = [a for _, a in indexed]
        too_long = False
        for (j, arg), length in zip(indexed, limits.cmdline_lengths(args)):
            if arg.split("=", 1)[0] in reserved.DERIVED_KERNEL_ARGS:
                self.error(("boot", "kernel_args", j),
                           f"'{arg.split('=', 1)[0]}=' is set by the build from the image digest; remove it")
            problem = None if re.search(r"\s", arg) else limits.kernel_arg_problem(arg)  # whitespace: the schema's
            if problem is not None:
                self.error(("boot", "kernel_args", j), problem)
            if length > limits.CMDLINE_MAX and not too_long:  # reported at the argument that crosses it
                too_long = True
                self.error(("boot", "kernel_args", j), cmdline_message(args, length))

    def initramfs(self, profile: Any, on_failure: Any) -> None:
        """What dracut would refuse, or silently make unbootable: bootimg's own dracut modules
        omitted, a module both listed and omitted, a level its compressor does not have, the
        emergency policy without the initramfs's emergency shell. (Whether the root's kernel and
        dracut have the named drivers and modules is the build's boot check.)"""
        if not isinstance(profile, dict):
            return
        where = ("boot", "initramfs")
        modules = profile.get("modules")
        listed = {m: j for j, m in enumerate(modules) if isinstance(m, str)} if isinstance(modules, list) else None
        omitted: dict[str, int] = {}
        for j, name in enumerate(self._list(*where, "omit")):
            if not isinstance(name, str):
                continue
            omitted.setdefault(name, j)
            if name == reserved.DRACUT_MODULE or name in reserved.DRACUT_DEPENDS:
                why = ("it is bootimg's own dracut module (it verifies and mounts the root)"
                       if name == reserved.DRACUT_MODULE else "bootimg's dracut module depends on it")
                self.error((*where, "omit", j), f"'{name}' cannot be omitted: {why}")
            elif listed is not None and name in listed:
                self.error((*where, "omit", j), f"'{name}' is also in modules (modules[{listed[name]}]); a dracut module "
                                                "is either listed or omitted")
        level, compress = profile.get("compress_level"), profile.get("compress")
        if _is_int(level):
            if "compress" not in profile:
                self.error((*where, "compress_level"), "a level needs its compressor: add compress")
            elif compress in limits.COMPRESS_LEVELS:
                low, high = limits.COMPRESS_LEVELS[compress]
                if not low <= level <= high:
                    self.error((*where, "compress_level"), f"{compress} has levels {low}-{high}, not {level}")
        if on_failure == "emergency":
            for shell in EMERGENCY_SHELL:
                if shell in omitted:
                    self.error((*where, "omit", omitted[shell]), f"on_verification_failure is emergency: the initramfs "
                                                                  f"needs '{shell}' for its emergency shell")
                elif listed is not None and shell not in listed:
                    self.error((*where, "modules"), f"on_verification_failure is emergency: the initramfs needs dracut's "
                                                    f"'{shell}' module for its emergency shell; add it")

    # -- kpis -----------------------------------------------------------------

    def kpis(self) -> None:
        seen: dict[str, int] = {}
        for j, kpi in enumerate(self._list("kpis")):
            if not isinstance(kpi, dict):
                continue
            name = kpi.get("name")
            if isinstance(name, str):
                if name in seen:
                    first = self.doc.place(("kpis", seen[name], "name")).line
                    self.error(("kpis", j, "name"), f"duplicate KPI name '{name}' (first defined at line {first})")
                seen.setdefault(name, j)
            unit = kpi.get("unit")
            if kpi.get("measure") == "unit_active" and isinstance(unit, str) and is_bare(unit) \
                    and container_of(unit, set(self.names)) is None:
                self.error(("kpis", j, "unit"), self._unknown(unit))
            if kpi.get("since") == "userspace_start" and kpi.get("measure") in BEFORE_USERSPACE:
                self.error(("kpis", j, "since"),
                           f"'{kpi['measure']}' is reached before userspace starts; measure it since kernel_start")
            self.out.extend(self._thresholds(j, kpi))

    def _thresholds(self, j: int, kpi: dict[str, Any]) -> Iterator[Diagnostic]:
        warn, fail, hard = kpi.get("warn_ms"), kpi.get("fail_ms"), kpi.get("max_ms")
        if _is_int(warn) and _is_int(fail) and warn > fail:
            yield self.doc.at_value(("kpis", j, "warn_ms"), f"warn_ms {warn} is above fail_ms {fail}; "
                                                              "a KPI warns before it fails")
        if _is_int(hard) and _is_int(fail) and hard < fail:
            yield self.doc.at_value(("kpis", j, "max_ms"), f"max_ms {hard} (every boot) is below fail_ms {fail} "
                                                             "(the statistic); the per-boot limit must be looser")


# -- helpers ------------------------------------------------------------------------------------

IMAGE_PATH = re.compile(r"^(/(?!\.\.?(/|$))[^/]+)+$")  # schema.json's image_path: checked there


def _short(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "...'"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def shown(path: str) -> str:
    """A path for a one-line message: control characters escaped, a long one cut."""
    path = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", path)
    return path if len(path) <= 80 else path[:77] + "..."


def parents(path: str) -> Iterator[str]:
    """The proper ancestors of an absolute path, nearest first ('/a/b/c' -> '/a/b', '/a')."""
    while (path := path.rpartition("/")[0]):
        yield path


def image_path_problem(path: str) -> str | None:
    """Why an absolute image path cannot name a file in a composefs tree (what treeops refuses)."""
    raw = path.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        return "contains a NUL byte, which no file name can hold"
    if len(raw) > PATH_MAX:
        return f"is {len(raw)} bytes long; a path has at most {PATH_MAX}"
    for name in raw.split(b"/"):
        if len(name) > NAME_MAX:
            return (f"has a name of {len(name)} bytes ({_short(name.decode('utf-8', 'backslashreplace'))}); "
                    f"a file name has at most {NAME_MAX}")
    return None


def reserved_path_problem(path: str, owned: list[reserved.ReservedPath]) -> str | None:
    """Why bootimg's own files rule out adding a file at ``path``: it would replace it, or the file
    would sit where bootimg needs a directory, or under one of bootimg's files."""
    for entry in owned:
        if path == entry.path and entry.tree:
            return f"{entry.path} is bootimg's own directory ({entry.what}); a file cannot take its place"
        if path == entry.path:
            return f"bootimg writes {entry.path} itself ({entry.what}) and would replace this file"
        if entry.covers(path):
            return f"'{shown(path)}' is inside {entry.path}, which bootimg fills itself ({entry.what})"
        if entry.path.startswith(path + "/"):
            return f"'{shown(path)}' must stay a directory: bootimg writes {entry.path} there ({entry.what})"
        if path.startswith(entry.path + "/"):
            return f"'{shown(path)}' is under {entry.path}, a file bootimg writes itself ({entry.what})"
    return None


def cmdline_message(args: list[str], length: int) -> str:
    added = ", ".join(shown for shown, _ in limits.build_kernel_args(args))
    return (f"the kernel command line would be {length} bytes with this argument, over the {limits.CMDLINE_MAX} "
            f"the kernel keeps (COMMAND_LINE_SIZE {limits.COMMAND_LINE_SIZE} on x86_64 and arm64, with its NUL); "
            f"{limits.added_length(args)} of them are the build's and boot chain's ({added})")


def check(doc: Document, data: Any) -> list[Diagnostic]:
    """All semantic problems of the (normalized) manifest ``data``, positioned via ``doc``."""
    return Checker(doc, data).run()
