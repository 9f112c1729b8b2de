"""Where things live: in a release directory, and inside the root image.

A release directory (``bootimg build -o OUT``) is what gets installed on the ECU's data
partition, next to nothing else::

    OUT/release.json            what was built: every image, its fs-verity digest, the kernel arg
    OUT/release.json.minisig    its signature (trust profile "signed")
    OUT/images/NAME.cfs         one composefs image per root and per container
    OUT/images/NAME.cfs.p7s     fs-verity PKCS#7 signature (with --verity-key/--verity-cert)
    OUT/keys/fsverity-cert.pem  the certificate for those (kernel .fs-verity keyring)
    OUT/objects/xx/...          the one object store shared by every image
    OUT/sharing.json            how much the images share (a report, not used at boot)
    OUT/sandbox.json            each container unit's systemd-analyze security exposure (a report)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import fsutil
from ..composefs.reader import Image, load_image
from ..composefs.tree import Node
from ..errors import BootimgError

# The root image's name and the paths bootimg writes inside it are defined with the manifest,
# whose checks refuse a container name or added file that would collide with them.
from ..manifest.reserved import (  # noqa: F401  (part of this module's names)
    KERNEL_DIGEST_PREFIX,
    ROOT_CONTAINERS_JSON,
    ROOT_DATA_DIR,
    ROOT_IMAGE_NAME,
    ROOT_KEYS_DIR,
)

RELEASE_FORMAT = "bootimg-release/1"
RELEASE_JSON = "release.json"
RELEASE_SIG = "release.json.minisig"
IMAGES_DIR = "images"
OBJECTS_DIR = "objects"
KEYS_DIR = "keys"
VERITY_CERT = "keys/fsverity-cert.pem"
SHARING_JSON = "sharing.json"
SANDBOX_JSON = "sandbox.json"
# Every name a release directory can hold at its top level, and nothing else.
BOOT_DIR = "boot"           # vmlinuz, initrd.img, info.json: `bootimg initramfs RELEASE -o RELEASE/boot`
RELEASE_ENTRIES = frozenset((RELEASE_JSON, RELEASE_SIG, IMAGES_DIR, OBJECTS_DIR, KEYS_DIR, SHARING_JSON,
                             SANDBOX_JSON, BOOT_DIR))
# How an image names an object of the store: "ab/cdef..." (its fs-verity digest in hex).
OBJECT_NAME = re.compile(rb"[0-9a-f]{2}/[0-9a-f]{62}")
# release.json is small (a few KB per image); anything far larger is not one.
RELEASE_JSON_MAX = 16 << 20


def image_file(name: str) -> str:
    return f"{IMAGES_DIR}/{name}.cfs"


def kernel_argument(digest_hex: str) -> str:
    """The root's kernel argument in the self-describing form composefs-rs and bootc read:
    EROFS format v1, fs-verity with SHA-256 and 2^12-byte blocks."""
    return f"{KERNEL_DIGEST_PREFIX}{digest_hex}"


class ReleaseDir:
    """A release directory on disk: where its parts are, and a file of one of its images read
    through that image's tree and the shared object store."""

    def __init__(self, path: str | os.PathLike[str], objects: str | os.PathLike[str] | None = None):
        self.path = Path(path)
        # An installed release's objects are in the device's shared store, not beside it.
        self._objects = Path(objects) if objects is not None else None

    @property
    def release_json(self) -> Path:
        return self.path / RELEASE_JSON

    @property
    def signature(self) -> Path:
        return self.path / RELEASE_SIG

    @property
    def objects(self) -> Path:
        return self._objects if self._objects is not None else self.path / OBJECTS_DIR

    def image_path(self, name: str) -> Path:
        return self.path / image_file(name)

    def load_image(self, name: str = ROOT_IMAGE_NAME) -> Image:
        return load_image(self.image_path(name))

    def object_path(self, payload: bytes | str) -> Path:
        return self.objects / (payload.decode() if isinstance(payload, bytes) else payload)

    def read_file(self, node: Node) -> bytes | None:
        """The content of a regular file of one of the release's images (inline, or its object);
        None when it is not a regular file or its object is missing, unreadable, not a regular
        file or not of the size the image gives."""
        node = node.target()
        if not node.is_reg():
            return None
        if node.content is not None:
            return bytes(node.content)
        if node.payload:
            if not OBJECT_NAME.fullmatch(node.payload):
                return None
            try:
                data = fsutil.read_regular(self.object_path(node.payload), node.size, what="object")
            except (BootimgError, UnicodeDecodeError):
                return None
            return data if len(data) == node.size else None
        return b"" if node.size == 0 else None
