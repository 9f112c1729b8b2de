"""`bootimg build`: a manifest in, a signed, reproducible release directory out.

The pipeline, in order (each step a function below):

1. load every container's image source into the shared object store and write its image;
2. assemble the root tree: its source, minus the manifest's excludes, plus its extra files,
   plus what the release *injects* so that the root's digest covers it (the containers'
   digests, the trusted keys, and what the caller's ``RootSteps`` add: the boot layer's
   units and initramfs module, see ``bootimg.pipeline``);
3. write the root image;
4. describe the release (release.json) and sign it; fs-verity PKCS#7 signatures per image;
5. report what the images share, and what the caller's ``RootSteps.reporters`` report (the
   containers' sandbox scores); put the finished directory in place (``output``: one build
   per output at a time, atomic, and only ever replacing a release).

Everything derives from the manifest and its inputs (timestamps from source_date_epoch,
canonical JSON, deterministic signatures), so the same inputs give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import fsutil
from ..composefs import fsverity
from ..composefs.store import ObjectStore
from ..composefs.tree import Node
from ..composefs.writer import ImageOptions, write_image
from ..errors import BootimgError
from ..manifest.model import Container, Manifest
from ..signing import PublicKey, SecretKey, fsverity_pkcs7_sign, make_trusted_comment, sign
from ..sources import SourcePolicy, load_source, treeops
from . import layout, output
from .description import ImageRecord, canonical_json, describe_release
from .sharing import external_objects, sharing_report

KEY_FILE_MAX = 64 << 10         # a minisign public key file is ~100 bytes
ADD_FILE_MAX = 1 << 30          # a file the manifest adds to the root (read into memory)
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
    out: layout.ReleaseDir          # the release directory being built (images written so far)
    containers: dict[str, ImageRecord] = field(default_factory=dict)
    container_configs: dict[str, dict | None] = field(default_factory=dict)
    trusted_keys: list[PublicKey] = field(default_factory=list)
    injected: dict[str, InjectedFile] = field(default_factory=dict)   # by path, once the root is assembled


# A function that adds files to the root tree (the boot layer's units and initramfs module).
RootContributor = Callable[[BuildContext], list[InjectedFile]]
# A function that edits the finished root tree (what InjectedFile cannot express, e.g. an
# empty directory); it runs after every contributor's files are in.
RootTreeHook = Callable[[BuildContext, Node], None]


@dataclass(frozen=True)
class Report:
    """A report file in the release directory (not signed, not used at boot) and the lines
    `bootimg build` prints about it."""

    file: str
    data: dict
    summary: tuple[str, ...] = ()


# A function that describes the built release in a report of its own (None: nothing to
# report); it runs once the root image is written, and its report sits next to sharing.json.
ReleaseReporter = Callable[[BuildContext], "Report | None"]


@dataclass(frozen=True)
class RootSteps:
    """What layers above the release add to the root tree before its image is written, in
    order; passed explicitly by the caller (``bootimg.pipeline``)."""

    contributors: tuple[RootContributor, ...] = ()
    tree_hooks: tuple[RootTreeHook, ...] = ()
    reporters: tuple[ReleaseReporter, ...] = ()


@dataclass(frozen=True)
class BuildOptions:
    out: Path
    signing_key: SecretKey | None = None
    verity_key_pem: bytes | None = None
    verity_cert_pem: bytes | None = None
    force: bool = False
    fsync: bool = True
    on_notice: Callable[[str], None] | None = None     # one-line notices (waiting for a lock); default stderr


@dataclass
class BuildResult:
    out: Path
    release: dict
    sharing: dict
    reports: list[Report] = field(default_factory=list)


def build_release(manifest: Manifest, options: BuildOptions, steps: RootSteps = RootSteps()) -> BuildResult:
    _check_signing(manifest, options)
    with output.claim(options.out, force=options.force, on_notice=options.on_notice) as claimed:
        tmp = claimed.tmp
        try:
            release, report, reports = _build_into(tmp, manifest, options, steps)
        except OSError as err:   # what the steps below do not name themselves (ENOSPC, EIO, ...)
            raise BootimgError(f"cannot build the release: {err.strerror or err}",
                               file=err.filename if isinstance(err.filename, str) else str(tmp)) from None
        claimed.commit(options.fsync)
    return BuildResult(out=claimed.out, release=release, sharing=report, reports=reports)


def _build_into(tmp: Path, manifest: Manifest, options: BuildOptions,
                steps: RootSteps) -> tuple[dict, dict, list[Report]]:
    (tmp / layout.IMAGES_DIR).mkdir()
    # fs-verity is enabled where the release is installed (the target's filesystem);
    # the build host need not have it (`bootimg build` notes it once, about the finished release).
    # Objects are not fsynced one by one (106k journal commits for a /usr root); the
    # whole release is synced once before it is renamed into place.
    store = ObjectStore(tmp / layout.OBJECTS_DIR, fsync=False, on_notice=lambda _msg: None)
    ctx = BuildContext(manifest=manifest, store=store, out=layout.ReleaseDir(tmp),
                       trusted_keys=_trusted_keys(manifest))
    trees: dict[str, Node] = {}
    for container in manifest.containers:
        trees[container.name] = _container_tree(ctx, container)
        ctx.containers[container.name] = _write_image(tmp, container.name, "container", trees[container.name])
    root = root_tree(ctx, steps)
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
    # Objects no image references (files later excluded or whited out by an upper layer)
    # go, so the release holds exactly what it needs.
    store.prune(d for tree in trees.values() for d in external_objects(tree))
    report = sharing_report(trees, records)
    (tmp / layout.SHARING_JSON).write_bytes(canonical_json(report))
    reports = [r for r in (reporter(ctx) for reporter in steps.reporters) if r is not None]
    for extra in reports:
        (tmp / extra.file).write_bytes(canonical_json(extra.data))
    return release, report, reports


def _check_signing(manifest: Manifest, options: BuildOptions) -> None:
    """A release is signed with --key in either trust profile: with 'signed' the initramfs
    checks the signature; with 'sealed' it checks the root digest on the kernel command line
    instead, and the signature is for whoever checks the release before installing it
    (``bootimg verify --key``). Either way a key the manifest does not trust is refused, when
    it lists any: the release would not pass its own root's check."""
    file = str(manifest.source_file or "manifest")
    if options.signing_key is None:
        if manifest.integrity.trust == "signed":
            raise BootimgError("trust profile 'signed' needs a signing key (--key SECRET.key)", file=file)
    else:
        trusted = {k.keyid for k in _trusted_keys(manifest)}
        if (trusted or manifest.integrity.trust == "signed") and options.signing_key.keyid not in trusted:
            raise BootimgError(f"signing key {options.signing_key.keyid} is not among the manifest's trusted keys "
                               f"({', '.join(sorted(trusted)) or 'none'}): "
                               + ("the initramfs would refuse this release" if manifest.integrity.trust == "signed"
                                  else "the release's own root would not trust its signature"),
                               file=file)
    if (options.verity_key_pem is None) != (options.verity_cert_pem is None):
        raise BootimgError("--verity-key and --verity-cert go together")


def _trusted_keys(manifest: Manifest) -> list[PublicKey]:
    return [PublicKey.from_bytes(fsutil.read_regular(path, KEY_FILE_MAX, what="public key"), file=str(path))
            for path in manifest.integrity.trusted_keys]


def _container_tree(ctx: BuildContext, container: Container) -> Node:
    loaded = load_source(container.image, ctx.store, policy=SourcePolicy(allow_devices=False),
                         label=f"container {container.name}")
    ctx.container_configs[container.name] = loaded.oci_config
    return loaded.root


def root_tree(ctx: BuildContext, steps: RootSteps) -> Node:
    """The root tree as the build assembles it: the source, minus the excludes, plus the added
    files, what the release injects and what ``steps`` add (the boot check also runs it alone)."""
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
            content = fsutil.read_regular(extra.source_path, ADD_FILE_MAX, what=f"file for {extra.path}")
        treeops.add_file(root, extra.path, content, int(extra.mode, 8), mtime=epoch, store=ctx.store)
    injected: list[InjectedFile] = []
    for contributor in (_containers_json, _trusted_key_files, *steps.contributors):
        injected.extend(contributor(ctx))
    for item in sorted(injected, key=lambda f: f.path):
        treeops.add_file(root, item.path, item.content, item.mode, mtime=epoch, store=ctx.store)
        ctx.injected[item.path] = item
    for hook in steps.tree_hooks:
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


def _sign_images(tmp: Path, records: list[ImageRecord], options: BuildOptions) -> None:
    (tmp / layout.KEYS_DIR).mkdir(exist_ok=True)
    (tmp / layout.VERITY_CERT).write_bytes(options.verity_cert_pem)
    for rec in records:
        der = fsverity_pkcs7_sign(bytes.fromhex(rec.digest), options.verity_key_pem, options.verity_cert_pem)
        (tmp / f"{rec.path}.p7s").write_bytes(der)
