"""The kernel and initramfs of a release: dracut run inside the release's own root image.

The root image is mounted the composefs way (EROFS + a read-only overlay over the release's
object store) in a private mount and PID namespace, with tmpfs on the directories dracut writes
to, and dracut runs chrooted into it. So the initramfs holds exactly the ``90bootimg`` module,
``boot.conf`` and trusted keys the signed root digest covers, the root's own dracut and kernel
modules, and nothing of the build host. The kernel is copied out of the same image.

The result is cached by its inputs (the root image's digest and the dracut options), so
``bootimg disk`` and a second build of the same release reuse it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import arch as archmod
from ..boot import initramfs as boot_initramfs
from ..boot import preflight
from ..boot.image_view import ContainerImage
from ..composefs.tree import Node
from ..errors import BootimgError
from ..host import (
    CHROOT_ENV,
    HostError,
    Log,
    cache_dir,
    cache_used,
    digest,
    enable_foreign,
    file_lock,
    need_root,
    need_tools,
    prune_cache,
    run,
    scratch_dir,
    stderr_log,
    write_json_atomically,
)
from ..manifest.model import Initramfs, from_dict
from ..manifest.schema import definition_validator
from ..release.description import parse_release
from ..release.layout import ROOT_IMAGE_NAME, ReleaseDir

FORMAT = 2
CACHED_BUILDS = 24     # kernel + initramfs builds kept beyond those of the last hours (host.prune_cache)
SYSTEMD_BINARY = "/usr/lib/systemd/systemd"
_KVER = re.compile(r"^[0-9][A-Za-z0-9.+_~-]*$")


@dataclass(frozen=True)
class BootFiles:
    """A kernel and its initramfs (in the cache)."""

    kernel: Path
    initrd: Path
    kver: str
    arch: str
    key: str
    cached: bool
    seconds: float
    info: dict = field(default_factory=dict)

    @property
    def initrd_size(self) -> int:
        return self.initrd.stat().st_size


@dataclass(frozen=True)
class KernelInRoot:
    kver: str
    path: str          # absolute path of the kernel image in the root


def find_kernel(release: ReleaseDir, root: Node, *, file: str = "root image") -> KernelInRoot:
    """The kernel a root boots (the boot check's rule: the newest KVER with a modules directory
    and a ``/usr/lib/modules/KVER/vmlinuz`` or ``/boot/vmlinuz-KVER``)."""
    found = preflight.find_kernel(ContainerImage(root, release))
    if found is None:
        raise BootimgError("no kernel to boot: neither /usr/lib/modules/KVER/vmlinuz nor /boot/vmlinuz-KVER "
                           "with its modules directory", file=file)
    kver, path = found
    if not _KVER.match(kver):
        raise BootimgError(f"kernel version {kver!r} has characters dracut cannot take", file=file)
    return KernelInRoot(kver, path)


def root_arch(release: ReleaseDir, root: Node) -> archmod.Arch:
    """The architecture of a release's root, from its systemd binary's ELF header."""
    node = root.lookup(SYSTEMD_BINARY.lstrip("/").encode())
    data = release.read_file(node) if node is not None else None
    if data is None:
        raise BootimgError(f"the root has no readable {SYSTEMD_BINARY} to tell its architecture from",
                           file=str(release.image_path(ROOT_IMAGE_NAME)))
    return archmod.of_elf(data[:64], file=SYSTEMD_BINARY)


def dracut_argv(kver: str, output: str, profile: Initramfs | None = None, *, extra: Sequence[str] = ()) -> list[str]:
    """The dracut command line: not host-only (dracut would take the build host's hardware for
    the target's), reproducible, made of what the release's initramfs profile asks for."""
    argv = ["dracut", "--no-hostonly", "--no-hostonly-cmdline", "--reproducible", "--force", "--kver", kver]
    return [*argv, *boot_initramfs.dracut_options(profile), *extra, output]


def release_profile(release: dict, file: str) -> Initramfs | None:
    """The initramfs profile release.json records (``boot.initramfs``), or None."""
    data = (release.get("boot") or {}).get("initramfs") if isinstance(release.get("boot"), dict) else None
    if data is None:
        return None
    if not definition_validator("initramfs").is_valid(data):      # the manifest schema's own definition
        raise BootimgError("malformed 'boot.initramfs' (not an initramfs profile)", file=file)
    return from_dict(Initramfs, data)


# Runs in private mount + PID namespaces: mount the release's root the composefs way (no
# fs-verity on the build host, so no verity=), writable scratch where dracut writes, the API
# filesystems, then dracut chrooted; copy the kernel and the initramfs out.
_DRACUT_IN_RELEASE_SH = r'''
T=$1 IMAGE=$2 OBJECTS=$3 OUT=$4 KERNEL=$5
shift 5
mkdir -p "$T/meta" "$T/root"
mount -t erofs -o ro,loop "$IMAGE" "$T/meta"
mount -t overlay bootimg-root -o "ro,metacopy=on,redirect_dir=on,lowerdir=$T/meta::$OBJECTS" "$T/root"
R=$T/root
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --rbind /dev "$R/dev"
for d in run tmp var/tmp; do mount -t tmpfs -o mode=1777 tmpfs "$R/$d"; done
chroot "$R" "$@"
cp "$R/tmp/initrd.img" "$OUT/initrd.img"
cp "$R$KERNEL" "$OUT/vmlinuz"
'''


def initramfs_key(release: dict, profile: Initramfs | None, *, extra: Sequence[str]) -> str:
    """The cache key: the root (its digest covers the root's dracut, kernel and 90bootimg) and
    every dracut option, the profile's among them."""
    return digest({"format": FORMAT, "root": release["root"]["digest"],
                   "dracut": boot_initramfs.dracut_options(profile), "extra": list(extra)})


def build_initramfs(release_dir: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None = None,
                    extra: Sequence[str] = (), rebuild: bool = False, log: Log = stderr_log) -> BootFiles:
    """The kernel + initramfs of the release at ``release_dir`` (cached; building needs root),
    made as its initramfs profile asks (checked against the root before dracut runs)."""
    start = time.monotonic()
    rel = ReleaseDir(release_dir)
    release = _read_release(rel)
    profile = release_profile(release, str(rel.release_json))
    key = initramfs_key(release, profile, extra=extra)
    cdir = cache_dir(cache, "initramfs")
    out = cdir / key
    with file_lock(cdir / f".{key}.lock"):
        if not rebuild and (out / "info.json").is_file():
            cache_used(out)
            info = json.loads((out / "info.json").read_text())
            return BootFiles(out / "vmlinuz", out / "initrd.img", info["kver"], info["arch"], key, True,
                             time.monotonic() - start, info)
        root = rel.load_image(release["root"]["image"]).root
        kernel = find_kernel(rel, root, file=str(rel.image_path(release["root"]["image"])))
        arch = root_arch(rel, root)
        if root.lookup(b"usr/bin/dracut") is None and root.lookup(b"bin/dracut") is None:
            raise BootimgError("the root has no dracut (/usr/bin/dracut): install the dracut package in it",
                               file=str(rel.image_path(release["root"]["image"])))
        if profile is not None:
            problems = preflight.check_profile(root, rel, profile)
            if problems:
                raise preflight.BootCheckError(str(rel.release_json), [], [
                    f"{rel.release_json}: boot.initramfs.{preflight.format_place(path)}: {message}"
                    for path, message in problems])
        need_root("building the initramfs (mounting the root image, chroot)")
        need_tools("unshare", "chroot", "mount")
        enable_foreign(arch)            # an arm64 root's dracut on an x86_64 host: through qemu-user
        logs = cdir / "logs"
        logs.mkdir(exist_ok=True)
        log_file = logs / f"{key}.log"
        log_file.write_text(f"release {rel.path} root {release['root']['digest']} kver {kernel.kver}\n")
        with scratch_dir(cdir, f".build-{key}-") as work:
            stage = work / "out"
            stage.mkdir()
            argv = dracut_argv(kernel.kver, "/tmp/initrd.img", profile, extra=extra)
            env = dict(CHROOT_ENV, SOURCE_DATE_EPOCH=str(release["source_date_epoch"]))
            t0 = time.monotonic()
            log(f"dracut {kernel.kver} in the release's root image")
            run(["env", "-i", *(f"{k}={v}" for k, v in env.items()),
                 "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
                 "sh", "-euc", _DRACUT_IN_RELEASE_SH, "bootimg-dracut", str(work / "mnt"),
                 str(rel.image_path(release["root"]["image"])), str(rel.objects), str(stage), kernel.path, *argv],
                what="dracut in the release's root", log_file=log_file)
            t_dracut = time.monotonic() - t0
            info = {"key": key, "release": release["name"], "version": release["version"],
                    "root": release["root"]["digest"], "kver": kernel.kver, "kernel_path": kernel.path,
                    "arch": arch.name, "profile": profile.to_dict() if profile is not None else None,
                    "dracut": argv[:-1], "initrd_size": (stage / "initrd.img").stat().st_size,
                    "kernel_size": (stage / "vmlinuz").stat().st_size,
                    "seconds": {"dracut": round(t_dracut, 1)}}
            write_json_atomically(stage / "info.json", info)
            if out.exists():
                os.rename(out, work / "old")
            os.rename(stage, out)
        log(f"initramfs {info['initrd_size'] / 1e6:.1f} MB in {t_dracut:.0f} s")
        prune_cache(cdir, "", keep=CACHED_BUILDS, log=log)
        return BootFiles(out / "vmlinuz", out / "initrd.img", kernel.kver, arch.name, key, False,
                         time.monotonic() - start, info)


def export_boot_files(boot: BootFiles, dest: str | os.PathLike[str]) -> Path:
    """Copy a kernel + initramfs (and its info.json) into ``dest`` (``bootimg initramfs -o``)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for src, name in ((boot.kernel, "vmlinuz"), (boot.initrd, "initrd.img")):
        tmp = dest / f".{name}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest / name)
    write_json_atomically(dest / "info.json", boot.info)
    return dest


def load_boot_files(path: str | os.PathLike[str]) -> BootFiles:
    """A directory ``bootimg initramfs -o DIR`` wrote."""
    path = Path(path)
    try:
        info = json.loads((path / "info.json").read_text())
        kver, arch = info["kver"], info["arch"]
    except (OSError, ValueError, KeyError, TypeError):
        raise HostError("not a kernel + initramfs directory (no valid info.json): run `bootimg initramfs RELEASE -o DIR`",
                        file=str(path)) from None
    for name in ("vmlinuz", "initrd.img"):
        if not (path / name).is_file():
            raise HostError(f"{name} is missing", file=str(path))
    return BootFiles(path / "vmlinuz", path / "initrd.img", kver, arch, info.get("key", ""), True, 0.0, info)


def _read_release(rel: ReleaseDir) -> dict:
    try:
        data = rel.release_json.read_bytes()
    except OSError as err:
        raise BootimgError(f"cannot read: {err.strerror}", file=str(rel.release_json)) from None
    return parse_release(data, str(rel.release_json))
