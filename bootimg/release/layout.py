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

RELEASE_FORMAT = "bootimg-release/1"
RELEASE_JSON = "release.json"
RELEASE_SIG = "release.json.minisig"
IMAGES_DIR = "images"
OBJECTS_DIR = "objects"
KEYS_DIR = "keys"
VERITY_CERT = "keys/fsverity-cert.pem"
SHARING_JSON = "sharing.json"
SANDBOX_JSON = "sandbox.json"
ROOT_IMAGE_NAME = "root"

# Inside the root image: what the generator adds so that the root's digest covers it.
ROOT_DATA_DIR = "/usr/lib/bootimg"
ROOT_CONTAINERS_JSON = "/usr/lib/bootimg/containers.json"
ROOT_KEYS_DIR = "/usr/lib/bootimg/keys"


def image_file(name: str) -> str:
    return f"{IMAGES_DIR}/{name}.cfs"


def kernel_argument(digest_hex: str) -> str:
    """The root's kernel argument in the self-describing form composefs-rs and bootc read:
    EROFS format v1, fs-verity with SHA-256 and 2^12-byte blocks."""
    return f"composefs.digest=v1-sha256-12:{digest_hex}"
