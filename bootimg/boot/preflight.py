"""Pre-flight check: can this root tree boot a verified composefs root?

A release whose root lacks the initramfs generator or the kernel features the initramfs
program needs builds fine and only fails on the target, at boot. The kernel and the
initramfs are made from the root image (dracut runs inside it), so the build checks the root
tree as its image will hold it (``check_hook``, a tree hook the pipeline puts first in the boot
layer's steps: after the manifest's excludes and added files, before the image is written; the
root is not loaded a second time), and ``bootimg validate --root`` checks the same tree alone.
Files are read through the tree and its object store, never from the host.

What the root needs:

- a kernel: ``/usr/lib/modules/KVER/vmlinuz`` (Fedora, UKI builds) or ``/boot/vmlinuz-KVER``
  (Debian) for a KVER with a modules directory; the newest one is checked (the one the
  initramfs is built for). It must be
  Linux 6.6 or newer (overlayfs data-only lower layers and ``verity=`` are new in 6.6: a 6.1
  kernel does not mount a composefs root), have every module the initramfs module installs
  (``initramfs.KERNEL_MODULES``) built in (``modules.builtin``) or as a module file, and, when
  its configuration is there (``/boot/config-KVER`` or ``/usr/lib/modules/KVER/config``),
  ``CONFIG_FS_VERITY=y`` (fs-verity cannot be a module);
- systemd (``/usr/lib/systemd/systemd``): the initramfs and the root are systemd-based;
- dracut (``/usr/bin/dracut``) with the dracut modules 90bootimg depends on
  (``initramfs.DRACUT_DEPENDS``) in its modules directory.

The initramfs takes no program of the root's besides dracut's own: bootimg-setup-root (put into
the root by the build, which checks the root's glibc when it does) does the whole boot path.

With a lean initramfs profile (the manifest's ``boot.initramfs``), also what dracut would
silently get wrong or only fail on: every driver it names is a module of that kernel or built
into it (dracut skips a driver it does not find), every dracut module it lists or omits is in
the root's dracut, and the compressor it asks for is in the root and its kernel can unpack it
(``CONFIG_RD_*``; dracut falls back to another compressor without it). These problems are
reported at their place in the profile (``BootCheck.initramfs``).

Each missing piece is one line naming it and what provides it; every one is reported.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..composefs.tree import Node
from ..errors import BootimgError
from ..manifest.model import Initramfs
from ..release.build import BuildContext
from ..release.layout import ReleaseDir
from . import initramfs
from .image_view import ContainerImage

MIN_KERNEL = (6, 6)
SYSTEMD = "/usr/lib/systemd/systemd"
DRACUT = "/usr/bin/dracut"
DRACUT_MODULES = "/usr/lib/dracut/modules.d"
MODULES_DIRS = ("/usr/lib/modules", "/lib/modules")
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
READ_MAX = 16 << 20            # a kernel config is ~300 KB, modules.builtin ~10 KB

# Kernel module -> (what it is, its Kconfig symbol, where its module file lives).
KERNEL_FEATURES = {
    "erofs": ("EROFS", "CONFIG_EROFS_FS", "kernel/fs/erofs"),
    "overlay": ("overlayfs", "CONFIG_OVERLAY_FS", "kernel/fs/overlayfs"),
    "loop": ("loop devices", "CONFIG_BLK_DEV_LOOP", "kernel/drivers/block"),
}
PROGRAM_DIRS = ("/usr/bin", "/usr/sbin", "/bin", "/sbin")
KERNEL_PACKAGE = "a kernel package (Debian: linux-image-amd64 or linux-image-arm64, Fedora: kernel-core)"
NEW_KERNEL = "a Linux 6.6 or newer kernel (Debian bookworm: linux-image-amd64 or -arm64 from bookworm-backports)"

_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")
_CONFIG = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$|^# (CONFIG_[A-Za-z0-9_]+) is not set$")


# Where a problem of the initramfs profile is, inside it (("drivers", 2)), and what it is.
ProfileProblem = tuple[tuple[str | int, ...], str]
# Formats one: the line naming the manifest (or release.json) place of the profile.
Place = Callable[[tuple[str | int, ...], str], str]


class BootCheckError(BootimgError):
    """The root cannot boot a verified composefs root: one line per missing piece."""

    def __init__(self, label: str, problems: list[str], more: list[str] = ()):
        self.problems = problems
        self.lines = [f"{label}: {p}" for p in problems] + list(more)
        super().__init__("\n".join(self.lines))


@dataclass
class BootCheck:
    """What the check found: the kernel it checked and every problem (none: it can boot)."""

    kernel: str | None = None
    modules: dict[str, str] = field(default_factory=dict)    # kernel module -> "built in" | "module"
    fsverity: str = "not checked (no kernel config in the root)"
    problems: list[str] = field(default_factory=list)
    initramfs: list[ProfileProblem] = field(default_factory=list)   # of the initramfs profile

    @property
    def ok(self) -> bool:
        return not self.problems and not self.initramfs

    def summary(self) -> str:
        mods = ", ".join(f"{m} {how}" for m, how in self.modules.items())
        return f"kernel {self.kernel} ({mods}; fs-verity {self.fsverity}), systemd, dracut"


def check_root(root: Node, release: ReleaseDir, trust: str, initramfs: Initramfs | None = None) -> BootCheck:
    """Check the root tree ``root`` (external files read from ``release``'s object store) for
    trust profile ``trust`` and, when given, the initramfs profile ``initramfs``."""
    view = ContainerImage(root, release)
    result = BootCheck()
    kernel = _check_kernel(view, result)
    if not _is_file(view, SYSTEMD):
        result.problems.append(f"the root has no systemd ({SYSTEMD}): install the systemd package")
    _check_dracut(view, result)
    if initramfs is not None:
        result.initramfs = _check_profile(view, initramfs, kernel)
    return result


def check_profile(root: Node, release: ReleaseDir, initramfs: Initramfs) -> list[ProfileProblem]:
    """The initramfs profile's problems alone, against the root tree (``bootimg initramfs``
    checks a release's profile before dracut runs)."""
    view = ContainerImage(root, release)
    return _check_profile(view, initramfs, _check_kernel(view, BootCheck()))


def require_bootable(root: Node, release: ReleaseDir, trust: str, label: str, initramfs: Initramfs | None = None,
                     place: Place | None = None) -> BootCheck:
    """``check_root``, raising BootCheckError (every problem, one line each) when it fails; the
    profile's problems are formatted by ``place``."""
    result = check_root(root, release, trust, initramfs)
    if not result.ok:
        where = place or (lambda path, message: f"{label}: boot.initramfs.{format_place(path)}: {message}")
        raise BootCheckError(label, result.problems, [where(path, message) for path, message in result.initramfs])
    return result


def format_place(path: tuple[str | int, ...]) -> str:
    """``("drivers", 2)`` -> ``drivers[2]``."""
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))


def source_label(source_path: object) -> str:
    """How the messages name the root: like the sources' own errors (``rootfs: PATH``)."""
    return f"rootfs: {source_path}"


def check_hook(ctx: BuildContext, root: Node) -> None:
    """The build's check of the root as loaded: refuse one that cannot boot before any of it is
    written (the profile's problems at their place in the manifest)."""
    from ..manifest.loader import placer

    m = ctx.manifest
    require_bootable(root, ctx.out, m.integrity.trust, source_label(m.rootfs.source.path), m.boot.initramfs,
                     placer(m.source_file, ("boot", "initramfs")))


# -- the pieces --------------------------------------------------------------------------------------

def _is_file(view: ContainerImage, path: str) -> bool:
    node = view.resolve(path)
    return node is not None and node.is_reg()


def _read(view: ContainerImage, path: str) -> bytes | None:
    """A small regular file's content (None: missing, not a file, or too large to be what it should be)."""
    node = view.resolve(path)
    if node is None or not node.is_reg() or node.size > READ_MAX:
        return None
    return view.read(path)


def _listdir(view: ContainerImage, path: str) -> list[str]:
    node = view.resolve(path)
    if node is None or not node.children:
        return []
    return sorted(name.decode("utf-8", "surrogateescape") for name in node.children)


def kernel_version(kver: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a kernel release string such as ``6.12.95+deb12-amd64``."""
    m = _VERSION.match(kver)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def _version_key(kver: str) -> tuple:
    return (kernel_version(kver) or (0, 0, 0), kver)


def find_kernel(view: ContainerImage) -> tuple[str, str] | None:
    """(KVER, path of its image) of the kernel the root boots: the newest KVER with a modules
    directory and a ``/usr/lib/modules/KVER/vmlinuz`` or ``/boot/vmlinuz-KVER``."""
    kvers = {kver for base in MODULES_DIRS for kver in _listdir(view, base)
             if (node := view.resolve(f"{base}/{kver}")) is not None and node.is_dir()}
    for kver in sorted(kvers, key=_version_key, reverse=True):
        for path in (f"/usr/lib/modules/{kver}/vmlinuz", f"/lib/modules/{kver}/vmlinuz", f"/boot/vmlinuz-{kver}"):
            if _is_file(view, path):
                return kver, path
    return None


def _unmatched_kernel(view: ContainerImage) -> str | None:
    """A ``/boot/vmlinuz-KVER`` without its modules directory, if the root has one."""
    names = [n for n in _listdir(view, "/boot") if n.startswith("vmlinuz-") and _is_file(view, f"/boot/{n}")]
    return max((n[8:] for n in names), key=_version_key, default=None)


def _modules_dir(view: ContainerImage, kver: str) -> str | None:
    for base in MODULES_DIRS:
        node = view.resolve(f"{base}/{kver}")
        if node is not None and node.is_dir():
            return f"{base}/{kver}"
    return None


def _norm(module: str) -> str:
    return module.replace("-", "_")


def _module_files(view: ContainerImage, moddir: str) -> set[str]:
    """The module names that have a file under ``moddir`` (compressed or not)."""
    top = view.resolve(moddir)
    names: set[str] = set()
    for node in top.walk() if top is not None else ():
        name = node.name.decode("utf-8", "surrogateescape")
        for suffix in MODULE_SUFFIXES:
            if name.endswith(suffix) and node.target().is_reg():
                names.add(_norm(name[: -len(suffix)]))
    return names


def _builtin(view: ContainerImage, moddir: str) -> set[str]:
    data = _read(view, f"{moddir}/modules.builtin") or b""
    names = set()
    for line in data.decode("utf-8", "replace").splitlines():
        base = line.strip().rsplit("/", 1)[-1]
        if base.endswith(".ko"):
            names.add(_norm(base[:-3]))
    return names


def _config(view: ContainerImage, kver: str, moddir: str | None) -> tuple[str | None, dict[str, str]]:
    """The kernel's configuration (path, symbol -> value; "n" for "is not set"), if the root has it."""
    for path in (f"/boot/config-{kver}", f"{moddir}/config" if moddir else None):
        data = _read(view, path) if path else None
        if data is None:
            continue
        values = {}
        for line in data.decode("utf-8", "replace").splitlines():
            m = _CONFIG.match(line)
            if m:
                values[m.group(1) or m.group(3)] = m.group(2) if m.group(1) else "n"
        return path, values
    return None, {}


@dataclass(frozen=True)
class _Kernel:
    """What the checks of the initramfs profile need of the kernel the root boots."""

    kver: str
    moddir: str | None
    config_path: str | None
    config: dict[str, str]
    builtin: set[str]
    files: set[str]


def _check_kernel(view: ContainerImage, result: BootCheck) -> _Kernel | None:
    found = find_kernel(view)
    if found is None:
        orphan = _unmatched_kernel(view)
        if orphan is not None:
            result.problems.append(f"the root's kernel {orphan} (/boot/vmlinuz-{orphan}) has no modules directory "
                                   f"(/usr/lib/modules/{orphan}): install the kernel package's modules")
        else:
            result.problems.append("the root has no kernel (/usr/lib/modules/KVER/vmlinuz or /boot/vmlinuz-KVER): "
                                   f"install {KERNEL_PACKAGE}")
        return None
    kver, path = found
    result.kernel = kver
    version = kernel_version(kver)
    if version is None or version[:2] < MIN_KERNEL:
        why = "its version cannot be read" if version is None else "it is older than Linux 6.6"
        result.problems.append(f"the root's kernel {kver} ({path}) cannot mount a composefs root: {why}, "
                               "and overlayfs data-only layers and verity= need 6.6 or newer: "
                               f"install {NEW_KERNEL}")
    moddir = _modules_dir(view, kver)
    config_path, config = _config(view, kver, moddir)
    if config_path is not None:
        if config.get("CONFIG_FS_VERITY") == "y":
            result.fsverity = "built in"
        else:
            result.problems.append(f"the root's kernel {kver} has no fs-verity ({config_path}: CONFIG_FS_VERITY="
                                   f"{config.get('CONFIG_FS_VERITY', 'n')}; it cannot be a module): install a kernel "
                                   "built with CONFIG_FS_VERITY=y")
    builtin, files = _builtin(view, moddir), _module_files(view, moddir)
    for module in initramfs.KERNEL_MODULES:
        what, symbol, where = KERNEL_FEATURES.get(module, (module, None, "kernel"))
        if _norm(module) in builtin or (symbol and config.get(symbol) == "y"):
            result.modules[module] = "built in"
        elif _norm(module) in files:
            result.modules[module] = "module"
        else:
            wanted = f"a kernel built with {symbol}=y or =m" if symbol else f"a kernel with the {module} module"
            result.problems.append(f"the root's kernel {kver} has no {what} (not in {moddir}/modules.builtin, no "
                                   f"{moddir}/{where}/{module}.ko*): install {wanted}")
    return _Kernel(kver, moddir, config_path, config, builtin, files)


def _did_you_mean(name: str, known: set[str]) -> str:
    guess = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean '{guess[0]}'?)" if guess else ""


def _check_profile(view: ContainerImage, profile: Initramfs, kernel: _Kernel | None) -> list[ProfileProblem]:
    """Every driver, dracut module and compressor the profile names, against the root."""
    out: list[ProfileProblem] = []
    if kernel is not None:
        known = kernel.builtin | kernel.files
        for j, driver in enumerate(profile.drivers or ()):
            if _norm(driver) not in known:
                out.append((("drivers", j), f"'{driver}' is no module of the root's kernel {kernel.kver} (not in "
                                            f"{kernel.moddir}/modules.builtin, no {kernel.moddir}/kernel/.../{driver}.ko*)"
                                            + _did_you_mean(_norm(driver), known)))
    present = {re.sub(r"^\d\d", "", name) for name in _listdir(view, DRACUT_MODULES)}
    if _is_file(view, DRACUT):
        for key in ("modules", "omit"):
            for j, name in enumerate(getattr(profile, key) or ()):
                if name not in present:
                    out.append(((key, j), f"the root's dracut has no '{name}' module (no {DRACUT_MODULES}/NN{name})"
                                          + _did_you_mean(name, present)))
    if profile.compress is not None:
        c = initramfs.COMPRESSORS[profile.compress]
        program, package, symbol = c.program, c.package, c.kernel_symbol
        if not any(_is_file(view, f"{d}/{program}") for d in PROGRAM_DIRS):
            out.append((("compress",), f"the root has no {program} (/usr/bin/{program}), which dracut compresses a "
                                       f"{profile.compress} initramfs with: install the {package} package in it"))
        if kernel is not None and kernel.config_path is not None and kernel.config.get(symbol) != "y":
            out.append((("compress",), f"the root's kernel {kernel.kver} cannot unpack a {profile.compress} initramfs "
                                       f"({kernel.config_path}: {symbol}={kernel.config.get(symbol, 'n')})"))
    return out


def _check_dracut(view: ContainerImage, result: BootCheck) -> None:
    if not _is_file(view, DRACUT):
        result.problems.append(f"the root has no dracut ({DRACUT}): install the dracut package")
        return
    present = {re.sub(r"^\d\d", "", name) for name in _listdir(view, DRACUT_MODULES)}
    for dep in initramfs.DRACUT_DEPENDS:
        if dep not in present:
            result.problems.append(f"the root's dracut has no '{dep}' module ({DRACUT_MODULES}/NN{dep}), which "
                                   f"the bootimg module depends on: install dracut's {dep} support "
                                   "(Debian: the dracut-core package)")
