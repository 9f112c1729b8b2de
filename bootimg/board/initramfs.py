"""The board's kernel and initramfs: dracut run inside the root filesystem, cached.

dracut runs chrooted into an extracted copy of the cached root (see ``_util.chroot_run``: /proc,
/sys and /dev exist only in the step's private namespaces). Extra dracut module directories
(``module_dirs``, e.g. ``.../90bootimg-composefs`` holding a ``module-setup.sh``) are copied into
``/usr/lib/dracut/modules.d/`` first and ``add_modules`` are passed to ``--add``; ``tree_files``
are put into the tree before dracut runs, for binaries or configuration a module installs. All of
it is part of the cache key, with the root's key and every dracut option.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..host import (
    HostError,
    Log,
    cache_dir,
    cache_used,
    chroot_run,
    digest,
    enable_foreign,
    file_lock,
    need_root,
    prune_cache,
    scratch_dir,
    stderr_log,
    tree_digest,
    write_json_atomically,
)
from .rootfs import Rootfs, extract_rootfs

FORMAT = 1
DEFAULT_DRIVERS = ("virtio_blk", "virtio_pci", "ext4")


@dataclass(frozen=True)
class BootFiles:
    """A kernel and its initramfs, copied out of the root (in the cache)."""

    kernel: Path
    initrd: Path
    kver: str
    initrd_size: int
    key: str
    cached: bool
    seconds: float
    info: dict


# Kernel + initramfs builds kept in the cache beyond those of the last hours (host.prune_cache).
CACHED_BUILDS = 12


def _module_dir_name(path: Path) -> str:
    name = path.name
    if not (path / "module-setup.sh").is_file():
        raise HostError("not a dracut module directory (no module-setup.sh)", file=str(path))
    return name


def initramfs_key(rootfs: Rootfs, *, add_modules: Sequence[str] = (), module_dirs: Sequence[Path] = (),
                  add_drivers: Sequence[str] = DEFAULT_DRIVERS, compress: str | None = None,
                  dracut_args: Sequence[str] = (), tree_files: Mapping[str, Path] | None = None) -> str:
    return digest({
        "format": FORMAT, "rootfs": rootfs.key, "add_modules": list(add_modules),
        "module_dirs": [[_module_dir_name(Path(d)), tree_digest(Path(d))] for d in module_dirs],
        "add_drivers": list(add_drivers), "compress": compress, "dracut_args": list(dracut_args),
        "tree_files": sorted([dest, tree_digest(Path(src))] for dest, src in (tree_files or {}).items()),
    })


def build_initramfs(rootfs: Rootfs, *, cache: str | os.PathLike[str] | None = None,
                    add_modules: Sequence[str] = (), module_dirs: Sequence[str | os.PathLike[str]] = (),
                    add_drivers: Sequence[str] = DEFAULT_DRIVERS, compress: str | None = None,
                    dracut_args: Sequence[str] = (), tree_files: Mapping[str, str | os.PathLike[str]] | None = None,
                    tree: str | os.PathLike[str] | None = None, rebuild: bool = False,
                    log: Log = stderr_log) -> BootFiles:
    """Return the cached kernel + initramfs for ``rootfs`` and these options, building if needed.

    ``tree``: an already extracted copy of the root to build in (it is modified: module dirs,
    tree files and /boot/initrd.img-KVER are added); by default a scratch copy is extracted.
    """
    start = time.monotonic()
    module_dirs = [Path(d) for d in module_dirs]
    files = {str(dest): Path(src) for dest, src in (tree_files or {}).items()}
    for d in module_dirs:
        if not d.is_dir():
            raise HostError("dracut module directory not found", file=str(d))
    for dest, src in files.items():
        if not dest.startswith("/") or ".." in Path(dest).parts:
            raise HostError(f"tree file destination must be an absolute path inside the root: {dest}")
        if not src.exists():
            raise HostError("tree file not found", file=str(src))
    key = initramfs_key(rootfs, add_modules=add_modules, module_dirs=module_dirs,
                        add_drivers=add_drivers, compress=compress, dracut_args=dracut_args,
                        tree_files=files)
    cdir = cache_dir(cache)
    out = cdir / f"boot-{key}"
    kver = rootfs.kver
    with file_lock(cdir / f".boot-{key}.lock"):
        if not rebuild and (out / "info.json").is_file():
            cache_used(out)
            info = json.loads((out / "info.json").read_text())
            return BootFiles(out / info["kernel"], out / info["initrd"], kver, info["initrd_size"],
                             key, True, time.monotonic() - start, info)
        need_root("building the initramfs")
        enable_foreign(rootfs.target)
        logs = cdir / "logs"
        logs.mkdir(exist_ok=True)
        log_file = logs / f"boot-{key}.log"
        log_file.write_text(f"rootfs {rootfs.key} kver {kver}\n")
        with scratch_dir(cdir, f".build-boot-{key}-") as work:
            if tree is None:
                t0 = time.monotonic()
                root = extract_rootfs(rootfs, work / "tree")
                log(f"extracted root {rootfs.key} in {time.monotonic() - t0:.1f} s")
            else:
                root = Path(tree)
            install_tree_extras(root, module_dirs=module_dirs, tree_files=files)
            initrd_in_tree = f"/boot/initrd.img-{kver}"
            argv = ["dracut", "--no-hostonly", "--no-hostonly-cmdline", "--reproducible", "--force",
                    "--kver", kver, "--add-drivers", " ".join(add_drivers)]
            if add_modules:
                argv += ["--add", " ".join(add_modules)]
            if compress:
                argv += ["--compress", compress]
            argv += [*dracut_args, initrd_in_tree]
            # --reproducible takes cpio timestamps from SOURCE_DATE_EPOCH: the kernel's mtime.
            vmlinuz = root / "boot" / f"vmlinuz-{kver}"
            if not vmlinuz.is_file():
                raise HostError(f"no kernel {vmlinuz.name} in the root", file=str(root))
            epoch = str(int(vmlinuz.stat().st_mtime))
            t0 = time.monotonic()
            log(f"dracut {kver}" + (f" (+ {' '.join(add_modules)})" if add_modules else ""))
            chroot_run(root, argv, what="dracut", log_file=log_file, env={"SOURCE_DATE_EPOCH": epoch})
            t_dracut = time.monotonic() - t0
            stage = work / "out"
            stage.mkdir()
            shutil.copy2(vmlinuz, stage / vmlinuz.name)
            shutil.copy2(root / initrd_in_tree.lstrip("/"), stage / f"initrd.img-{kver}")
            size = (stage / f"initrd.img-{kver}").stat().st_size
            info = {"key": key, "rootfs": rootfs.key, "kver": kver, "kernel": vmlinuz.name,
                    "initrd": f"initrd.img-{kver}", "initrd_size": size,
                    "add_modules": list(add_modules), "module_dirs": [str(d) for d in module_dirs],
                    "add_drivers": list(add_drivers), "compress": compress,
                    "dracut_args": list(dracut_args), "tree_files": {k: str(v) for k, v in files.items()},
                    "seconds": {"dracut": round(t_dracut, 1), "total": round(time.monotonic() - start, 1)}}
            write_json_atomically(stage / "info.json", info)
            if out.exists():  # a --rebuild: replace the old build
                os.rename(out, work / "old")
            os.rename(stage, out)
        log(f"initramfs {size / 1e6:.1f} MB in {t_dracut:.0f} s")
        prune_cache(cdir, "boot-", keep=CACHED_BUILDS, log=log)
        return BootFiles(out / vmlinuz.name, out / f"initrd.img-{kver}", kver, size, key, False,
                         time.monotonic() - start, info)


def install_tree_extras(root: Path, *, module_dirs: Sequence[Path] = (),
                        tree_files: Mapping[str, Path] | None = None) -> None:
    """Copy dracut module dirs into the root's modules.d and put tree files in place."""
    modules_d = root / "usr/lib/dracut/modules.d"
    for d in module_dirs:
        dest = modules_d / _module_dir_name(d)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(d, dest, symlinks=True)
        for p in [dest, *dest.rglob("*")]:  # dracut sources module-setup.sh; scripts run as root
            if p.is_file() and p.suffix == ".sh":
                p.chmod(p.stat().st_mode | 0o755)
    for dest, src in (tree_files or {}).items():
        target = root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(src, target)
