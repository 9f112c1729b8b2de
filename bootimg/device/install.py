"""``bootimg install``: put a new release next to the running one and make it the next boot.

In order (under the data partition's lock, which ``gc`` takes too):

1. the release is authenticated against the keys the *installed* system trusts (on the device:
   the running root's ``/usr/lib/bootimg/keys``; offline: those the newest good installed
   release carries, or ``--key``), never the keys the new release brings;
2. its rollback index (``security_version``) must not be below the device's minimum (the
   state file, and on the device what bootimg-setup-root read from the TPM at boot);
3. its images are copied and checked against their digests; then only the objects the shared
   store lacks are copied (each checked against its name, fs-verity enabled, fsynced);
4. the release directory is written under a temporary name, fsynced and renamed into
   ``/bootimg/releases/VERSION`` (so a power loss leaves either nothing or the whole release);
5. last, the ESP gets its kernel and initramfs and then its boot entry
   ``bootimg-NAME-VERSION+TRIES.conf``: from then on it is the next boot, tried TRIES times
   (systemd-boot's boot counting) before the loader falls back to the previous good release.

Running it again after an interruption completes what is missing; installing an installed
release changes nothing. The rollback minimum is never raised here (only a blessed boot does).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..boot import loader
from ..boot.partition import LOCK, PROVISIONED, ROLLBACK_FILE, release_path
from ..composefs import fsverity
from ..composefs.info import list_objects
from ..composefs.reader import read_image
from ..composefs.store import ObjectStore
from ..errors import BootimgError, FormatError
from ..fsutil import write_atomically
from ..release import layout
from ..release.description import parse_release
from ..signing import PublicKey, SignatureError, verify
from . import installed
from .source import BOOT_NAMES, Source, boot_file
from .target import Target

IMAGE_MAX = 1 << 30          # a composefs image is metadata only: a /usr of 140k files is ~30 MB
ROOT_KEYS = Path(layout.ROOT_KEYS_DIR)


@dataclass
class InstallResult:
    name: str
    version: str
    release_path: str
    entry: str
    security_version: int
    already_installed: bool = False
    objects_transferred: int = 0
    bytes_transferred: int = 0
    objects_present: int = 0
    bytes_present: int = 0
    images_bytes: int = 0
    boot_bytes: int = 0
    fsverity: str = "enabled"
    signed_by: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d


def trusted_keys(target: Target, given: list[PublicKey] | None) -> tuple[list[PublicKey], str]:
    """The keys a new release must be signed with, and where they came from."""
    if given:
        return given, "given with --key"
    if target.on_device:
        keys = [PublicKey.from_file(p) for p in sorted(ROOT_KEYS.glob("*.pub"))]
        return keys, f"the running root's {ROOT_KEYS}"
    current = installed.newest_good(target)
    if current is None:
        raise BootimgError(f"{target.where}: no good release installed to take the trusted keys from; give --key")
    return installed.carried_keys(target, current), f"those release {current.version} carries"


def rollback_minimum(target: Target) -> tuple[int, str]:
    """The device's rollback minimum as the installer can know it, and where it comes from."""
    values = []
    state = target.data.at(ROLLBACK_FILE)
    try:
        text = state.read_text().strip()
        values.append((int(text), f"the state file {ROLLBACK_FILE}"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        raise BootimgError("unreadable rollback minimum (not a number)", file=str(state)) from None
    if target.booted and isinstance(target.booted.get("rollback_minimum"), int):
        values.append((target.booted["rollback_minimum"], str(target.booted.get("rollback_store") or "the boot")))
    if not values:
        return 0, "none stored yet"
    return max(values)


def install(source: Source, target: Target, *, keys: list[PublicKey] | None = None, log=lambda _m: None) -> InstallResult:
    t0 = time.monotonic()
    data = target.data
    data.state.mkdir(parents=True, exist_ok=True)
    with installed.locked(data.at(LOCK)):
        release_bytes = source.read(layout.RELEASE_JSON, limit=layout.RELEASE_JSON_MAX)
        if release_bytes is None:
            raise BootimgError("no release.json: not a release", file=source.describe)
        signature = source.read(layout.RELEASE_SIG, limit=64 << 10)
        trusted, key_source = trusted_keys(target, keys)
        if signature is None:
            raise BootimgError("the release is not signed; a device installs only releases signed by a key it "
                               "trusts", file=source.describe)
        try:
            signed = verify(release_bytes, signature, trusted, message_name=layout.RELEASE_JSON,
                            signature_name=layout.RELEASE_SIG)
        except SignatureError as err:
            raise BootimgError(f"not signed by a key this system trusts ({key_source}): {err.message}",
                               file=source.describe) from None
        release = parse_release(release_bytes, f"{source.describe}/{layout.RELEASE_JSON}")
        name, version = release["name"], release["version"]
        sv = int(release.get("security_version", 0))
        current = installed.newest_good(target)
        if current is not None and current.name != name:
            raise BootimgError(f"the release is {name!r}, this system is {current.name!r}", file=source.describe)
        minimum, where = rollback_minimum(target)
        if sv < minimum:
            raise BootimgError(f"release {version} has security_version {sv}, below this device's minimum {minimum} "
                               f"({where}): a downgrade past a security fix is refused", file=source.describe)
        rpath = release_path(version)
        eid = loader.entry_id(name, version)
        result = InstallResult(name=name, version=version, release_path=rpath, entry=eid, security_version=sv,
                               signed_by=signed.key.keyid)
        dest = data.release(version)
        if dest.exists():
            if (dest / layout.RELEASE_JSON).read_bytes() != release_bytes:
                raise BootimgError(f"a different release {version} is already installed at {rpath}",
                                   file=source.describe)
            result.already_installed = True
        store = ObjectStore(data.objects, fsync=True, on_notice=lambda _m: None)
        staging = data.releases / f".{version}.tmp"
        images = _stage_images(source, release, dest if result.already_installed else staging, result,
                               fresh=not result.already_installed)
        _objects(source, store, images, result, log)
        if store.verity_enabled is False or not _enable_verity(dest if result.already_installed else staging, release):
            result.fsverity = "not supported here: the next boot enables it"
            data.at(PROVISIONED).unlink(missing_ok=True)
        if not result.already_installed:
            for rel, blob in ((layout.RELEASE_JSON, release_bytes), (layout.RELEASE_SIG, signature)):
                write_atomically(staging / rel, blob)
            _fsync_tree(staging)
            os.rename(staging, dest)
            _fsync_dir(data.releases)
        _stage_entry(source, target, release, result)
    result.seconds = time.monotonic() - t0
    return result


def _stage_images(source: Source, release: dict, where: Path, result: InstallResult, *, fresh: bool) -> dict:
    """Every image of the release in ``where/images``, each checked against release.json's
    digest; returns {name: parsed image}."""
    if fresh:
        if where.exists():
            shutil.rmtree(where)            # what an interrupted install left
        (where / layout.IMAGES_DIR).mkdir(parents=True)
    images = {}
    for name, entry in sorted(release["images"].items()):
        dest = where / entry["path"]
        if fresh:
            data = source.read(entry["path"], limit=IMAGE_MAX)
            if data is None:
                raise BootimgError(f"image {entry['path']} is missing", file=source.describe)
            if fsverity.digest(data).hex() != entry["digest"] or len(data) != entry["size"]:
                raise BootimgError(f"image {entry['path']} does not have the digest release.json gives: modified",
                                   file=source.describe)
            write_atomically(dest, data)
        else:
            data = dest.read_bytes()
        result.images_bytes += len(data)
        try:
            images[name] = read_image(data)
        except FormatError as err:
            raise BootimgError(f"image {entry['path']} is not a composefs image: {err.message}",
                               file=source.describe) from None
    return images


def _objects(source: Source, store: ObjectStore, images: dict, result: InstallResult, log) -> None:
    """Copy the objects the store lacks (checked against their names); count the rest."""
    wanted = sorted({obj.decode() for image in images.values() for obj in list_objects(image.root)})
    for name in wanted:
        digest = bytes.fromhex(name.replace("/", ""))
        existing = store.object_path(digest)
        if os.path.lexists(existing):
            result.objects_present += 1
            result.bytes_present += os.lstat(existing).st_size
            continue
        local = source.object_path(name)
        if local is not None:
            store.add_file(local, digest, verify=True)
            size = os.path.getsize(local)
        else:
            with source.open(f"{layout.OBJECTS_DIR}/{name}") as (f, _size):
                got = store.add_stream(f, _size) if _size >= 0 else store.add_bytes(f.read())
            if got != digest:
                os.unlink(store.object_path(got))
                raise BootimgError(f"object {name}: its content does not match its name", file=source.describe)
            size = os.path.getsize(store.object_path(digest))
        result.objects_transferred += 1
        result.bytes_transferred += size
    log(f"objects: {result.objects_transferred} copied ({result.bytes_transferred} bytes), "
        f"{result.objects_present} already present ({result.bytes_present} bytes)")


def _enable_verity(where: Path, release: dict) -> bool:
    """fs-verity on the release's images; False where the filesystem has none."""
    for entry in release["images"].values():
        fd = os.open(where / entry["path"], os.O_RDONLY)
        try:
            fsverity.enable_fd(fd)
        except OSError as err:
            if err.errno in fsverity.UNSUPPORTED_ERRNOS:
                return False
            if err.errno != 17:      # EEXIST: it has fs-verity already
                raise BootimgError(f"cannot enable fs-verity: {err.strerror}", file=str(where / entry["path"])) from None
        finally:
            os.close(fd)
    return True


def _stage_entry(source: Source, target: Target, release: dict, result: InstallResult) -> None:
    """The kernel and initramfs on the ESP, then the boot entry (last: it makes the release
    bootable). An entry the ESP already has, in any counting state, is left as it is."""
    esp = target.esp
    present = [n for n, _ in esp.entries() if n.id == result.entry]
    kdir = loader.kernel_dir(release["name"], release["version"])
    blobs = {}
    for name in BOOT_NAMES:
        blob = source.read(boot_file(name))
        if blob is None:
            raise BootimgError(f"no {boot_file(name)}: the release has no kernel and initramfs to boot "
                               f"(bootimg initramfs RELEASE -o RELEASE/boot)", file=source.describe)
        blobs[name] = blob
        result.boot_bytes += len(blob)
    try:
        for name, blob in blobs.items():
            if esp.read(f"{kdir}/{name}") != blob:
                esp.write(f"{kdir}/{name}", blob)
    except (OSError, BootimgError) as err:
        full = getattr(err, "errno", None) == errno.ENOSPC or "Disk full" in str(err)
        if not full:
            raise
        if not present:
            esp.remove(kdir)              # no entry points at it: nothing half-written stays
        raise BootimgError(f"the ESP is full: no room for the kernel and initramfs of {release['version']} "
                           f"({result.boot_bytes / 2**20:.0f} MiB); every release a loader entry names is kept: retire "
                           f"one you no longer need (remove its file from loader/entries/), then run `bootimg gc`",
                           file=target.where) from None
    partuuid = target.data_partuuid or installed.data_partuuid(target)
    cmdline = loader.kernel_cmdline(release, partuuid, result.release_path)
    text = loader.type1_entry(release, cmdline).encode()
    if present:
        # kept in its counting state; its content rewritten when a power cut left it short (FAT
        # gives no ordering between a rename and the data)
        path = f"{loader.ENTRIES_DIR}/{present[0].filename}"
        if esp.read(path) != text:
            esp.write(path, text)
            result.notes.append(f"the ESP's entry {present[0].filename} was damaged: rewritten")
        else:
            result.notes.append(f"the ESP has its entry already ({present[0].filename})")
        return
    tries = int(release.get("boot", {}).get("tries", 3))
    esp.write(f"{loader.ENTRIES_DIR}/{loader.EntryName(result.entry, tries).filename}", text)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(top: Path) -> None:
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def describe(result: InstallResult) -> str:
    return json.dumps(result.to_json(), indent=2, sort_keys=True)
