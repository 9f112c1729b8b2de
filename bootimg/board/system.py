"""The example system on the board: a signed bootimg release of the board's Debian root, its
initramfs (dracut + the release's own 90bootimg module) and a data disk, ready to boot.

    system = prepare_system("manifests/board.yaml", build_dir="build")
    boot(system.kernel, system.initrd, system.disk, system.cmdline)

What it does, in data-flow order:

1. ``board.prepare()``: the cached Debian root tarball (+ the plain baseline initramfs);
2. the root tree is extracted where the manifest's ``rootfs.source.path`` points
   (``build/board/rootfs``), once per root key, and the board's ssh public key is written next to
   it (``build/board/authorized_keys``, an ``add_files`` source of the manifest);
3. ``bootimg build`` (library API) makes the signed release in ``build/board/release``;
4. the initramfs is built by dracut in the root with the dracut module, ``boot.conf`` and trusted
   keys **read back out of the release's root image** (so the hook that runs is the one the signed
   root digest covers); cached by those inputs;
5. the data disk: ext4 with the ``verity`` feature, ``/bootimg/release`` = the release,
   ``/bootimg/state/var`` = the root's ``/var`` (the persistent ``/var`` starts as the image's);
6. a provisioning boot (writes kept): the initramfs hook enables fs-verity on every image and
   object, as a first boot on a freshly written partition does. Later boots use ``-snapshot``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

from ..boot.initramfs import BOOT_CONF, MODULE_DIR, MODULE_NAME, RELEASE_PATH, SETUP_ROOT, STATE_PATH
from ..composefs.tree import Node
from ..release.layout import ROOT_IMAGE_NAME, ReleaseDir
from ..release.layout import ROOT_KEYS_DIR as KEYS_DIR
from ._util import BoardError, Log, digest, file_lock, remove_tree, run, stderr_log, write_json_atomically
from .board import Board, prepare
from .disk import LABEL, DiskImage, make_disk
from .initramfs import BootFiles, build_initramfs
from .qemu import BootResult, baseline_cmdline, boot
from .rootfs import extract_rootfs
from .session import authorized_keys

DISK_FORMAT = 1                  # bump when the data disk's layout or provisioning changes
RELEASE_ON_DISK = RELEASE_PATH.lstrip("/")
STATE_ON_DISK = STATE_PATH.lstrip("/")


@dataclass
class System:
    """A release ready to boot on the board."""

    board: Board
    boot_files: BootFiles            # kernel + initramfs with the release's 90bootimg module
    release_dir: Path
    release: dict                    # release.json
    disk: Path                       # provisioned data disk (boot it with snapshot=True)
    manifest_path: Path
    tree: Path                       # the extracted board root (the manifest's rootfs source)
    provisioning: BootResult | None = None
    timings: dict = field(default_factory=dict)

    @property
    def kernel(self) -> Path:
        return self.boot_files.kernel

    @property
    def initrd(self) -> Path:
        return self.boot_files.initrd

    @property
    def digest(self) -> str:
        """The root image's fs-verity digest (hex), as release.json records it."""
        return self.release["root"]["kernel_argument"].rsplit(":", 1)[1]

    def cmdline(self, extra: str = "", *, poweroff: bool = True) -> str:
        """The kernel command line: the board's (root=LABEL=board-root: the data partition,
        which sysroot.mount mounts and the hook moves aside) plus the manifest's kernel_args,
        and the sealed digest in the ``sealed`` trust profile."""
        parts = list(self.release.get("kernel_args", []))
        if self.release.get("trust") == "sealed":
            parts.append(self.release["root"]["kernel_argument"])
        if extra:
            parts.append(extra)
        return baseline_cmdline(" ".join(p for p in parts if p), poweroff=poweroff)


    def baseline_cmdline(self, extra: str = "", *, poweroff: bool = True) -> str:
        """The plain ext4 root of the same tree: the board's command line and kernel_args,
        without the containers (they run from the release, which a plain root does not have)."""
        parts = list(self.release.get("kernel_args", [])) + container_masks(self)
        if extra:
            parts.append(extra)
        return baseline_cmdline(" ".join(parts), poweroff=poweroff)


def _read(release_dir: Path, node: Node | None, where: str) -> bytes:
    data = ReleaseDir(release_dir).read_file(node) if node is not None else None
    if data is None:
        raise BoardError(f"the root image has no readable {where}", file=str(release_dir))
    return data


def extract_boot_inputs(release_dir: Path, dest: Path) -> dict[str, Path]:
    """Copy the dracut module, boot.conf, the trusted keys and bootimg-setup-root out of the
    release's root image.

    Returns ``{"module_dir": ..., "boot_conf": ..., "keys": ..., "program": ...}`` under ``dest``.
    Reading them from the image (not from the build's templates) makes the initramfs run exactly
    the program the signed root digest covers."""
    root = ReleaseDir(release_dir).load_image().root
    if dest.exists():
        remove_tree(dest)
    module = dest / PurePosixPath(MODULE_DIR).name
    keys = dest / "keys"
    module.mkdir(parents=True)
    keys.mkdir()
    mod = root.lookup(MODULE_DIR.encode())
    if mod is None or mod.children is None:
        raise BoardError(f"the root image has no {MODULE_DIR}: not a bootimg release root",
                         file=str(release_dir))
    for name, node in sorted(mod.children.items()):
        if node.target().is_reg():
            path = module / name.decode()
            path.write_bytes(_read(release_dir, node, f"{MODULE_DIR}/{name.decode()}"))
            path.chmod(node.target().mode & 0o7777)
    (dest / "boot.conf").write_bytes(_read(release_dir, root.lookup(BOOT_CONF.encode()), BOOT_CONF))
    program = dest / PurePosixPath(SETUP_ROOT).name
    program.write_bytes(_read(release_dir, root.lookup(SETUP_ROOT.encode()), SETUP_ROOT))
    program.chmod(0o755)
    kdir = root.lookup(KEYS_DIR.encode())
    for name, node in sorted((kdir.children or {}).items()) if kdir is not None else []:
        if node.target().is_reg():
            (keys / name.decode()).write_bytes(_read(release_dir, node, f"{KEYS_DIR}/{name.decode()}"))
    return {"module_dir": module, "boot_conf": dest / "boot.conf", "keys": keys, "program": program}


def build_system_initramfs(board: Board, release_dir: Path, work: Path, *, log: Log = stderr_log) -> BootFiles:
    """dracut in the board root with the release's 90bootimg module (cached by its inputs)."""
    inputs = extract_boot_inputs(release_dir, work / "initramfs-inputs")
    return build_initramfs(board.rootfs, cache=board.cache, add_modules=[MODULE_NAME],
                           module_dirs=[inputs["module_dir"]],
                           tree_files={BOOT_CONF: inputs["boot_conf"], KEYS_DIR: inputs["keys"],
                                       SETUP_ROOT: inputs["program"]},
                           log=log)


def ensure_tree(board: Board, build: Path, *, log: Log = stderr_log) -> Path:
    """The board root extracted at ``build/board/rootfs`` (re-extracted when the root changes),
    plus ``build/board/authorized_keys``."""
    top = build / "board"
    top.mkdir(parents=True, exist_ok=True)
    tree = top / "rootfs"
    stamp = top / "rootfs.key"
    if not (tree.is_dir() and stamp.is_file() and stamp.read_text().strip() == board.rootfs.key):
        if tree.exists():
            remove_tree(tree)
        stamp.unlink(missing_ok=True)
        t0 = time.monotonic()
        extract_rootfs(board.rootfs, tree)
        stamp.write_text(board.rootfs.key + "\n")
        log(f"extracted the board root to {tree} in {time.monotonic() - t0:.1f} s")
    keys = top / "authorized_keys"
    want = authorized_keys(board.cache)
    if not keys.is_file() or keys.read_text() != want:
        keys.write_text(want)
    return tree


def make_data_disk(release_dir: Path, tree: Path, image: Path, *, seed: str) -> DiskImage:
    """The data partition: the release and the initial persistent /var (a copy of the root's)."""
    empty = image.parent / ".disk-top"
    if empty.exists():
        remove_tree(empty)
    empty.mkdir()
    try:
        return make_disk(image, empty, label=LABEL, seed=seed,
                         extra={RELEASE_ON_DISK: release_dir, f"{STATE_ON_DISK}/var": tree / "var"})
    finally:
        remove_tree(empty)


def provision(system: System, *, timeout: float = 600.0, serial_log: Path | None = None) -> BootResult:
    """Boot once with writes kept: the hook enables fs-verity on the release (first boot)."""
    result = boot(system.kernel, system.initrd, system.disk, system.cmdline(), timeout=timeout,
                  snapshot=False, serial_log=serial_log)
    if not result.ok:
        raise BoardError(f"the provisioning boot failed: {result.summary()}"
                         + (f"; console: {serial_log}" if serial_log else ""))
    if "provisioning: enabling fs-verity" not in result.console:
        raise BoardError("the provisioning boot did not provision (the disk was provisioned already?)")
    return result


def prepare_system(manifest: str | os.PathLike[str], *, build_dir: str | os.PathLike[str],
                   key: str | os.PathLike[str] | None = None, out_name: str = "release",
                   transform: Callable | None = None, provision_timeout: float = 900.0,
                   log: Log = stderr_log) -> System:
    """Build everything ``manifest`` needs to boot on the board (see the module doc).

    ``key``: the release signing key (trust profile ``signed``); ``transform``: a function
    Manifest -> Manifest applied after loading (e.g. drop the containers for a root-only
    benchmark). Outputs go to ``build_dir/board/``."""
    from .. import pipeline
    from ..manifest import load_manifest
    from ..signing import SecretKey

    timings: dict[str, float] = {}
    build = Path(build_dir).absolute()
    # A bad manifest fails here, before minutes of board work (its inputs are checked below,
    # once the board root it names is extracted).
    load_manifest(manifest, check_inputs=False, on_warning=None)
    t0 = time.monotonic()
    board = prepare(log=log)
    timings["board"] = time.monotonic() - t0
    t0 = time.monotonic()
    tree = ensure_tree(board, build, log=log)
    timings["tree"] = time.monotonic() - t0
    top = build / "board"
    t0 = time.monotonic()
    m = load_manifest(manifest, check_inputs=True)
    if transform is not None:
        m = transform(m)
    out = top / out_name
    result = pipeline.build(m, pipeline.BuildOptions(out=out, signing_key=SecretKey.from_file(key) if key else None,
                                           force=True))
    timings["release"] = time.monotonic() - t0
    log(f"release {out} built in {timings['release']:.1f} s: root {result.release['root']['kernel_argument']}")
    t0 = time.monotonic()
    boot_files = build_system_initramfs(board, out, top / f"{out_name}.work", log=log)
    timings["initramfs"] = time.monotonic() - t0
    release = json.loads((out / "release.json").read_text())
    release["kernel_args"] = list(m.boot.kernel_args)
    release["trust"] = m.integrity.trust
    disk_path = top / f"{out_name}.disk.img"
    system = System(board, boot_files, out, release, disk_path, Path(manifest), tree, timings=timings)
    # The provisioned disk is cached by what is on it (the release, named completely by
    # release.json + its signature; the root's /var) and by the program that provisioned it.
    sig = out / "release.json.minisig"
    program = top / f"{out_name}.work" / "initramfs-inputs" / PurePosixPath(SETUP_ROOT).name
    disk_key = digest({"format": DISK_FORMAT, "release": (out / "release.json").read_text(),
                       "sig": sig.read_text() if sig.exists() else None, "rootfs": board.rootfs.key,
                       "provisioning": hashlib.sha256(program.read_bytes()).hexdigest()})
    cached = board.cache / f"disk-{disk_key}.img"
    t0 = time.monotonic()
    with file_lock(board.cache / f".disk-{disk_key}.lock"):
        if cached.is_file():
            disk_path.unlink(missing_ok=True)
            _copy_disk(cached, disk_path)
            log(f"provisioned disk from the cache ({cached.name})")
        else:
            make_data_disk(out, tree, disk_path, seed=f"board-{out_name}")
            timings["disk"] = time.monotonic() - t0
            t0 = time.monotonic()
            system.provisioning = provision(system, timeout=provision_timeout,
                                            serial_log=top / f"{out_name}.provision.log")
            timings["provision_boot"] = time.monotonic() - t0
            log(f"provisioned {disk_path.name} in {timings['provision_boot']:.0f} s "
                f"({system.provisioning.summary()})")
            tmp = cached.with_name(f".{cached.name}.tmp")
            _copy_disk(disk_path, tmp)
            os.replace(tmp, cached)
    timings["disk_total"] = time.monotonic() - t0
    write_json_atomically(top / f"{out_name}.system.json", {
        "release": str(out), "digest": system.digest, "disk": str(disk_path),
        "kernel": str(system.kernel), "initrd": str(system.initrd), "cmdline": system.cmdline(),
        "initrd_size": boot_files.initrd_size, "timings": {k: round(v, 1) for k, v in timings.items()}})
    return system


def copy_disk(system: System, dest: Path) -> Path:
    """A private copy of the provisioned disk (sparse, reflinked where possible) to tamper with."""
    return _copy_disk(system.disk, dest)


def _copy_disk(src: Path, dest: Path) -> Path:
    run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dest)], what=f"copying the disk {src.name}")
    return dest


__all__ = ["System", "prepare_system", "extract_boot_inputs", "build_system_initramfs", "copy_disk",
           "ensure_tree", "make_data_disk", "provision"]


def container_masks(system: System) -> list[str]:
    """``systemd.mask=`` arguments for every boot-time container and its image service: boots
    that compare the root alone (composefs against plain ext4) leave the containers out."""
    names = sorted(name for name, entry in system.release["images"].items() if entry["role"] == "container")
    return [f"systemd.mask={unit}" for n in names for unit in (f"{n}.service", f"bootimg-image-{n}.service")]


def materialize_root(system: System, dest: Path) -> Path:
    """The release's root image as a plain directory tree: mounted the composefs way on the host
    (EROFS + overlay, the objects as data-only layer; no fs-verity here, so no ``verity=``) and
    copied out with owners, modes, xattrs and times. What the plain ext4 baseline boots."""
    import tempfile

    dest = Path(dest)
    if dest.exists():
        remove_tree(dest)
    with tempfile.TemporaryDirectory(prefix="bootimg-root-") as tmp:
        meta, mnt = Path(tmp) / "meta", Path(tmp) / "root"
        meta.mkdir()
        mnt.mkdir()
        rel = ReleaseDir(system.release_dir)
        run(["mount", "-t", "erofs", "-o", "loop,ro", str(rel.image_path(ROOT_IMAGE_NAME)), str(meta)],
            what="mounting the root image")
        try:
            run(["mount", "-t", "overlay", "composefs", "-o",
                 f"ro,metacopy=on,redirect_dir=on,lowerdir={meta}::{rel.objects}", str(mnt)],
                what="mounting the composefs root")
            try:
                dest.mkdir(parents=True)
                # cp -a = --preserve=all: owners, modes, times, xattrs (security.capability ...)
                run(["cp", "-a", f"{mnt}/.", str(dest)], what="copying the root out")
            finally:
                run(["umount", str(mnt)], what="unmounting the composefs root")
        finally:
            run(["umount", str(meta)], what="unmounting the root image")
    return dest


def baseline_disk(system: System, image: Path, work: Path) -> DiskImage:
    """The same root filesystem on plain ext4 (no composefs, no fs-verity) for comparison."""
    tree = materialize_root(system, work)
    try:
        return make_disk(image, tree, label=LABEL, seed="board-baseline")
    finally:
        remove_tree(tree)
