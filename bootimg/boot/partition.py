"""The data partition's layout: the part of the boot contract (docs/boot-design.md) that the
disk, the installer and bootimg-setup-root share.

Several releases live side by side over one shared, content-addressed object store::

    /bootimg/objects/xx/<62 hex>        every installed release's objects, each once
    /bootimg/releases/<version>/        release.json, release.json.minisig, images/NAME.cfs
                                        (and boot/: the kernel + initramfs it was installed with)
    /bootimg/state/var/                 the persistent /var
    /bootimg/state/rollback             the rollback minimum (security_version), decimal
    /bootimg/state/.provisioned         fs-verity is enabled on everything
    /bootimg/state/.lock                installs and garbage collection take turns on it

A release boots from the kernel command line's ``bootimg.release=/bootimg/releases/<version>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..manifest import reserved

TOP = "/bootimg"
OBJECTS = f"{TOP}/objects"
RELEASES = reserved.RELEASES_PATH
STATE = f"{TOP}/state"
VAR = f"{STATE}/var"
ROLLBACK_FILE = f"{STATE}/rollback"
PROVISIONED = f"{STATE}/.provisioned"
LOCK = f"{STATE}/.lock"
ROLLBACK_NV_INDEX = 0x01500016         # the TPM 2.0 NV counter holding the rollback minimum
BOOT_FILES = "boot"                     # in a release directory: vmlinuz, initrd.img, info.json (layout.BOOT_DIR)
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}$")   # identity.version's pattern


def release_path(version: str) -> str:
    """The absolute path (on the data partition) of the release ``version``."""
    if not _VERSION.match(version):
        raise ValueError(f"not a release version: {version!r}")
    return f"{RELEASES}/{version}"


@dataclass(frozen=True)
class DataPartition:
    """The data partition mounted (or staged) at ``root``."""

    root: Path

    def at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def objects(self) -> Path:
        return self.at(OBJECTS)

    @property
    def releases(self) -> Path:
        return self.at(RELEASES)

    @property
    def state(self) -> Path:
        return self.at(STATE)

    def release(self, version: str) -> Path:
        return self.at(release_path(version))
