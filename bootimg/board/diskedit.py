"""Offline edits of a disk's data partition (ext4) with debugfs: nothing is mounted.

``disk`` is a disk made by ``bootimg disk`` (its ``bootimg-data`` partition is edited) or a bare
ext4 image.

The tests use them to play the attacker (replace an object, a root image, a signature) on a
private copy of a provisioned disk. A file written here has no fs-verity; removing the
provisioning marker (``unprovision``) makes the next boot's initramfs enable it on the new file,
which is what an attacker with write access to the partition could do too: then only the digest
recorded in the signed image stands between the file and the system.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from ..disk.gpt import data_partition_offset
from ..host import HostError, need_tools

PROVISIONED_MARKER = "/bootimg/state/.provisioned"


def _fs(disk: str | os.PathLike[str]) -> str:
    """debugfs's name for the data partition's file system (``DISK?offset=N`` inside a GPT disk)."""
    offset = data_partition_offset(disk)
    return f"{disk}?offset={offset}" if offset else str(disk)


def debugfs(disk: str | os.PathLike[str], commands: Iterable[str], *, write: bool = True) -> str:
    """Run debugfs commands on ``disk``; any "error"/"not found" line is an error."""
    need_tools("debugfs")
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as f:
        f.write("\n".join(commands) + "\n")
        f.flush()
        proc = subprocess.run(["debugfs", *(["-w"] if write else []), "-f", f.name, _fs(disk)],
                              capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    bad = [line for line in out.splitlines()
           if line.strip() and not line.startswith("debugfs ") and
           any(w in line for w in ("rror", "not found", "File exists", "No such", "Invalid"))]
    if proc.returncode != 0 or bad:
        raise HostError(f"debugfs on {disk}: {(bad or out.splitlines() or ['failed'])[-1].strip()}")
    return out


def replace_file(disk: str | os.PathLike[str], path: str, data: bytes, *, mode: int = 0o644) -> None:
    """Put ``data`` at ``path`` (absolute, in the image), replacing what is there."""
    p = PurePosixPath(path)
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
        host = f.name
    try:
        cmds = [f"cd {p.parent}"]
        if exists(disk, path):
            cmds.append(f"rm {p.name}")
        cmds += [f"write {host} {p.name}", f"sif {p.name} mode 0{0o100000 | mode:o}",
                 f"sif {p.name} uid 0", f"sif {p.name} gid 0"]
        debugfs(disk, cmds)
    finally:
        os.unlink(host)


def remove(disk: str | os.PathLike[str], path: str) -> None:
    debugfs(disk, [f"rm {path}"])


def exists(disk: str | os.PathLike[str], path: str) -> bool:
    need_tools("debugfs")
    proc = subprocess.run(["debugfs", "-R", f"stat {path}", _fs(disk)], capture_output=True, text=True)
    return proc.returncode == 0 and "Inode:" in proc.stdout


def read_file(disk: str | os.PathLike[str], path: str) -> bytes:
    need_tools("debugfs")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "f"
        debugfs(disk, [f"dump {path} {out}"], write=False)
        if not out.exists():
            raise HostError(f"debugfs on {disk}: cannot read {path}")
        return out.read_bytes()


def unprovision(disk: str | os.PathLike[str]) -> None:
    """Remove the provisioning marker: the next boot enables fs-verity on files lacking it."""
    if exists(disk, PROVISIONED_MARKER):
        remove(disk, PROVISIONED_MARKER)


def tamper_object(disk: str | os.PathLike[str], image: str | os.PathLike[str], path: str,
                  change: Callable[[bytes], bytes], *, mode: int = 0o644) -> str:
    """The attacker's edit of an image's file: the object that holds ``path`` in ``image`` (one
    of a release's .cfs) rewritten on the disk's shared store as ``change`` makes it, and the
    disk unprovisioned so that the next boot gives it fs-verity of its own. Returns the object's
    name (relative to the store)."""
    from ..composefs.reader import load_image

    node = load_image(image).root.lookup(path.lstrip("/").encode())
    if node is None or not node.payload:
        raise HostError(f"{image}: {path} is not a file in the object store")
    obj = node.payload.decode()
    stored = f"/bootimg/objects/{obj}"
    replace_file(disk, stored, change(read_file(disk, stored)), mode=mode)
    unprovision(disk)
    return obj


__all__ = ["debugfs", "replace_file", "remove", "exists", "read_file", "unprovision", "tamper_object",
           "PROVISIONED_MARKER"]
