"""What is installed on a device, read from the loader's entries (the truth of what can boot)
and the releases they point at on the data partition."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..boot import loader
from ..boot.partition import RELEASES
from ..errors import BootimgError
from ..release import layout
from ..release.description import parse_release
from ..release.layout import ReleaseDir
from ..signing import PublicKey, SignatureError
from .target import Target


@dataclass
class Installed:
    """One boot entry and the release it boots."""

    entry: loader.EntryName
    options: str                     # the entry's kernel command line
    release_path: str | None         # bootimg.release= of the entry
    dir: Path | None                 # that release's directory on the data partition (None: missing)
    release: dict | None             # its release.json (None: missing or unreadable)

    @property
    def state(self) -> str:
        return self.entry.state

    @property
    def version(self) -> str:
        return self.release["version"] if self.release else (self.release_path or "").rsplit("/", 1)[-1]

    @property
    def name(self) -> str | None:
        return self.release["name"] if self.release else None


def version_compare(a: str, b: str) -> int:
    """Versions compared the way systemd-boot sorts entries: runs of digits as numbers, the
    rest as text (<0, 0, >0 like strverscmp)."""
    for x, y in zip(re.split(r"(\d+)", a), re.split(r"(\d+)", b)):
        if x == y:
            continue
        if x.isdigit() and y.isdigit():
            return (int(x) > int(y)) - (int(x) < int(y))
        return (x > y) - (x < y)
    return (len(a) > len(b)) - (len(a) < len(b))


def boot_order(items: list[Installed]) -> list[Installed]:
    """The entries in the loader's order: bad ones (no tries left) last, newest version first."""
    def compare(x: Installed, y: Installed) -> int:
        return ((x.state == "bad") - (y.state == "bad")) or -version_compare(x.version, y.version)
    return sorted(items, key=functools.cmp_to_key(compare))


def list_installed(target: Target) -> list[Installed]:
    out = []
    for name, keys in target.esp.entries():
        options = keys.get("options", "")
        path = loader.cmdline_value(options, "bootimg.release")
        directory = release = None
        if path and path.startswith(RELEASES + "/") and ".." not in path.split("/"):
            candidate = target.data.at(path)
            if candidate.is_dir():
                directory = candidate
                try:
                    release = parse_release((candidate / layout.RELEASE_JSON).read_bytes(), str(candidate))
                except (OSError, BootimgError):
                    release = None
        out.append(Installed(name, options, path, directory, release))
    return boot_order(out)


def newest_good(target: Target) -> Installed | None:
    """The release the device boots by default: the newest good one (else the newest that is
    not bad), when its release directory is there."""
    items = [i for i in list_installed(target) if i.release is not None]
    for want in ("good", "trying"):
        for item in items:
            if item.state == want:
                return item
    return None


def release_dir(target: Target, item: Installed) -> ReleaseDir:
    return ReleaseDir(item.dir, objects=target.data.objects)


def carried_keys(target: Target, item: Installed) -> list[PublicKey]:
    """The release keys an installed release's root image carries (what it trusts)."""
    rel = release_dir(target, item)
    root = rel.load_image(item.release["root"]["image"]).root
    keys_dir = root.lookup(layout.ROOT_KEYS_DIR.lstrip("/").encode())
    keys = []
    for name, node in keys_dir.sorted_children() if keys_dir is not None else []:
        data = rel.read_file(node)
        if data is None:
            continue
        try:
            keys.append(PublicKey.from_bytes(data, file=name.decode("utf-8", "replace")))
        except SignatureError:
            continue
    return keys


def data_partuuid(target: Target) -> str:
    """The data partition's PARTUUID, from an installed entry's ``root=PARTUUID=``."""
    for _name, keys in target.esp.entries():
        root = loader.cmdline_value(keys.get("options", ""), "root")
        if root and root.startswith("PARTUUID="):
            return root[len("PARTUUID="):]
    raise BootimgError(f"{target.where}: no installed entry says which partition is the data partition (root=PARTUUID=)")


def booted_release(target: Target) -> str | None:
    """The release path the device booted (from booted.json), if on the device."""
    if not target.booted:
        return None
    return target.booted.get("release")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """The data partition's lock: installs and garbage collection take turns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"bootimg: {path}: waiting for another install or gc to finish", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def loader_entry_selected() -> str | None:
    """The entry systemd-boot booted (its LoaderEntrySelected EFI variable), on the device."""
    var = Path("/sys/firmware/efi/efivars/LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f")
    try:
        raw = var.read_bytes()[4:]          # 4 bytes of attributes, then UTF-16LE with a NUL
    except OSError:
        return None
    return raw.decode("utf-16-le", "replace").rstrip("\0") or None


def reason(item: Installed) -> str:
    """Why the entry is in its state, in words."""
    boot = (item.release or {}).get("boot", {})
    good_when = boot.get("good_when") or []
    needs = f"boot-complete.target (which requires {', '.join(good_when)})" if good_when else "boot-complete.target"
    if item.state == "bad":
        return (f"its {item.entry.done if item.entry.done is not None else boot.get('tries', '?')} tries were used up: "
                f"no boot reached {needs}; the loader boots it only when it is picked")
    if item.state == "trying":
        return f"being tried: {item.entry.left} tries left; good once a boot reaches {needs}"
    return "good: blessed by a boot that reached boot-complete.target, or installed without boot counting"


def json_ready(item: Installed) -> dict:
    return {"entry": item.entry.filename, "id": item.entry.id, "state": item.state, "reason": reason(item),
            "tries_left": item.entry.left,
            "tries_done": item.entry.done, "version": item.version, "release_path": item.release_path,
            "release_present": item.dir is not None,
            "security_version": (item.release or {}).get("security_version"),
            "root_digest": (item.release or {}).get("root", {}).get("digest")}

