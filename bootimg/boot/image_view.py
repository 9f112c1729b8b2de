"""A built image's tree seen from inside: paths resolved the way the container (or the booted
root) will see them, with symlinks followed inside the image, and files read back through the
release's object store.

Its own module because more than the units read images this way: the container units check
commands and look up users in it, the boot check (``preflight``) and the disk's initramfs look
for the kernel in the root with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..composefs.tree import Node
from ..release.layout import ReleaseDir

SYMLINK_HOPS = 40


@dataclass
class ContainerImage:
    """An image's tree as built: a container's (to check its command and read its /etc/passwd)
    or the root's (to find its kernel).

    ``release`` is the release directory whose object store holds its external files (None:
    only inline content can be read)."""

    root: Node
    release: ReleaseDir | None = None

    def resolve(self, path: str, *, follow_last: bool = True) -> Node | None:
        """The node at absolute ``path``, following symlinks inside the image (an absolute
        link target means the image's root, as it will be under RootDirectory=)."""
        pending = [c for c in path.encode("utf-8", "surrogateescape").split(b"/") if c][::-1]
        stack = [self.root]
        hops = 0
        while pending:
            comp = pending.pop()
            if comp == b".":
                continue
            if comp == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            cur = stack[-1].target()
            if cur.children is None:
                return None
            child = cur.children.get(comp)
            if child is None:
                return None
            node = child.target()
            if node.is_symlink() and (pending or follow_last):
                hops += 1
                if hops > SYMLINK_HOPS or node.payload is None:
                    return None
                if node.payload.startswith(b"/"):
                    stack = [self.root]
                pending.extend(c for c in reversed(node.payload.split(b"/")) if c)
                continue
            stack.append(node)
        return stack[-1].target()

    def read(self, path: str) -> bytes | None:
        node = self.resolve(path)
        if node is None or not node.is_reg():
            return None
        if node.content is not None:
            return bytes(node.content)
        if node.size == 0:
            return b""
        return self.release.read_file(node) if self.release is not None else None

    def is_executable(self, path: str) -> bool:
        node = self.resolve(path)
        return node is not None and node.is_reg() and bool(node.mode & 0o111)

    def lookup_id(self, db: str, name: str) -> tuple[int, int | None] | None:
        """(id, primary gid) of ``name`` in the image's /etc/passwd (db "passwd") or
        /etc/group (db "group"; no primary gid)."""
        data = self.read(f"/etc/{db}")
        if data is None:
            return None
        for line in data.decode("utf-8", "replace").splitlines():
            fields = line.split(":")
            if len(fields) >= 3 and fields[0] == name and fields[2].isdigit():
                gid = int(fields[3]) if db == "passwd" and len(fields) > 3 and fields[3].isdigit() else None
                return int(fields[2]), gid
        return None
