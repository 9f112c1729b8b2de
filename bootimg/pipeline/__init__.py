"""The whole build, layer over layer: a manifest in, a bootable release out.

The layers below know nothing of each other's internals; this module composes them, in the
order of the data flow: the release (sources -> composefs images -> signatures,
``bootimg.release``) with what the boot layer adds to its root tree (``bootimg.boot``), after
the boot layer's pre-flight check of that tree (``bootimg.boot.preflight``: can it boot a
verified composefs root?), which runs on the root tree the build has assembled, before its image
is written.
"""

from __future__ import annotations

import tempfile

from ..boot import preflight
from ..boot.preflight import BootCheck
from ..boot.steps import ROOT_STEPS
from ..composefs.store import ObjectStore
from ..manifest.model import Manifest
from ..release.build import BuildContext, BuildOptions, BuildResult, RootSteps, build_release, root_tree
from ..release.layout import ReleaseDir

__all__ = ["BuildOptions", "BuildResult", "build", "check_rootfs", "root_steps"]


def root_steps(boot_check: bool = True) -> RootSteps:
    """The boot layer's steps, with the pre-flight check first unless ``boot_check`` is off
    (a release that never boots as a root, e.g. one only mounted for its containers)."""
    if not boot_check:
        return ROOT_STEPS
    return RootSteps(contributors=ROOT_STEPS.contributors, tree_hooks=(preflight.check_hook, *ROOT_STEPS.tree_hooks))


def build(manifest: Manifest, options: BuildOptions, *, boot_check: bool = True) -> BuildResult:
    """The signed release of ``manifest``, with the boot layer's units and initramfs module in
    its root image; refused (BootCheckError, every problem) when ``boot_check`` is on and the
    root cannot boot a verified composefs root."""
    return build_release(manifest, options, root_steps(boot_check))


def check_rootfs(manifest: Manifest) -> BootCheck:
    """``bootimg validate --root``: the pre-flight check on the manifest's root tree as the build
    assembles it (its source, the manifest's excludes and added files; not the boot layer's own
    files, which the check does not look for), loaded into a scratch object store that is removed
    afterwards. Raises BootCheckError when it cannot boot."""
    from ..manifest.loader import placer

    with tempfile.TemporaryDirectory(prefix="bootimg-validate-") as scratch:
        release = ReleaseDir(scratch)
        # A scratch store: whether it can have fs-verity does not matter.
        store = ObjectStore(release.objects, fsync=False, on_notice=lambda _msg: None)
        root = root_tree(BuildContext(manifest=manifest, store=store, out=release), RootSteps())
        return preflight.require_bootable(root, release, manifest.integrity.trust,
                                          preflight.source_label(manifest.rootfs.source.path), manifest.boot.initramfs,
                                          placer(manifest.source_file, ("boot", "initramfs")))
