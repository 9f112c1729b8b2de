"""``bootimg gc``: remove what nothing installed refers to.

What the loader can boot is the truth: every release a boot entry on the ESP points at is kept
(good, being tried, or bad: the menu can still boot it), and so is the release the device booted
and any release an entry is being staged for. Removed: release directories no entry points at
(and temporaries of interrupted installs), the ESP's kernel directories no entry uses, and the
objects no kept release's image references. It takes the data partition's lock, so it cannot
run while an install does.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field

from ..boot import loader
from ..boot.partition import LOCK, release_path
from ..composefs.info import list_objects
from ..composefs.store import ObjectStore
from ..errors import BootimgError
from ..release import layout
from . import installed
from .target import Target


@dataclass
class GcResult:
    kept_releases: list[str] = field(default_factory=list)
    removed_releases: list[str] = field(default_factory=list)
    removed_kernel_dirs: list[str] = field(default_factory=list)
    objects_kept: int = 0
    objects_removed: int = 0
    bytes_freed: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d


def referenced_objects(target: Target, release_dir) -> set[bytes]:
    """Digests of every object an installed release's images reference."""
    rel = layout.ReleaseDir(release_dir, objects=target.data.objects)
    try:
        release = json.loads((release_dir / layout.RELEASE_JSON).read_text())
        names = list(release["images"])
    except (OSError, ValueError, KeyError, TypeError):
        raise BootimgError("unreadable release.json: gc keeps everything rather than guess",
                           file=str(release_dir)) from None
    out = set()
    for name in names:
        image = rel.load_image(name)
        out.update(bytes.fromhex(o.decode().replace("/", "")) for o in list_objects(image.root))
    return out


def gc(target: Target, *, dry_run: bool = False) -> GcResult:
    t0 = time.monotonic()
    data = target.data
    result = GcResult()
    with installed.locked(data.at(LOCK)):
        items = installed.list_installed(target)
        keep = {i.release_path for i in items if i.release_path}
        booted = installed.booted_release(target)
        if booted:
            keep.add(booted)
        kernel_dirs = {loader.kernel_dir(i.release["name"], i.release["version"]) for i in items if i.release}
        result.kept_releases = sorted(keep)
        referenced: set[bytes] = set()
        for path in sorted(keep):
            d = data.at(path)
            if d.is_dir():
                referenced |= referenced_objects(target, d)
        if data.releases.is_dir():
            for child in sorted(data.releases.iterdir()):
                rel = f"{release_path(child.name)}" if not child.name.startswith(".") else None
                if rel in keep:
                    continue
                if child.is_dir() and not child.is_symlink() and (
                        child.name.startswith(".") or (child / layout.RELEASE_JSON).is_file()):
                    result.removed_releases.append(rel or str(child.relative_to(data.root)))
                    if not dry_run:
                        shutil.rmtree(child)
        for name in target.esp.listdir("bootimg"):
            for version in target.esp.listdir(f"bootimg/{name}"):
                kdir = f"bootimg/{name}/{version}"
                if kdir not in kernel_dirs:
                    result.removed_kernel_dirs.append(kdir)
                    if not dry_run:
                        target.esp.remove(kdir)
        store = ObjectStore(data.objects, fsync=False, on_notice=lambda _m: None)
        result.objects_removed, result.bytes_freed, result.objects_kept = store.prune(referenced, dry_run=dry_run)
    result.seconds = time.monotonic() - t0
    return result
