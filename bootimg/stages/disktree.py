"""The stage ``org.bootimg.disk-tree``: what a release's disk holds, for osbuild's own stages
to put on partitions.

``bootimg disk`` makes the whole GPT disk itself; in osbuild the disk is made the osbuild way,
by upstream stages (org.osbuild.truncate, .sfdisk, .write-device, .mkfs.ext4, .copy onto the
mounted partition), and this stage gives them what only bootimg knows, in its tree:

- ``/esp.img``: the ESP, a FAT file system of ``esp-size`` bytes holding what ``bootimg disk``
  puts there (systemd-boot, loader.conf, the release's Type #1 entry with its kernel, initramfs
  and command line), made by mkfs.vfat + mcopy like ``bootimg disk``'s; every file in it is
  bootimg's, and a FAT image needs no FAT mount (org.osbuild.write-device writes it);
- ``/data``: the data partition's files (``/bootimg/releases/VERSION`` and ``/bootimg/objects``, the
  release and its objects, and
  ``/bootimg/state/var``, the root image's /var as the persistent /var), with owners, modes,
  xattrs and times, for ``cp -a`` (org.osbuild.copy) onto the ext4 org.osbuild.mkfs.ext4 makes.

Options: ``release`` (the release directory, e.g. ``input://release/composefs``), ``kernel``
and ``initrd`` (what ``bootimg initramfs`` makes for the release), ``data-partuuid`` (the data
partition's GPT UUID, the one the sfdisk stage gives it: the command line finds the data
partition by it), ``esp-size``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..boot import loader
from ..boot.partition import release_path
from ..disk import esp as espmod
from ..disk import fs
from ..disk.image import MiB, data_entries, disk_seed, read_release
from ..disk.initramfs import BootFiles, root_arch
from ..errors import BootimgError
from ..release.layout import ReleaseDir
from . import locations

NAME = "org.bootimg.disk-tree"


def run(args: Mapping[str, Any], metadata: Callable[[dict], None] | None = None) -> dict:
    """Write ``esp.img`` and ``data/`` into the stage's tree; returns the metadata (the kernel
    command line and the entry), also given to ``metadata``. Raises BootimgError."""
    options, inputs = args["options"], args.get("inputs") or {}
    rel = ReleaseDir(locations.resolve(options["release"], inputs))
    release = read_release(rel)
    root = rel.load_image(release["root"]["image"]).root
    arch = root_arch(rel, root)
    boot = BootFiles(kernel=Path(locations.resolve(options["kernel"], inputs)),
                     initrd=Path(locations.resolve(options["initrd"], inputs)),
                     kver="", arch=arch.name, key="", cached=False, seconds=0.0)
    cmdline = loader.kernel_cmdline(release, options["data-partuuid"].lower(), release_path(release["version"]))
    tree = Path(args["tree"])
    epoch = int(release["source_date_epoch"])
    with tempfile.TemporaryDirectory(prefix="bootimg-esp-") as work:
        sd_boot_from, payload = espmod.write_tree(Path(work) / "esp", Path(work), rel, release, root, arch, boot, cmdline)
        if payload + 4 * MiB > options["esp-size"]:
            raise BootimgError(f"esp-size {options['esp-size']} is too small for the kernel and initramfs "
                               f"({payload} bytes)", file="options", where="esp-size")
        fs.vfat_from_dir(Path(work) / "esp", tree / "esp.img", options["esp-size"], label="ESP",
                         seed=f"{disk_seed(release)}/esp", epoch=epoch)
    (tree / "data").mkdir()
    # Every xattr of the root's /var is kept: cp -a copies what mke2fs -d from a tar cannot.
    content, count = fs.write_dir(data_entries(rel, release, root, epoch), tree / "data")
    info = {"entry": loader.entry_id(release["name"], release["version"]), "cmdline": cmdline, "systemd-boot": sd_boot_from,
            "data": {"bytes": content, "entries": count}}
    if metadata is not None:
        metadata(info)
    return info
