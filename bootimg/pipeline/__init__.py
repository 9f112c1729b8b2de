"""The whole build, layer over layer: a manifest in, a bootable release out.

The layers below know nothing of each other's internals; this module composes them, in the
order of the data flow: the release (sources -> composefs images -> signatures,
``bootimg.release``) with what the boot layer adds to its root tree (``bootimg.boot``).
"""

from __future__ import annotations

from ..boot import ROOT_STEPS
from ..manifest.model import Manifest
from ..release.build import BuildOptions, BuildResult, build_release

__all__ = ["BuildOptions", "BuildResult", "build"]


def build(manifest: Manifest, options: BuildOptions) -> BuildResult:
    """The signed release of ``manifest``, with the boot layer's units and initramfs module in
    its root image."""
    return build_release(manifest, options, ROOT_STEPS)
