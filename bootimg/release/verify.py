"""`bootimg verify OUT`: recheck everything a release claims, and name what is wrong.

Every image's fs-verity digest is recomputed and compared with release.json; every object an
image references must be in the store under its own digest; the release signature must
verify against the trusted keys (given with --key, or else the keys the release's own root
image carries, which is what the running system will trust for its next update); fs-verity
PKCS#7 signatures are checked against the release's certificate; the digests the root
carries for its containers must be those of the release. All problems are reported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..composefs import fsverity
from ..composefs.info import list_objects
from ..composefs.reader import Image, read_image
from ..errors import BootimgError, FormatError
from ..signing import PublicKey, SignatureError, fsverity_pkcs7_verify, verify
from . import layout
from .description import parse_release


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    images: int = 0
    objects: int = 0
    signature: str = "none"

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_release(out: str | os.PathLike[str], keys: list[PublicKey] | None = None,
                   workers: int = 2) -> VerifyReport:
    out = Path(out)
    report = VerifyReport()
    release_path = out / layout.RELEASE_JSON
    try:
        release_bytes = release_path.read_bytes()
    except OSError as err:
        raise BootimgError(f"cannot read: {err.strerror}", file=str(release_path)) from None
    release = parse_release(release_bytes, str(release_path))

    loaded: dict[str, Image] = {}
    for name, entry in sorted(release["images"].items()):
        image = _check_image(out, name, entry, report)
        if image is not None:
            loaded[name] = image
    report.images = len(release["images"])
    _check_objects(out, loaded, report, workers)
    _check_signature(out, release, release_bytes, loaded, keys, report)
    _check_pkcs7(out, release, report)
    _check_container_digests(out, release, loaded, report)
    return report


def _problem(report: VerifyReport, path: str, message: str) -> None:
    report.problems.append(f"{path}: {message}")


def _check_image(out: Path, name: str, entry: dict, report: VerifyReport) -> Image | None:
    rel = entry["path"]
    try:
        data = (out / rel).read_bytes()
    except OSError as err:
        _problem(report, rel, f"cannot read image '{name}': {err.strerror}")
        return None
    digest = fsverity.digest(data).hex()
    if digest != entry["digest"]:
        _problem(report, rel, f"fs-verity digest {digest} does not match release.json ({entry['digest']}): "
                              "image modified or replaced")
        return None
    if len(data) != entry["size"]:
        _problem(report, rel, f"size {len(data)} does not match release.json ({entry['size']})")
    try:
        return read_image(data)
    except FormatError as err:
        _problem(report, rel, f"not a valid composefs image: {err.message}")
        return None


def _check_objects(out: Path, images: dict[str, Image], report: VerifyReport, workers: int) -> None:
    wanted: dict[str, list[str]] = {}
    for name, image in images.items():
        for obj in list_objects(image.root):
            wanted.setdefault(obj.decode(), []).append(name)
    report.objects = len(wanted)
    present = []
    for obj, users in sorted(wanted.items()):
        path = out / layout.OBJECTS_DIR / obj
        if not path.is_file() or path.is_symlink():
            _problem(report, f"{layout.OBJECTS_DIR}/{obj}", f"missing (needed by {', '.join(users)})")
        else:
            present.append(obj)
    try:
        digests = fsverity.digest_files([str(out / layout.OBJECTS_DIR / obj) for obj in present], workers)
    except OSError as err:
        raise BootimgError(f"cannot read object: {err.strerror}", file=str(err.filename)) from None
    for obj, digest in zip(present, digests):
        if fsverity.object_name(digest) != obj:
            _problem(report, f"{layout.OBJECTS_DIR}/{obj}",
                     f"content does not match its name (fs-verity digest {digest.hex()}): object modified")


def _embedded_keys(out: Path, images: dict[str, Image], release: dict, report: VerifyReport) -> list[PublicKey]:
    root = images.get(release["root"]["image"])
    if root is None:
        return []
    keys_dir = root.root.lookup(layout.ROOT_KEYS_DIR.encode())
    keys = []
    for name, node in (keys_dir.sorted_children() if keys_dir is not None else []):
        data = layout.ReleaseDir(out).read_file(node)
        if data is None:
            continue
        try:
            keys.append(PublicKey.from_bytes(data))
        except SignatureError as err:
            _problem(report, f"{layout.ROOT_KEYS_DIR}/{name.decode()}", f"unreadable key in the root image: {err.message}")
    return keys


def _check_signature(out: Path, release: dict, release_bytes: bytes, images: dict[str, Image],
                     keys: list[PublicKey] | None, report: VerifyReport) -> None:
    sig_path = out / layout.RELEASE_SIG
    if not sig_path.exists():
        if release.get("trust") == "signed":
            _problem(report, layout.RELEASE_SIG, "missing: the trust profile is 'signed'")
        return
    source = "given keys"
    if keys is None:
        keys = _embedded_keys(out, images, release, report)
        source = "keys carried by the root image"
    if not keys:
        _problem(report, layout.RELEASE_SIG, f"no trusted keys to check it with ({source})")
        return
    try:
        result = verify(release_bytes, sig_path.read_bytes(), keys, message_name=layout.RELEASE_JSON,
                        signature_name=layout.RELEASE_SIG)
    except SignatureError as err:
        report.problems.append(str(err))
        return
    report.signature = f"signed by {result.key.keyid} ({source})"


def _check_pkcs7(out: Path, release: dict, report: VerifyReport) -> None:
    cert_rel = release.get("fsverity", {}).get("certificate")
    if not cert_rel:
        return
    try:
        cert = (out / cert_rel).read_bytes()
    except OSError as err:
        _problem(report, cert_rel, f"cannot read: {err.strerror}")
        return
    for _name, entry in sorted(release["images"].items()):
        sig_rel = entry.get("fsverity_signature")
        if not sig_rel:
            _problem(report, entry["path"], "no fs-verity signature although the release has a certificate")
            continue
        try:
            fsverity_pkcs7_verify(bytes.fromhex(entry["digest"]), (out / sig_rel).read_bytes(), cert)
        except OSError as err:
            _problem(report, sig_rel, f"cannot read: {err.strerror}")
        except SignatureError as err:
            _problem(report, sig_rel, err.message)


def _check_container_digests(out: Path, release: dict, images: dict[str, Image], report: VerifyReport) -> None:
    root = images.get(release["root"]["image"])
    if root is None:
        return
    node = root.root.lookup(layout.ROOT_CONTAINERS_JSON.encode())
    data = layout.ReleaseDir(out).read_file(node) if node is not None else None
    if data is None:
        _problem(report, layout.ROOT_CONTAINERS_JSON, "missing from the root image")
        return
    try:
        carried = json.loads(data)["containers"]
    except (ValueError, KeyError, TypeError):
        _problem(report, layout.ROOT_CONTAINERS_JSON, "malformed (in the root image)")
        return
    expected = {name: e["digest"] for name, e in release["images"].items() if e.get("role") == "container"}
    actual = {name: e.get("digest") for name, e in carried.items()}
    if actual != expected:
        _problem(report, layout.ROOT_CONTAINERS_JSON,
                 "container digests carried by the root differ from release.json")
