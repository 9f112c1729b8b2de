"""Where ``install``, ``gc`` and ``status`` work: the running device, a mounted data partition
and ESP, or a disk image.

- On the device (a system booted by bootimg: ``/run/bootimg/booted.json`` exists): the data
  partition is the physical root at ``/sysroot`` (the boot contract keeps it there), the ESP is
  the mounted one that holds ``loader/`` (``/efi``, ``/boot/efi`` or ``/boot``: systemd's
  gpt-auto generator mounts it at ``/efi``), and the booted release is known.
- ``--root DIR --esp DIR``: a data partition and an ESP mounted by the caller.
- ``--disk IMG``: a disk ``bootimg disk`` made. Its data partition is loop-mounted (root
  needed); its ESP is reached with mtools, without mounting.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..boot.partition import DataPartition
from ..disk.gpt import DATA_LABEL, ESP_TYPE, partitions
from ..errors import BootimgError
from ..host import need_root, need_tools, run
from .esp import DirEsp, Esp, ImageEsp

BOOTED_JSON = Path("/run/bootimg/booted.json")
PHYSICAL_ROOT = Path("/sysroot")
ESP_MOUNTS = (Path("/efi"), Path("/boot/efi"), Path("/boot"))


@dataclass
class Target:
    data: DataPartition
    esp: Esp
    where: str                       # for messages: "this device", a path, a disk
    booted: dict | None = None       # /run/bootimg/booted.json on the device
    data_partuuid: str | None = None  # the data partition's PARTUUID, when known

    @property
    def on_device(self) -> bool:
        return self.booted is not None


def _esp_on_device() -> Path:
    for path in ESP_MOUNTS:
        if (path / "loader").is_dir():
            return path
    raise BootimgError("no ESP with a loader/ directory is mounted (looked in /efi, /boot/efi, /boot); "
                       "systemd's gpt-auto generator mounts it at /efi when the root has an empty /efi")


@contextlib.contextmanager
def open_target(*, root: str | None = None, esp: str | None = None, disk: str | None = None,
                write: bool = True) -> Iterator[Target]:
    """The target the options name (see the module doc); mounts are undone on the way out."""
    if disk is not None:
        if root is not None or esp is not None:
            raise BootimgError("--disk and --root/--esp exclude each other")
        with _disk_target(Path(disk), write) as target:
            yield target
        return
    if root is not None or esp is not None:
        if root is None or esp is None:
            raise BootimgError("--root and --esp go together (the data partition and the ESP, both mounted)")
        for path in (root, esp):
            if not Path(path).is_dir():
                raise BootimgError("not a directory", file=path)
        yield Target(DataPartition(Path(root)), DirEsp(esp), where=str(root))
        return
    if not BOOTED_JSON.is_file():
        raise BootimgError("this system was not booted by bootimg (no /run/bootimg/booted.json): "
                           "give --root DIR --esp DIR or --disk IMG")
    try:
        booted = json.loads(BOOTED_JSON.read_text())
    except (OSError, ValueError) as err:
        raise BootimgError(f"cannot read: {err}", file=str(BOOTED_JSON)) from None
    yield Target(DataPartition(PHYSICAL_ROOT), DirEsp(_esp_on_device()), where="this device", booted=booted)


@contextlib.contextmanager
def _disk_target(disk: Path, write: bool) -> Iterator[Target]:
    if not disk.is_file():
        raise BootimgError("disk image not found", file=str(disk))
    parts = partitions(disk)
    esp = next((p for p in parts.values() if p.type == ESP_TYPE), None)
    data = parts.get(DATA_LABEL)
    if esp is None or data is None:
        raise BootimgError(f"not a bootimg disk (no ESP and {DATA_LABEL} partitions)", file=str(disk))
    need_root("working on a disk image's data partition (a loop mount)")
    need_tools("mount", "umount")
    with tempfile.TemporaryDirectory(prefix="bootimg-disk-") as tmp:
        mnt = Path(tmp) / "data"
        mnt.mkdir()
        opts = f"loop,offset={data.offset},sizelimit={data.size}" + ("" if write else ",ro")
        run(["mount", "-t", "ext4", "-o", opts, str(disk), str(mnt)], what=f"mounting the data partition of {disk}")
        try:
            yield Target(DataPartition(mnt), ImageEsp(disk, esp.offset), where=str(disk),
                         data_partuuid=data.uuid)
        finally:
            subprocess.run(["sync", "-f", str(mnt)], check=False)
            run(["umount", str(mnt)], what=f"unmounting the data partition of {disk}")
            os.sync()
