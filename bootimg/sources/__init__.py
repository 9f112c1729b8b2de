"""Sources: the file trees images are made of (a directory, a tar archive, an OCI image
layout), loaded into an in-memory composefs tree whose large files are already in the object
store. Hostile input is refused with one line (SourceError) and nothing is ever written but
store objects.

    from bootimg.sources import load_source, SourcePolicy
    loaded = load_source(manifest.rootfs.source, store)                 # rootfs: devices allowed
    app = load_source(c.image, store, label=c.name)                     # containers: no devices
    image = write_image(loaded.root)
"""

from __future__ import annotations

from ..composefs.store import ObjectStore
from ..manifest.model import Source
from .common import LoadedSource, SourceError, SourcePolicy, SourceStats
from .directory import load_directory
from .oci import DEFAULT_PLATFORM, load_oci
from .tar import load_tar

__all__ = ["LoadedSource", "SourceError", "SourcePolicy", "SourceStats", "load_source",
           "load_directory", "load_tar", "load_oci"]


def load_source(source: Source, store: ObjectStore, *, policy: SourcePolicy = SourcePolicy(),
                label: str = "rootfs", platform: str = DEFAULT_PLATFORM) -> LoadedSource:
    """Load ``source`` into a tree ready for ``write_image``.

    ``label`` names what is loaded in errors ("rootfs" or a container's name) and picks the
    default device policy (see SourcePolicy). ``platform`` ("os/arch[/variant]") chooses among
    the manifests of a multi-platform OCI index when there is more than one image."""
    if source.type == "directory":
        return load_directory(source.path, store, policy, label)
    if source.type == "tar":
        return load_tar(source.path, store, policy, label)
    if source.type == "oci":
        return load_oci(source.path, source.ref, store, policy, label, platform)
    raise SourceError(f"unknown source type {source.type!r}", file=str(source.path), label=label)
