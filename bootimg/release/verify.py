"""`bootimg verify OUT`: recheck everything a release claims, and name what is wrong.

Who signed a release can only be checked against a key the user gives (``--key``): then the
release signature must verify with one of those keys and the result is *authenticated*.
Without ``--key``, verify checks the release against itself: every digest and object, and
the signature against the keys the release's own root image carries. That shows the release
is intact as it was built, and proves nothing about who built it (anyone can build a
consistent release with a key of their own); the report says so (``authenticated`` is
False) and the CLI exits with its own status for it.

A signature that does not verify is reported first: release.json was modified or not signed
by a trusted key, so the digests it lists are no reference, and an image that differs from
them is not blamed for it.

Checked, every problem one line naming the file:

- release.json: well-formed, every path in it inside the release; the root entry agrees with
  the root image's entry; the signature (trust profile ``signed``, or whenever keys are given);
- every image: a regular file of exactly the size release.json gives (one of another size is
  not read at all), its fs-verity digest computed streaming, then parsed from a read-only
  mapping; every file it references must be named by its own fs-verity digest;
- the object store, every file in it, referenced or not: its content must match its name
  (fs-verity digest); objects an image needs must be there; files no image needs are not part
  of the release and are reported;
- fs-verity PKCS#7 signatures against the release's certificate;
- the containers' digests the root image carries (/usr/lib/bootimg/containers.json);
- sharing.json (a report, not signed): recomputed from the images, it must be the same;
- nothing else in the release directory but sandbox.json (the container units' sandbox scores
  by the build host's systemd-analyze: a report that depends on the build host, not checked).

Files are opened without following symlinks and without blocking, and checked to be regular
files first: a FIFO, device or symlink where a file belongs is reported, never read.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import fsutil
from ..composefs import fsverity
from ..composefs.reader import Image, read_image
from ..errors import BootimgError, FormatError
from ..signing import PublicKey, SignatureError, fsverity_pkcs7_verify, parse_signature, verify
from . import layout
from .description import ImageRecord, canonical_json, parse_release
from .sharing import sharing_report

SIGNATURE_MAX = 64 << 10        # a .minisig is ~350 bytes
SMALL_FILE_MAX = 16 << 20       # certificates, PKCS#7 signatures, sharing.json
KEYS_GIVEN = "given with --key"
KEYS_CARRIED = "carried by the root image"
_HEX = frozenset("0123456789abcdef")


@dataclass
class VerifyReport:
    signature_problems: list[str] = field(default_factory=list)   # reported first
    other_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)                # informational, not problems
    images: int = 0
    objects: int = 0
    signed_by: str | None = None      # key id the release signature verified with
    key_source: str | None = None     # where that key came from
    authenticated: bool = False       # verified with a key the caller gave

    @property
    def problems(self) -> list[str]:
        return self.signature_problems + self.other_problems

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def status(self) -> str:
        """'authenticated' (intact, signed by a key the caller gave), 'consistent' (intact as
        built, signer not checked against anything the caller trusts) or 'failed'."""
        if not self.ok:
            return "failed"
        return "authenticated" if self.authenticated else "consistent"

    def problem(self, path: str, message: str) -> None:
        self.other_problems.append(f"{path}: {message}")

    def to_json(self) -> dict:
        return {"status": self.status, "authenticated": self.authenticated, "signed_by": self.signed_by,
                "key_source": self.key_source, "images": self.images, "objects": self.objects,
                "problems": self.problems, "notes": self.notes}


@dataclass
class _Reference:
    """How much release.json is worth as a reference for the images' digests."""

    state: str = "unchecked"          # "verified", "failed" or "unchecked" (no signature checked)
    mismatches: list[tuple[str, str]] = field(default_factory=list)   # (image path, what differs)

    def blame(self) -> str:
        if self.state == "failed":
            return "release.json failed its signature check (above), so it is no reference"
        if self.state == "verified":
            return "image modified or replaced"
        return "the image or release.json was modified"


def verify_release(out: str | os.PathLike[str], keys: list[PublicKey] | None = None,
                   workers: int = 2, objects: str | os.PathLike[str] | None = None) -> VerifyReport:
    """Check the release at ``out``; ``keys`` are the trust anchors (None: check it against
    itself only); ``objects``: the shared store of an installed release (the device's
    /bootimg/objects), where only the objects the release needs are checked, the others
    belonging to other releases. Raises BootimgError only when release.json cannot be read or
    is malformed."""
    out = Path(out)
    report = VerifyReport()
    release_path = out / layout.RELEASE_JSON
    release_bytes = fsutil.read_regular(release_path, layout.RELEASE_JSON_MAX, what="release.json")
    try:
        release = parse_release(release_bytes, str(release_path))
    except BootimgError as err:
        return _unparsable(out, release_bytes, err, keys, report)
    signature = _read_signature(out, report)
    reference = _Reference("failed" if report.signature_problems else "unchecked")
    if signature is None and not report.signature_problems and (keys is not None or release["trust"] == "signed"):
        reference.state = "failed"
        why = ("the trust profile is 'signed'" if release["trust"] == "signed"
               else "release.json is not signed, so it cannot be checked against the keys given")
        report.signature_problems.append(f"{layout.RELEASE_SIG}: missing: {why}")
    if keys is not None and signature is not None:
        _check_signature(release_bytes, signature, keys, KEYS_GIVEN, report, reference)

    loaded: dict[str, Image] = {}
    for name, entry in sorted(release["images"].items()):
        image = _check_image(out, name, entry, report, reference)
        if image is not None:
            loaded[name] = image
    report.images = len(release["images"])
    if keys is None:
        # The root image as it is on disk, even when it differs from release.json: a signature
        # its keys verify says release.json is as signed, so the image is the one modified.
        root_name = release["root"]["image"]
        root = loaded.get(root_name) or _load_unchecked(out / release["images"][root_name]["path"])
        root_keys = _embedded_keys(layout.ReleaseDir(out, objects), root, report if root_name in loaded else None)
        if signature is None:
            pass
        elif root_keys is None:
            report.notes.append(f"{layout.RELEASE_SIG}: not checked: the root image could not be read")
        elif not root_keys:
            report.notes.append(f"{layout.RELEASE_SIG}: not checked: no --key given and the root image carries no keys")
        else:
            _check_signature(release_bytes, signature, root_keys, KEYS_CARRIED, report, reference)
    for rel, what in reference.mismatches:
        report.problem(rel, f"{what}: {reference.blame()}")
    _check_root_entry(release, report)
    if objects is None:
        _check_objects(out, loaded, report, workers)
    else:
        _check_shared_objects(out, Path(objects), loaded, report, workers)
    _check_pkcs7(out, release, report)
    _check_container_digests(layout.ReleaseDir(out, objects), release, loaded, report)
    _check_sharing(out, release, loaded, report, required=objects is None)
    _check_extra_files(out, release, report)
    return report


# -- the signature ---------------------------------------------------------------------------------

def _unparsable(out: Path, release_bytes: bytes, err: BootimgError, keys: list[PublicKey] | None,
                report: VerifyReport) -> VerifyReport:
    """release.json is not a release description: still say first whether its signature holds
    (the signature covers its bytes, so a flipped byte shows there), checked with the keys
    given or else those the release's root image (at its usual place) carries."""
    signature = _read_signature(out, report)
    if signature is not None:
        if keys is None:
            keys = _embedded_keys(layout.ReleaseDir(out), _load_unchecked(out / layout.image_file(layout.ROOT_IMAGE_NAME)), None)
            source = KEYS_CARRIED
        else:
            source = KEYS_GIVEN
        if keys:
            _check_signature(release_bytes, signature, keys, source, report, _Reference())
    report.problem(layout.RELEASE_JSON, err.message)
    return report


def _read_signature(out: Path, report: VerifyReport) -> bytes | None:
    path = out / layout.RELEASE_SIG
    if not os.path.lexists(path):
        return None
    try:
        return fsutil.read_regular(path, SIGNATURE_MAX, what="signature")
    except BootimgError as err:
        report.signature_problems.append(f"{layout.RELEASE_SIG}: {err.message}")
        return None


def _check_signature(release_bytes: bytes, signature: bytes, keys: list[PublicKey], source: str,
                     report: VerifyReport, reference: _Reference) -> None:
    if not keys:
        reference.state = "failed"
        report.signature_problems.append(f"{layout.RELEASE_SIG}: no keys to check it with ({source})")
        return
    try:
        result = verify(release_bytes, signature, keys, message_name=layout.RELEASE_JSON,
                        signature_name=layout.RELEASE_SIG)
    except SignatureError as err:
        reference.state = "failed"
        try:
            signer = parse_signature(signature).keynum
        except SignatureError:
            signer = None
        if signer is not None and all(k.keynum != signer for k in keys):
            why = "not signed by a trusted key"
        else:
            why = "release.json or its signature was modified, or it was not signed by a trusted key"
        report.signature_problems.append(
            f"{layout.RELEASE_JSON}: the signature does not verify with the keys {source}: {why} ({err})")
        return
    reference.state = "verified"
    report.signed_by = result.key.keyid
    report.key_source = source
    report.authenticated = source == KEYS_GIVEN


def _embedded_keys(rdir: layout.ReleaseDir, root: Image | None, report: VerifyReport | None) -> list[PublicKey] | None:
    """The release keys the root image carries (None without a root image); unreadable ones
    are problems when ``report`` is given."""
    if root is None:
        return None
    keys_dir = root.root.lookup(layout.ROOT_KEYS_DIR.encode())
    keys = []
    for name, node in (keys_dir.sorted_children() if keys_dir is not None and keys_dir.is_dir() else []):
        data = rdir.read_file(node)
        if data is None:
            continue
        try:
            keys.append(PublicKey.from_bytes(data))
        except SignatureError as err:
            if report is not None:
                report.problem(f"{layout.ROOT_KEYS_DIR}/{name.decode(errors='replace')}",
                               f"unreadable key in the root image: {err.message}")
    return keys


def _load_unchecked(path: Path) -> Image | None:
    """An image file parsed whatever its digest (None if it is not a readable image)."""
    try:
        fd = fsutil.open_regular(path, what="image")
    except BootimgError:
        return None
    try:
        size = os.fstat(fd).st_size
        return read_image(mmap.mmap(fd, size, prot=mmap.PROT_READ)) if size else None
    except (OSError, ValueError, FormatError):
        return None
    finally:
        os.close(fd)


# -- images ----------------------------------------------------------------------------------------

def _check_image(out: Path, name: str, entry: dict, report: VerifyReport, reference: _Reference) -> Image | None:
    rel = entry["path"]
    try:
        fd = fsutil.open_regular(out / rel, what=f"image '{name}'")
    except BootimgError as err:
        report.problem(rel, err.message)
        return None
    try:
        size = os.fstat(fd).st_size
        if size != entry["size"]:
            reference.mismatches.append((rel, f"is {size} bytes, release.json says {entry['size']}"))
            return None
        try:
            digest = fsverity.digest_fd(fd, size).hex()
        except OSError as err:
            report.problem(rel, f"cannot read image '{name}': {err.strerror}")
            return None
        if digest != entry["digest"]:
            reference.mismatches.append((rel, f"fs-verity digest {digest} does not match release.json ({entry['digest']})"))
            return None
        try:
            data = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else b""
        except (OSError, ValueError) as err:
            report.problem(rel, f"cannot map image '{name}': {err}")
            return None
        try:
            return read_image(data)
        except FormatError as err:
            report.problem(rel, f"not a valid composefs image: {err.message}")
            return None
    finally:
        os.close(fd)


def _check_root_entry(release: dict, report: VerifyReport) -> None:
    root = release["root"]
    digest = release["images"][root["image"]]["digest"]
    if root.get("digest") != digest or root.get("kernel_argument") != layout.kernel_argument(digest):
        report.problem(layout.RELEASE_JSON, f"the root's digest or kernel argument differs from image '{root['image']}' ({digest})")


# -- the object store ------------------------------------------------------------------------------

def _referenced_objects(images: dict[str, Image], report: VerifyReport) -> dict[str, tuple[int, list[str]]]:
    """object name -> (size, images using it); names that are not object names are problems."""
    wanted: dict[str, tuple[int, list[str]]] = {}
    for name, image in images.items():
        shown_image = layout.image_file(name)
        for node in image.root.walk():
            if node.link_to is not None or not stat.S_ISREG(node.mode) or node.payload is None:
                continue
            where = node.path().decode(errors="replace")
            if not layout.OBJECT_NAME.fullmatch(node.payload):
                report.problem(shown_image, f"{where} names no object ({node.payload[:80]!r})")
                continue
            obj = node.payload.decode()
            if node.digest is not None and fsverity.object_name(node.digest) != obj:
                report.problem(shown_image, f"{where}: its object {obj} is not the one of its fs-verity digest "
                                            f"{node.digest.hex()}")
            users = wanted.setdefault(obj, (node.size, []))[1]
            if name not in users:
                users.append(name)
    return wanted


def _store_files(store: Path, report: VerifyReport) -> dict[str, int]:
    """object name -> size of every object file in the store; anything else there is a problem."""
    found: dict[str, int] = {}
    top = layout.OBJECTS_DIR
    try:
        st = os.lstat(store)
    except FileNotFoundError:
        return found
    except OSError as err:
        report.problem(top, f"cannot read: {err.strerror}")
        return found
    if not stat.S_ISDIR(st.st_mode):
        report.problem(top, "is not a directory")
        return found
    try:
        subdirs = sorted(os.scandir(store), key=lambda e: e.name)
    except OSError as err:
        report.problem(top, f"cannot read: {err.strerror}")
        return found
    for sub in subdirs:
        if not (len(sub.name) == 2 and set(sub.name) <= _HEX and sub.is_dir(follow_symlinks=False)):
            report.problem(f"{top}/{_shown(sub.name)}", "not part of the object store (not an object directory)")
            continue
        try:
            entries = sorted(os.scandir(sub.path), key=lambda e: e.name)
        except OSError as err:
            report.problem(f"{top}/{sub.name}", f"cannot read: {err.strerror}")
            continue
        for e in entries:
            rel = f"{sub.name}/{e.name}"
            if not (len(e.name) == 62 and set(e.name) <= _HEX):
                report.problem(f"{top}/{sub.name}/{_shown(e.name)}", "not part of the object store (not an object name)")
                continue
            try:
                est = e.stat(follow_symlinks=False)
            except OSError as err:
                report.problem(f"{top}/{rel}", f"cannot read: {err.strerror}")
                continue
            if not stat.S_ISREG(est.st_mode):
                report.problem(f"{top}/{rel}", f"not a regular file ({fsutil.file_kind(est.st_mode)})")
                continue
            found[rel] = est.st_size
    return found


def _digests(paths: list[str], sizes: list[int], workers: int) -> list[bytes | OSError]:
    """fs-verity digests of the files (each read up to its lstat size), in order, in threads;
    a file that cannot be read gives its OSError instead."""
    def batch(i: int) -> list[bytes | OSError]:
        part, psizes = paths[i:i + 256], sizes[i:i + 256]
        try:
            return list(fsverity.digest_paths(part, psizes))
        except OSError:
            out: list[bytes | OSError] = []
            for p, s in zip(part, psizes):
                try:
                    out.append(fsverity.digest_paths([p], [s])[0])
                except OSError as err:
                    out.append(err)
            return out

    starts = range(0, len(paths), 256)
    if workers <= 1 or len(starts) <= 1:
        return [d for i in starts for d in batch(i)]
    with ThreadPoolExecutor(workers) as pool:
        return [d for part in pool.map(batch, starts) for d in part]


def _check_objects(out: Path, images: dict[str, Image], report: VerifyReport, workers: int) -> None:
    wanted = _referenced_objects(images, report)
    report.objects = len(wanted)
    store = out / layout.OBJECTS_DIR
    present = _store_files(store, report)
    for obj, (_size, users) in sorted(wanted.items()):
        if obj not in present:
            report.problem(f"{layout.OBJECTS_DIR}/{obj}", f"missing (needed by {', '.join(users)})")
    to_hash = []
    for obj, size in sorted(present.items()):
        need = wanted.get(obj)
        if need is not None and need[0] != size:
            report.problem(f"{layout.OBJECTS_DIR}/{obj}", f"is {size} bytes, the images say {need[0]}: object modified")
            continue
        to_hash.append(obj)
    digests = _digests([str(store / obj) for obj in to_hash], [present[obj] for obj in to_hash], workers)
    for obj, digest in zip(to_hash, digests):
        rel = f"{layout.OBJECTS_DIR}/{obj}"
        extra = obj not in wanted
        if isinstance(digest, OSError):
            report.problem(rel, f"cannot read: {digest.strerror}")
        elif fsverity.object_name(digest) != obj:
            report.problem(rel, f"content does not match its name (fs-verity digest {digest.hex()}): object modified"
                                + ("; and no image references it" if extra else ""))
        elif extra:
            report.problem(rel, "not referenced by any image: not part of the release")


def _check_shared_objects(out: Path, store: Path, images: dict[str, Image], report: VerifyReport, workers: int) -> None:
    """The objects the release needs, in a store other releases share (named relative to the release)."""
    wanted = _referenced_objects(images, report)
    report.objects = len(wanted)
    top = os.path.relpath(store, out)
    to_hash = []
    for obj, (size, users) in sorted(wanted.items()):
        try:
            st = os.lstat(store / obj)
        except FileNotFoundError:
            report.problem(f"{top}/{obj}", f"missing (needed by {', '.join(users)})")
            continue
        except OSError as err:
            report.problem(f"{top}/{obj}", f"cannot read: {err.strerror}")
            continue
        if not stat.S_ISREG(st.st_mode):
            report.problem(f"{top}/{obj}", f"not a regular file ({fsutil.file_kind(st.st_mode)})")
        elif st.st_size != size:
            report.problem(f"{top}/{obj}", f"is {st.st_size} bytes, the images say {size}: object modified")
        else:
            to_hash.append(obj)
    digests = _digests([str(store / obj) for obj in to_hash], [wanted[obj][0] for obj in to_hash], workers)
    for obj, digest in zip(to_hash, digests):
        if isinstance(digest, OSError):
            report.problem(f"{top}/{obj}", f"cannot read: {digest.strerror}")
        elif fsverity.object_name(digest) != obj:
            report.problem(f"{top}/{obj}", f"content does not match its name (fs-verity digest {digest.hex()}): "
                                           "object modified")


# -- signatures, carried digests, sharing, stray files ---------------------------------------------

def _check_pkcs7(out: Path, release: dict, report: VerifyReport) -> None:
    cert_rel = release["fsverity"].get("certificate")
    if not cert_rel:
        return
    try:
        cert = fsutil.read_regular(out / cert_rel, SMALL_FILE_MAX, what="certificate")
    except BootimgError as err:
        report.problem(cert_rel, err.message)
        return
    for _name, entry in sorted(release["images"].items()):
        sig_rel = entry.get("fsverity_signature")
        if not sig_rel:
            report.problem(entry["path"], "no fs-verity signature although the release has a certificate")
            continue
        try:
            fsverity_pkcs7_verify(bytes.fromhex(entry["digest"]),
                                  fsutil.read_regular(out / sig_rel, SMALL_FILE_MAX, what="signature"), cert)
        except SignatureError as err:
            report.problem(sig_rel, err.message)
        except BootimgError as err:
            report.problem(sig_rel, err.message)


def _check_container_digests(rdir: layout.ReleaseDir, release: dict, images: dict[str, Image],
                             report: VerifyReport) -> None:
    root = images.get(release["root"]["image"])
    if root is None:
        return
    node = root.root.lookup(layout.ROOT_CONTAINERS_JSON.encode())
    data = rdir.read_file(node) if node is not None else None
    if data is None:
        report.problem(layout.ROOT_CONTAINERS_JSON, "missing from the root image")
        return
    try:
        carried = json.loads(data)["containers"]
        actual = {name: e.get("digest") for name, e in carried.items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        report.problem(layout.ROOT_CONTAINERS_JSON, "malformed (in the root image)")
        return
    expected = {name: e["digest"] for name, e in release["images"].items() if e.get("role") == "container"}
    if actual != expected:
        report.problem(layout.ROOT_CONTAINERS_JSON, "container digests carried by the root differ from release.json")


def _check_sharing(out: Path, release: dict, images: dict[str, Image], report: VerifyReport, *, required: bool) -> None:
    """sharing.json: a built release has it; an installed one (shared store) may not."""
    path = out / layout.SHARING_JSON
    if not os.path.lexists(path):
        if required:
            report.problem(layout.SHARING_JSON, "missing")
        return
    try:
        data = fsutil.read_regular(path, SMALL_FILE_MAX, what="sharing.json")
    except BootimgError as err:
        report.problem(layout.SHARING_JSON, err.message)
        return
    if len(images) != len(release["images"]):
        report.notes.append(f"{layout.SHARING_JSON}: not checked: not every image could be read")
        return
    records = [ImageRecord(name=name, role=e.get("role", ""), path=e["path"], digest=e["digest"], size=e["size"],
                           format_version=e.get("format_version", 0)) for name, e in release["images"].items()]
    expected = canonical_json(sharing_report({name: image.root for name, image in images.items()}, records))
    if data != expected:
        report.problem(layout.SHARING_JSON, "differs from what the images share (recomputed from them): modified")


def _check_extra_files(out: Path, release: dict, report: VerifyReport) -> None:
    """Files in the release directory that are no part of it."""
    expected = {layout.RELEASE_JSON, layout.RELEASE_SIG, layout.SHARING_JSON, layout.SANDBOX_JSON}
    for entry in release["images"].values():
        expected.add(entry["path"])
        if entry.get("fsverity_signature"):
            expected.add(entry["fsverity_signature"])
    if release["fsverity"].get("certificate"):
        expected.add(release["fsverity"]["certificate"])
    dirs = {str(Path(p).parent) for p in expected} - {"."}
    for top, subdirs, files in os.walk(out):
        rel_top = os.path.relpath(top, out)
        for name in sorted(files + [d for d in subdirs if os.path.islink(os.path.join(top, d))]):
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            if rel not in expected:
                report.problem(_shown(rel), "not part of the release")
        kept = []
        for d in sorted(subdirs):
            rel = d if rel_top == "." else f"{rel_top}/{d}"
            if rel == layout.OBJECTS_DIR or os.path.islink(os.path.join(top, d)):
                continue
            if rel == layout.BOOT_DIR:
                report.notes.append(f"{layout.BOOT_DIR}/: the kernel and initramfs an installer puts on the ESP; "
                                    "not covered by the release's signature (a signed UKI is)")
                continue
            if rel in dirs or any(p.startswith(rel + "/") for p in dirs):
                kept.append(d)
            else:
                report.problem(_shown(rel), "not part of the release (a directory)")
        subdirs[:] = kept


def _shown(name: str) -> str:
    """A name found on disk, printable on one line."""
    return name if name.isprintable() else repr(name)[1:-1]
