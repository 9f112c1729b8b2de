"""release.json: what a release is, in a form the initramfs (POSIX sh) and tools can read.

The root's digest lives only here (and on the kernel command line); the containers'
digests are also inside the root image. The file is canonical JSON (sorted keys, fixed
indentation) so that it is reproducible and its signature is over stable bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..errors import BootimgError
from ..manifest.model import Manifest
from . import layout


@dataclass(frozen=True)
class ImageRecord:
    name: str
    role: str                # "root" or "container"
    path: str                # relative to the release directory
    digest: str              # fs-verity SHA-256 of the image file, hex
    size: int
    format_version: int


def canonical_json(data: object) -> bytes:
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def describe_release(manifest: Manifest, records: list[ImageRecord], *, verity_cert: bool) -> dict:
    root = next(r for r in records if r.role == "root")
    images = {}
    for rec in records:
        entry = asdict(rec)
        del entry["name"]
        if verity_cert:
            entry["fsverity_signature"] = f"{rec.path}.p7s"
        images[rec.name] = entry
    release = {
        "format": layout.RELEASE_FORMAT,
        "name": manifest.identity.name,
        "version": manifest.identity.version,
        "source_date_epoch": manifest.identity.source_date_epoch,
        "security_version": manifest.identity.security_version,
        "fsverity": {"algorithm": "sha256", "block_size": 4096, "policy": manifest.integrity.fsverity},
        "trust": manifest.integrity.trust,
        "root": {"image": root.name, "digest": root.digest,
                 "kernel_argument": layout.kernel_argument(root.digest)},
        "kernel_arguments": [layout.kernel_argument(root.digest), *manifest.boot.kernel_args],
        "images": images,
        "objects": layout.OBJECTS_DIR,
        "boot": {"etc": manifest.boot.etc, "var": manifest.boot.var,
                 "on_verification_failure": manifest.boot.on_verification_failure,
                 "tries": manifest.boot.assessment.tries, "good_when": list(manifest.good_boot_units())},
    }
    if manifest.boot.initramfs is not None:
        # What `bootimg initramfs` makes the release's kernel and initramfs with.
        release["boot"]["initramfs"] = manifest.boot.initramfs.to_dict()
    if verity_cert:
        release["fsverity"]["certificate"] = layout.VERITY_CERT
    return release


def parse_release(data: bytes, file: str) -> dict:
    """release.json, checked for every field verify and boot rely on: each of the right type,
    every path in it relative and inside the release (no '..', no absolute path)."""
    try:
        release = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BootimgError(f"not valid JSON: {err}", file=file) from None
    except RecursionError:
        raise BootimgError("not valid JSON: nested too deeply", file=file) from None
    if not isinstance(release, dict) or release.get("format") != layout.RELEASE_FORMAT:
        raise BootimgError(f"not a {layout.RELEASE_FORMAT} description", file=file)
    images = release.get("images")
    root = release.get("root")
    if (not isinstance(images, dict) or not images or not isinstance(root, dict) or not isinstance(root.get("image"), str)
            or root["image"] not in images):
        raise BootimgError("malformed: 'images' and 'root' are missing or disagree", file=file)
    for name, entry in images.items():
        if not name or len(name) > 255 or not name.isprintable():
            raise BootimgError(f"malformed image name {name[:80]!r}", file=file)
        if not isinstance(entry, dict) or not all(k in entry for k in ("path", "digest", "size")):
            raise BootimgError(f"malformed image entry '{name}'", file=file)
        _check_path(entry["path"], f"image '{name}'", file)
        digest, size = entry["digest"], entry["size"]
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
            raise BootimgError(f"image '{name}' has no valid digest (64 lowercase hex digits)", file=file)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BootimgError(f"image '{name}' has no valid size", file=file)
        if entry.get("role", "container") not in ("root", "container"):
            raise BootimgError(f"image '{name}' has an unknown role {entry['role']!r}", file=file)
        if "fsverity_signature" in entry:
            _check_path(entry["fsverity_signature"], f"image '{name}' signature", file)
    fsv = release.setdefault("fsverity", {})
    if not isinstance(fsv, dict):
        raise BootimgError("malformed 'fsverity' (not an object)", file=file)
    if "certificate" in fsv:
        _check_path(fsv["certificate"], "certificate", file)
    if not isinstance(release.get("trust", ""), str):
        raise BootimgError("malformed 'trust' (not a string)", file=file)
    release.setdefault("trust", "")
    return release


_HEX = frozenset("0123456789abcdef")


def _check_path(path: object, what: str, file: str) -> None:
    if (not isinstance(path, str) or not path or path.startswith("/") or "\0" in path
            or any(part in ("", ".", "..") for part in path.split("/"))):
        raise BootimgError(f"{what} has an unsafe path {repr(path)[:80]}", file=file)
