"""What a container runs, as whom and with which environment: the manifest's settings over its
image's OCI config, checked against the image's tree.

A module of its own because it is the one place that reads the image for the units: the
command must exist and be executable in the image (a bare name is looked up on the image's
PATH), and user and group names become the image's numeric ids (systemd would look names up
in the host's user database, not the image's). The units (``units.py``) only write down what
this returns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import BootimgError
from ..manifest import limits
from ..manifest.model import Container, Manifest
from .image_view import ContainerImage
from .unit_syntax import exec_line

# What a runtime searches for a bare command name when the image sets no PATH (runc/crun).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Resolved:
    """A container's command line, environment, user, group and working directory, as the units
    write them."""

    argv: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]   # sorted by name
    user: str | None = None
    group: str | None = None
    workdir: str | None = None
    notes: tuple[str, ...] = field(default=())  # "# bootimg: ..." comments for the units


def _fail(manifest: Manifest, message: str) -> BootimgError:
    return BootimgError(message, file=str(manifest.source_file or "manifest"))


def resolve(manifest: Manifest, c: Container, config: Mapping | None = None,
            image: ContainerImage | None = None) -> Resolved:
    """The command, environment, user and working directory container ``c`` runs with:
    the manifest's settings over its OCI image config (``config``: the config's "config"
    object). With ``image`` the command is checked to exist and be executable in the image,
    a bare command name is looked up on the image's PATH, and user/group names are turned
    into the image's numeric ids (systemd would look names up on the host, not the image)."""
    config = config or {}
    notes: list[str] = []
    # Environment: the image's Env, then the manifest's on top.
    env: dict[str, str] = {}
    for item in config.get("Env") or []:
        key, sep, value = str(item).partition("=")
        if not sep:
            continue
        if not _ENV_NAME.match(key):
            raise _fail(manifest, f"container '{c.name}': the image's environment variable {key!r} is not a "
                                  "valid name for systemd")
        env[key] = value
    env.update(c.environment)
    # Command: the manifest's, else the image's Entrypoint + Cmd.
    if c.command is not None:
        argv = list(c.command)
    else:
        argv = [str(a) for a in (config.get("Entrypoint") or [])] + [str(a) for a in (config.get("Cmd") or [])]
        if not argv:
            raise _fail(manifest, f"container '{c.name}': no command: the manifest sets none and its image "
                                  "configures no Entrypoint or Cmd")
        notes.append("# bootimg: command from the image's OCI config (Entrypoint + Cmd)")
    if image is not None:
        argv[0] = _find_command(manifest, c, argv[0], env.get("PATH", DEFAULT_PATH), image)
    exec_line(argv, container=c.name)  # refuses what systemd cannot run
    # User: the manifest's, else the image's.
    spec = c.user if c.user is not None else (config.get("User") or None)
    user = group = None
    if spec:
        if c.user is None:
            notes.append(f"# bootimg: user {spec} from the image's OCI config")
        user, group = _user_group(manifest, c, spec, image, notes)
    workdir = config.get("WorkingDir") or None
    return Resolved(argv=tuple(argv), environment=tuple(sorted(env.items())), user=user, group=group,
                    workdir=workdir, notes=tuple(notes))


def _find_command(manifest: Manifest, c: Container, cmd: str, path_env: str, image: ContainerImage) -> str:
    if "/" in cmd:
        if not cmd.startswith("/"):
            raise _fail(manifest, f"container '{c.name}': command {cmd!r} is a relative path")
        if not image.is_executable(cmd):
            node = image.resolve(cmd)
            what = "is not in its image" if node is None else "is not an executable file in its image"
            raise _fail(manifest, f"container '{c.name}': command {cmd} {what}")
        return cmd
    for d in path_env.split(":"):
        if d.startswith("/") and image.is_executable(f"{d.rstrip('/')}/{cmd}"):
            return f"{d.rstrip('/')}/{cmd}"
    raise _fail(manifest, f"container '{c.name}': command {cmd!r} is not on the image's PATH ({path_env})")


def _user_group(manifest: Manifest, c: Container, spec: str, image: ContainerImage | None,
                notes: list[str]) -> tuple[str, str | None]:
    user, _, group = spec.partition(":")
    out_group: str | None = group or None
    if not user.isdigit() and image is not None:
        found = image.lookup_id("passwd", user)
        if found is None:
            raise _fail(manifest, f"container '{c.name}': user '{user}' is not in its image's /etc/passwd")
        notes.append(f"# bootimg: user {user} is {found[0]} in the image's /etc/passwd")
        user = str(found[0])
        if out_group is None and found[1] is not None:
            out_group = str(found[1])
    elif user.isdigit() and out_group is None and image is not None:
        for line in (image.read("/etc/passwd") or b"").decode("utf-8", "replace").splitlines():
            fields = line.split(":")
            if len(fields) > 3 and fields[2] == user and fields[3].isdigit():
                out_group = fields[3]
                break
    if out_group is not None and not out_group.isdigit() and image is not None:
        found = image.lookup_id("group", out_group)
        if found is None:
            raise _fail(manifest, f"container '{c.name}': group '{out_group}' is not in its image's /etc/group")
        out_group = str(found[0])
    for value in (user, out_group):
        if value is not None and not re.fullmatch(r"[0-9]+|[a-z_][a-z0-9_-]{0,31}", value):
            raise _fail(manifest, f"container '{c.name}': invalid user or group {value!r}")
        problem = limits.id_problem(value) if value is not None and value.isdigit() else None
        if problem is not None:
            raise _fail(manifest, f"container '{c.name}': user or group {problem}")
    return user, out_group
