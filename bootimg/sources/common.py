"""What every source loader shares: the error type, the policy, the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..composefs.tree import INLINE_CONTENT_MAX, SCAN_INLINE_MAX, Node
from ..errors import BootimgError

GiB = 1 << 30


def show(name: bytes | str) -> str:
    """A member or path name for a one-line message: quoted, non-UTF-8 bytes as \\xNN and
    control characters (newlines included) escaped."""
    if isinstance(name, bytes):
        name = name.decode("utf-8", "backslashreplace")
    else:
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if len(name) > 300:
        name = name[:300] + "..."
    return "'" + "".join(c if c.isprintable() else repr(c)[1:-1] for c in name) + "'"


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class SourceError(BootimgError):
    """A source (directory, tar archive, OCI layout) that cannot be loaded, in one line:
    ``LABEL: PATH: [CONTEXT: ][member 'NAME': ]PROBLEM``, e.g.
    ``rootfs: /srv/root.tar: member '../x': path contains '..'``."""

    def __init__(self, problem: str, *, file: str | None, label: str | None = None,
                 context: str | None = None, member: bytes | str | None = None):
        self.label = label
        self.context = context
        self.member = member
        super().__init__(problem, file=file)

    def format(self) -> str:
        parts = []
        if self.label:
            parts.append(_one_line(self.label))
        if self.file is not None:
            parts.append(_one_line(self.file))
        if self.context:
            parts.append(_one_line(self.context))
        if self.member is not None:
            parts.append(f"member {show(self.member)}")
        parts.append(_one_line(self.message))
        return ": ".join(parts)


@dataclass(frozen=True)
class SourcePolicy:
    """What a source may contain. ``allow_devices`` None means: allowed for the root
    filesystem (label "rootfs"), refused for anything else (containers). "Devices" are the
    special files: character and block devices, FIFOs (and sockets, which only directory
    scans can meet). Sizes are of regular files' data; ``max_entries`` counts every archive
    member (whiteouts, directories and links included; for OCI images across all layers)
    or every file of a directory. ``inline_max``: regular files of 1..inline_max bytes are
    stored in the image, larger ones in the object store; 64 is what mkcomposefs' directory
    scan does, so a directory and a tar of it give the same image."""

    allow_devices: bool | None = None
    max_file_size: int = 16 * GiB
    max_total_size: int = 64 * GiB
    max_entries: int = 2_000_000
    inline_max: int = SCAN_INLINE_MAX

    @classmethod
    def for_rootfs(cls, **kw: Any) -> "SourcePolicy":
        return cls(allow_devices=True, **kw)

    @classmethod
    def for_container(cls, **kw: Any) -> "SourcePolicy":
        return cls(allow_devices=False, **kw)

    def devices_allowed(self, label: str) -> bool:
        return self.allow_devices if self.allow_devices is not None else label == "rootfs"

    def check(self) -> None:
        if not 0 <= self.inline_max <= INLINE_CONTENT_MAX:
            raise ValueError(f"inline_max must be 0..{INLINE_CONTENT_MAX}, not {self.inline_max}")
        for name in ("max_file_size", "max_total_size", "max_entries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


@dataclass
class SourceStats:
    entries: int = 0          # nodes in the final tree (root included, hardlinks counted)
    files: int = 0            # regular files (each hardlinked inode once)
    bytes: int = 0            # their data
    objects_added: int = 0    # objects newly created in the store by this load
    bytes_added: int = 0      # their data


@dataclass
class LoadedSource:
    root: Node                              # ready for write_image; every object is stored
    oci_config: dict | None = None          # OCI image config's "config" section (OCI only)
    stats: SourceStats = field(default_factory=SourceStats)
