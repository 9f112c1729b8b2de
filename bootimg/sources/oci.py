"""OCI image layouts (a directory with ``oci-layout``, ``index.json`` and ``blobs/sha256/``), or
an OCI archive (the same layout in a plain tar: ``skopeo copy oci-archive:``, ``podman save
--format oci-archive``, osbuild's org.osbuild.oci-archive): index -> (nested index ->) manifest
-> config + layers, the layers applied in order with whiteouts and opaque directories (see
tar.py) onto one tree. An archive is read in place, member by member; nothing is extracted.

Every blob read is checked against its descriptor while it is streamed: the sha256 digest and
the declared size (a blob's size is checked before it is read). A layer that turns out not to
match its digest is reported as such even when its bad content failed to parse first. When
the config lists ``rootfs.diff_ids``, each layer's uncompressed tar must hash to its diff_id.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tarfile
from typing import Any, BinaryIO

from ..composefs.store import ObjectStore
from .common import LoadedSource, SourceError, SourcePolicy
from .tar import TreeBuilder

INDEX_TYPES = frozenset((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
))
MANIFEST_TYPES = frozenset((
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))
CONFIG_TYPES = frozenset((
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
))
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar": "tar",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
REF_NAME = "org.opencontainers.image.ref.name"
JSON_MAX = 16 << 20          # index.json, manifests, configs
DEFAULT_PLATFORM = "linux/amd64"
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_MAX_NESTING = 4


class _NotRegular(OSError):
    """A FIFO, device, socket or directory where a file belongs."""


def _open_regular(path: str) -> BinaryIO:
    """open(path, "rb") for a regular file (symlinks followed, as tools lay blobs out that way);
    anything else raises _NotRegular, refused by stat before it is opened and by fstat after
    (O_NONBLOCK: a FIFO swapped in between cannot block the open)."""
    _require_regular(os.stat(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _require_regular(os.fstat(fd))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _require_regular(st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _NotRegular("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO, device or socket")


class _BlobReader:
    """Reads at most ``size`` bytes of a blob, hashing them."""

    def __init__(self, f: BinaryIO, size: int):
        self.f = f
        self.left = size
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self.left:
            n = self.left
        if n == 0:
            return b""
        data = self.f.read(n)
        self.left -= len(data)
        self.sha.update(data)
        return data

    def finish(self) -> str | None:
        """Read what is left; the sha256 hex if the blob had exactly the declared size."""
        while self.read(1 << 20):
            pass
        if self.left or self.f.read(1):
            return None
        return self.sha.hexdigest()


class Descriptor:
    __slots__ = ("media_type", "digest", "size", "annotations", "platform")

    def __init__(self, media_type: str, digest: str, size: int, annotations: dict, platform: dict | None):
        self.media_type = media_type
        self.digest = digest
        self.size = size
        self.annotations = annotations
        self.platform = platform

    @property
    def hex(self) -> str:
        return self.digest[7:]

    def platform_name(self) -> str:
        p = self.platform or {}
        parts = [str(p.get("os", "?")), str(p.get("architecture", "?"))]
        if p.get("variant"):
            parts.append(str(p["variant"]))
        return "/".join(parts)


class OciLayout:
    """An OCI image layout directory; OciArchive reads the same layout from a tar."""

    def __init__(self, path: str, label: str):
        self.path = path
        self.label = label

    def error(self, problem: str, context: str | None = None) -> SourceError:
        return SourceError(problem, file=self.path, label=self.label, context=context)

    # -- files and blobs --------------------------------------------------------------------------
    def open_file(self, name: str) -> tuple[BinaryIO, int]:
        """The layout's regular file ``name`` ('/'-separated): (an open file, its size).
        FileNotFoundError, _NotRegular (a FIFO or device is never opened for reading) or
        OSError when it cannot be opened."""
        f = _open_regular(os.path.join(self.path, name))
        return f, os.fstat(f.fileno()).st_size

    def _read_json_file(self, name: str) -> Any:
        try:
            f, _ = self.open_file(name)
            with f:
                data = f.read(JSON_MAX + 1)
        except FileNotFoundError:
            if name == "oci-layout":
                raise self.error("not an OCI image layout (no oci-layout file)") from None
            raise self.error(f"{name} is missing") from None
        except _NotRegular as e:
            raise self.error(f"{name} is not a regular file ({e})") from None
        except OSError as e:
            raise self.error(f"cannot read {name}: {e.strerror}") from None
        if len(data) > JSON_MAX:
            raise self.error(f"{name} is larger than {JSON_MAX} bytes")
        return self._parse_json(data, name)

    def _parse_json(self, data: bytes, what: str, context: str | None = None) -> dict:
        try:
            value = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise self.error(f"{what} is not valid JSON ({e})", context) from None
        except RecursionError:
            raise self.error(f"{what} is not valid JSON (nested too deeply)", context) from None
        if not isinstance(value, dict):
            raise self.error(f"{what} is not a JSON object", context)
        return value

    def descriptor(self, d: Any, what: str) -> Descriptor:
        if not isinstance(d, dict):
            raise self.error(f"{what}: descriptor is not a JSON object")
        media, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
        if not isinstance(digest, str):
            raise self.error(f"{what}: descriptor has no digest")
        if not _DIGEST.fullmatch(digest):
            algo = digest.split(":", 1)[0] if ":" in digest else digest[:20]
            if algo != "sha256":
                raise self.error(f"{what}: unsupported digest algorithm {algo!r} (only sha256)")
            raise self.error(f"{what}: invalid digest {digest[:80]!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise self.error(f"{what} {digest}: descriptor has no valid size")
        if media is not None and not isinstance(media, str):
            raise self.error(f"{what} {digest}: invalid mediaType")
        ann = d.get("annotations") or {}
        plat = d.get("platform")
        return Descriptor(media or "", digest, size, ann if isinstance(ann, dict) else {},
                          plat if isinstance(plat, dict) else None)

    @staticmethod
    def blob_name(desc: Descriptor) -> str:
        return f"blobs/sha256/{desc.hex}"

    def open_blob(self, desc: Descriptor, what: str) -> BinaryIO:
        context = f"{what} {desc.digest}"
        name = self.blob_name(desc)
        try:
            f, size = self.open_file(name)
        except FileNotFoundError:
            raise self.error(f"blob is missing ({name})", context) from None
        except _NotRegular:
            raise self.error("blob is not a regular file", context) from None
        except OSError as e:
            raise self.error(f"cannot open blob: {e.strerror}", context) from None
        if size != desc.size:
            f.close()
            raise self.error(f"blob is {size} bytes, its descriptor says {desc.size}", context)
        return f

    def mismatch(self, desc: Descriptor, what: str, actual: str | None) -> SourceError:
        if actual is None:
            return self.error("blob changed size while being read", f"{what} {desc.digest}")
        return self.error(f"blob content does not match its digest (it is sha256:{actual})",
                          f"{what} {desc.digest}")

    def read_json_blob(self, desc: Descriptor, what: str) -> dict:
        if desc.size > JSON_MAX:
            raise self.error(f"{what} of {desc.size} bytes is larger than {JSON_MAX}", f"{what} {desc.digest}")
        try:
            with self.open_blob(desc, what) as f:
                r = _BlobReader(f, desc.size)
                data = r.read(desc.size)
                actual = r.finish()
        except OSError as e:
            raise self.error(f"cannot read blob: {e.strerror}", f"{what} {desc.digest}") from None
        if actual != desc.hex:
            raise self.mismatch(desc, what, actual)
        return self._parse_json(data, what, f"{what} {desc.digest}")

    # -- selection ----------------------------------------------------------------------------------
    def check_layout(self) -> None:
        if not os.path.isdir(self.path):
            raise self.error("not a directory (an OCI image layout is one)")
        self.check_version()

    def check_version(self) -> None:
        version = self._read_json_file("oci-layout").get("imageLayoutVersion")
        if not isinstance(version, str) or not version.startswith("1."):
            raise self.error(f"unsupported imageLayoutVersion {version!r} in oci-layout")

    def _list(self, doc: dict, what: str) -> list[Descriptor]:
        items = doc.get("manifests")
        if not isinstance(items, list) or not items:
            raise self.error(f"{what} lists no manifests")
        return [self.descriptor(d, f"{what} manifest #{i + 1}") for i, d in enumerate(items)]

    def select(self, ref: str | None, platform: str) -> tuple[Descriptor, dict]:
        """The image manifest that ref names (or the only one), descending into indexes by
        platform; returns its descriptor and parsed content."""
        descs = self._list(self._read_json_file("index.json"), "index.json")
        if ref is None:
            chosen = descs if len(descs) == 1 else []
            if not chosen:
                raise self.error(f"index.json has {len(descs)} manifests and no ref was given; "
                                 f"available: {self._available(descs)}")
        elif ref.startswith("sha256:"):
            chosen = [d for d in descs if d.digest == ref]
            if not chosen:
                raise self.error(f"no manifest {ref} in index.json; available: {self._available(descs)}")
        else:
            chosen = [d for d in descs if d.annotations.get(REF_NAME) == ref]
            if not chosen:
                raise self.error(f"ref {ref!r} not found in index.json; available: {self._available(descs)}")
        desc = chosen[0] if len(chosen) == 1 else self._pick_platform(chosen, platform, "index.json")
        for _ in range(_MAX_NESTING):
            if desc.media_type in INDEX_TYPES:
                doc = self.read_json_blob(desc, "index")
                desc = self._pick_platform(self._list(doc, f"index {desc.digest}"), platform,
                                           f"index {desc.digest}")
                continue
            doc = None
            if not desc.media_type:   # not required by older layouts: look inside
                doc = self.read_json_blob(desc, "manifest")
                kind = doc.get("mediaType")
                if kind in INDEX_TYPES or (kind is None and "manifests" in doc):
                    desc.media_type = kind or "application/vnd.oci.image.index.v1+json"
                    continue
                desc.media_type = kind or "application/vnd.oci.image.manifest.v1+json"
            if desc.media_type not in MANIFEST_TYPES:
                raise self.error(f"unsupported manifest media type {desc.media_type!r}", f"manifest {desc.digest}")
            if doc is None:
                doc = self.read_json_blob(desc, "manifest")
            return desc, doc
        raise self.error(f"indexes nested more than {_MAX_NESTING} deep")

    @staticmethod
    def _available(descs: list[Descriptor]) -> str:
        refs = [d.annotations[REF_NAME] for d in descs if isinstance(d.annotations.get(REF_NAME), str)]
        if refs:
            return ", ".join(repr(r) for r in refs)
        return "no ref names; manifest digests " + ", ".join(d.digest for d in descs)

    def _pick_platform(self, descs: list[Descriptor], platform: str, what: str) -> Descriptor:
        want = platform.split("/")
        images = [d for d in descs
                  if not d.annotations.get("vnd.docker.reference.type")
                  and (d.platform or {}).get("os") != "unknown"]
        if len(images) == 1:
            return images[0]
        match = [d for d in images if d.platform
                 and d.platform.get("os") == want[0]
                 and len(want) > 1 and d.platform.get("architecture") == want[1]
                 and (len(want) < 3 or d.platform.get("variant") == want[2])]
        if match:
            return match[0]
        names = ", ".join(d.platform_name() for d in images) or "none"
        raise self.error(f"no manifest for platform {platform} in {what}; available: {names}")


class OciArchive(OciLayout):
    """An OCI image layout in a plain (uncompressed) tar, read in place: members are looked up by
    name ('./' prefixes ignored); only regular files count, and a name that appears twice is
    refused rather than guessed at."""

    def __init__(self, path: str, label: str):
        super().__init__(path, label)
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}

    def check_layout(self) -> None:
        try:
            self.tar = tarfile.open(self.path, mode="r:")
            members = self.tar.getmembers()
        except (tarfile.TarError, EOFError) as e:
            raise self.error(f"not an OCI image layout, nor an OCI archive (an uncompressed tar of one): {e}") from None
        except OSError as e:
            raise self.error(f"cannot read: {e.strerror}") from None
        for m in members:
            name = m.name
            while name.startswith("./"):
                name = name[2:]
            if name in self.members:
                raise self.error(f"archive member {name!r} appears more than once")
            self.members[name] = m
        self.check_version()

    def open_file(self, name: str) -> tuple[BinaryIO, int]:
        member = self.members.get(name)
        if member is None:
            raise FileNotFoundError(name)
        if not member.isreg():
            raise _NotRegular("not a regular file in the archive")
        return self.tar.extractfile(member), member.size

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def open_layout(path: str | os.PathLike[str], label: str) -> OciLayout:
    """The OCI layout at ``path``: a directory, or an archive when it is a regular file."""
    path = os.fspath(path)
    layout = OciArchive(path, label) if os.path.isfile(path) else OciLayout(path, label)
    layout.check_layout()
    return layout


def load_oci(path: str | os.PathLike[str], ref: str | None, store: ObjectStore,
             policy: SourcePolicy = SourcePolicy(), label: str = "rootfs",
             platform: str = DEFAULT_PLATFORM) -> LoadedSource:
    layout = open_layout(path, label)
    try:
        return _load(layout, ref, store, policy, label, platform)
    finally:
        if isinstance(layout, OciArchive):
            layout.close()


def _load(layout: OciLayout, ref: str | None, store: ObjectStore, policy: SourcePolicy, label: str,
          platform: str) -> LoadedSource:
    mdesc, manifest = layout.select(ref, platform)
    mctx = f"manifest {mdesc.digest}"

    cdesc = layout.descriptor(manifest.get("config"), f"{mctx}: config")
    if cdesc.media_type not in CONFIG_TYPES:
        raise layout.error(f"not a container image: config media type {cdesc.media_type!r}", mctx)
    layers_raw = manifest.get("layers")
    if not isinstance(layers_raw, list):
        raise layout.error("manifest has no layers list", mctx)
    n = len(layers_raw)
    layers = [layout.descriptor(d, f"{mctx}: layer {i + 1}/{n}") for i, d in enumerate(layers_raw)]
    for i, d in enumerate(layers):
        if d.media_type not in LAYER_TYPES:
            raise layout.error(f"unsupported layer media type {d.media_type!r}", f"layer {i + 1}/{n} {d.digest}")
    config = layout.read_json_blob(cdesc, "config")
    section = config.get("config") or {}
    if not isinstance(section, dict):
        raise layout.error("config section is not a JSON object", f"config {cdesc.digest}")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config.get("rootfs"), dict) else None
    if diff_ids and (not isinstance(diff_ids, list) or len(diff_ids) != n):
        raise layout.error(f"config lists {len(diff_ids) if isinstance(diff_ids, list) else '?'} diff_ids "
                           f"for {n} layers", f"config {cdesc.digest}")
    for i, d in enumerate(layers):  # fail fast: every blob present, with its size, before any work
        layout.open_blob(d, f"layer {i + 1}/{n}").close()

    builder = TreeBuilder(store, policy, label)
    for i, d in enumerate(layers):
        what = f"layer {i + 1}/{n}"
        with layout.open_blob(d, what) as f:
            reader = _BlobReader(f, d.size)
            try:
                diff = builder.apply(reader, file=layout.path, context=f"{what} {d.digest}", whiteouts=True,
                                     expect=LAYER_TYPES[d.media_type])
            except SourceError:
                actual = reader.finish()
                if actual != d.hex:   # the real cause: report it instead
                    raise layout.mismatch(d, what, actual) from None
                raise
            actual = reader.finish()
        if actual != d.hex:
            raise layout.mismatch(d, what, actual)
        if diff_ids and diff_ids[i] != f"sha256:{diff}":
            raise layout.error(f"uncompressed layer is sha256:{diff}, the config's diff_id is {diff_ids[i]!r}",
                               f"{what} {d.digest}")
    root = builder.finish()
    return LoadedSource(root=root, oci_config=section, stats=builder.stats())
