"""`bootimg build`: a manifest in, a signed, reproducible release directory out.

The pipeline, in order (each step a function below):

1. load every container's image source into the shared object store and write its image;
2. assemble the root tree: its source, minus the manifest's excludes, plus its extra files,
   plus what the release *injects* so that the root's digest covers it (the containers'
   digests, the trusted keys, and the contributions of later layers such as units and boot
   files, registered in ``ROOT_CONTRIBUTORS``);
3. write the root image;
4. describe the release (release.json) and sign it; fs-verity PKCS#7 signatures per image;
5. report what the images share, and what later layers report (``RELEASE_REPORTERS``, e.g.
   the containers' sandbox scores); move the finished directory into place atomically.

Everything derives from the manifest and its inputs (timestamps from source_date_epoch,
canonical JSON, deterministic signatures), so the same inputs give the same bytes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..composefs import fsverity
from ..composefs.store import ObjectStore
from ..composefs.tree import Node
from ..composefs.writer import ImageOptions, write_image
from ..errors import BootimgError
from ..manifest.model import Container, Manifest
from ..signing import PublicKey, SecretKey, fsverity_pkcs7_sign, make_trusted_comment, sign
from ..sources import SourcePolicy, load_source, treeops
from . import layout
from .description import ImageRecord, canonical_json, describe_release
from .sharing import external_objects, sharing_report

# Composefs format of every image: v1 is what composefs-rs reads as "v1" and what bootc seals.
IMAGE_OPTIONS = ImageOptions(min_version=1, max_version=1)


@dataclass(frozen=True)
class InjectedFile:
    """A file the release adds to the root tree (so the root digest covers it)."""

    path: str            # absolute, in the root
    content: bytes
    mode: int = 0o644


@dataclass
class BuildContext:
    """What later steps and root contributors may read."""

    manifest: Manifest
    store: ObjectStore
    containers: dict[str, ImageRecord] = field(default_factory=dict)
    container_configs: dict[str, dict | None] = field(default_factory=dict)
    trusted_keys: list[PublicKey] = field(default_factory=list)
    injected: dict[str, InjectedFile] = field(default_factory=dict)   # by path, once the root is assembled


# Functions that add files to the root tree; later layers (units, initramfs) register here.
RootContributor = Callable[[BuildContext], list[InjectedFile]]
ROOT_CONTRIBUTORS: list[RootContributor] = []


def root_contributor(fn: RootContributor) -> RootContributor:
    ROOT_CONTRIBUTORS.append(fn)
    return fn


# Functions that edit the finished root tree (what InjectedFile cannot express, e.g. an
# empty directory); they run after every contributor's files are in.
RootTreeHook = Callable[[BuildContext, Node], None]
ROOT_TREE_HOOKS: list[RootTreeHook] = []


def root_tree_hook(fn: RootTreeHook) -> RootTreeHook:
    ROOT_TREE_HOOKS.append(fn)
    return fn


@dataclass(frozen=True)
class Report:
    """A report file in the release directory (not signed, not used at boot) and the lines
    `bootimg build` prints about it."""

    file: str
    data: dict
    summary: tuple[str, ...] = ()


# Functions that describe the built release in a report of their own (None: nothing to
# report); they run once the root image is written, and their reports sit next to sharing.json.
ReleaseReporter = Callable[[BuildContext], "Report | None"]
RELEASE_REPORTERS: list[ReleaseReporter] = []


def release_reporter(fn: ReleaseReporter) -> ReleaseReporter:
    RELEASE_REPORTERS.append(fn)
    return fn


# Here rather than with the imports above: the boot layer imports the names defined so far.
from .. import boot  # noqa: E402,F401  (registers root contributors and reporters)


@dataclass(frozen=True)
class BuildOptions:
    out: Path
    signing_key: SecretKey | None = None
    verity_key_pem: bytes | None = None
    verity_cert_pem: bytes | None = None
    force: bool = False
    fsync: bool = True


@dataclass
class BuildResult:
    out: Path
    release: dict
    sharing: dict
    reports: list[Report] = field(default_factory=list)


def build_release(manifest: Manifest, options: BuildOptions) -> BuildResult:
    out = Path(options.out).absolute()
    if out.exists() and not options.force:
        raise BootimgError("already exists (use --force to replace it)", file=str(out))
    _check_signing(manifest, options)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        (tmp / layout.IMAGES_DIR).mkdir(parents=True)
        # fs-verity is enabled where the release is installed (the target's filesystem);
        # whether the build host can enable it too does not matter, so no notice about it.
        # Objects are not fsynced one by one (106k journal commits for a /usr root); the
        # whole release is synced once before it is renamed into place.
        store = ObjectStore(tmp / layout.OBJECTS_DIR, fsync=False, on_notice=lambda _msg: None)
        ctx = BuildContext(manifest=manifest, store=store, trusted_keys=_trusted_keys(manifest))
        trees: dict[str, Node] = {}
        for container in manifest.containers:
            trees[container.name] = _container_tree(ctx, container)
            ctx.containers[container.name] = _write_image(tmp, container.name, "container", trees[container.name])
        root = _root_tree(ctx)
        trees[layout.ROOT_IMAGE_NAME] = root
        root_record = _write_image(tmp, layout.ROOT_IMAGE_NAME, "root", root)
        records = [root_record] + [ctx.containers[c.name] for c in manifest.containers]
        if options.verity_key_pem is not None:
            _sign_images(tmp, records, options)
        release = describe_release(manifest, records, verity_cert=options.verity_key_pem is not None)
        release_bytes = canonical_json(release)
        (tmp / layout.RELEASE_JSON).write_bytes(release_bytes)
        if options.signing_key is not None:
            comment = make_trusted_comment(file=layout.RELEASE_JSON, keyid=options.signing_key.keyid,
                                           timestamp=manifest.identity.source_date_epoch)
            (tmp / layout.RELEASE_SIG).write_bytes(sign(options.signing_key, release_bytes, comment))
        _prune_store(store, trees)
        report = sharing_report(trees, records)
        (tmp / layout.SHARING_JSON).write_bytes(canonical_json(report))
        reports = [r for r in (reporter(ctx) for reporter in RELEASE_REPORTERS) if r is not None]
        for extra in reports:
            (tmp / extra.file).write_bytes(canonical_json(extra.data))
        _commit(tmp, out, options.fsync)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(out=out, release=release, sharing=report, reports=reports)


def _check_signing(manifest: Manifest, options: BuildOptions) -> None:
    trust = manifest.integrity.trust
    if trust == "signed":
        if options.signing_key is None:
            raise BootimgError("trust profile 'signed' needs a signing key (--key SECRET.key)",
                               file=str(manifest.source_file or "manifest"))
        trusted = {k.keyid for k in _trusted_keys(manifest)}
        if options.signing_key.keyid not in trusted:
            raise BootimgError(f"signing key {options.signing_key.keyid} is not among the manifest's trusted keys "
                               f"({', '.join(sorted(trusted))}): the initramfs would refuse this release",
                               file=str(manifest.source_file or "manifest"))
    if (options.verity_key_pem is None) != (options.verity_cert_pem is None):
        raise BootimgError("--verity-key and --verity-cert go together")


def _trusted_keys(manifest: Manifest) -> list[PublicKey]:
    return [PublicKey.from_file(path) for path in manifest.integrity.trusted_keys]


def _container_tree(ctx: BuildContext, container: Container) -> Node:
    loaded = load_source(container.image, ctx.store, policy=SourcePolicy(allow_devices=False),
                         label=f"container {container.name}")
    ctx.container_configs[container.name] = loaded.oci_config
    return loaded.root


def _root_tree(ctx: BuildContext) -> Node:
    manifest = ctx.manifest
    rootfs = manifest.rootfs
    root = load_source(rootfs.source, ctx.store, policy=SourcePolicy(allow_devices=True), label="rootfs").root
    if rootfs.exclude:
        treeops.exclude(root, list(rootfs.exclude))
    epoch = manifest.identity.source_date_epoch
    for extra in rootfs.add_files:
        if extra.text is not None:
            content = extra.text.encode()
        else:
            try:
                content = Path(extra.source_path).read_bytes()
            except OSError as err:
                raise BootimgError(f"cannot read file for {extra.path}: {err.strerror}",
                                   file=str(extra.source_path)) from None
        treeops.add_file(root, extra.path, content, int(extra.mode, 8), mtime=epoch, store=ctx.store)
    injected: list[InjectedFile] = []
    for contributor in [_containers_json, _trusted_key_files] + ROOT_CONTRIBUTORS:
        injected.extend(contributor(ctx))
    for item in sorted(injected, key=lambda f: f.path):
        treeops.add_file(root, item.path, item.content, item.mode, mtime=epoch, store=ctx.store)
        ctx.injected[item.path] = item
    for hook in ROOT_TREE_HOOKS:
        hook(ctx, root)
    return root


def _containers_json(ctx: BuildContext) -> list[InjectedFile]:
    """The digest of every container image, so the units can refuse any other image."""
    data = {
        "format": layout.RELEASE_FORMAT,
        "containers": {name: {"image": rec.path, "digest": rec.digest, "size": rec.size}
                       for name, rec in sorted(ctx.containers.items())},
    }
    return [InjectedFile(layout.ROOT_CONTAINERS_JSON, canonical_json(data))]


def _trusted_key_files(ctx: BuildContext) -> list[InjectedFile]:
    """The release keys the system trusts for its next update, one minisign .pub per key."""
    return [InjectedFile(f"{layout.ROOT_KEYS_DIR}/{key.keyid}.pub", key.to_bytes()) for key in ctx.trusted_keys]


def _write_image(tmp: Path, name: str, role: str, root: Node) -> ImageRecord:
    data = write_image(root, IMAGE_OPTIONS)
    rel = layout.image_file(name)
    (tmp / rel).write_bytes(data)
    return ImageRecord(name=name, role=role, path=rel, digest=fsverity.digest(data).hex(), size=len(data),
                       format_version=IMAGE_OPTIONS.max_version)


def _prune_store(store: ObjectStore, trees: dict[str, Node]) -> None:
    """Drop objects no image references (files later excluded or whited out by an upper
    layer), so the release holds exactly what it needs."""
    referenced = set()
    for tree in trees.values():
        referenced.update(external_objects(tree))
    for digest, path in list(store.iter_objects()):
        if digest not in referenced:
            os.unlink(path)


def _sign_images(tmp: Path, records: list[ImageRecord], options: BuildOptions) -> None:
    (tmp / layout.KEYS_DIR).mkdir(exist_ok=True)
    (tmp / layout.VERITY_CERT).write_bytes(options.verity_cert_pem)
    for rec in records:
        der = fsverity_pkcs7_sign(bytes.fromhex(rec.digest), options.verity_key_pem, options.verity_cert_pem)
        (tmp / f"{rec.path}.p7s").write_bytes(der)


def _commit(tmp: Path, out: Path, sync: bool) -> None:
    """Put the finished release in place in one rename (after replacing an old one, if forced),
    once everything in it is on disk."""
    if sync:
        os.sync()
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
