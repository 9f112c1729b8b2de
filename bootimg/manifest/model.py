"""The typed manifest: frozen dataclasses mirroring schema.json key for key.

Instances are only made by ``from_dict`` from the *normalized* manifest (see
normalize.py), after validation, so every field is already checked and
defaulted; the classes hold no defaults or rules of their own. Field names are
the YAML keys (``apiVersion`` is the one exception, spelt ``api_version`` and
mapped through field metadata), and ``to_dict`` gives back exactly the
normalized JSON, which tests check for every example. A dataclass default
(None or ``()``) means "the key is absent"; schema defaults never appear here.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

SourceType = Literal["directory", "tar", "oci"]
Phase = Literal["early", "basic", "default"]
Readiness = Literal["started", "notify"]
Essential = Literal["none", "reboot", "emergency"]
Restart = Literal["never", "on-failure", "always"]
Network = Literal["none", "host"]
FsVerity = Literal["required", "optional"]
Trust = Literal["sealed", "signed"]
EtcPolicy = Literal["transient", "readonly"]
VarPolicy = Literal["persistent", "transient"]
VerificationFailure = Literal["reboot", "emergency"]
Measure = Literal["unit_active", "initrd", "root_mounted", "root_hook", "userspace", "default_target", "boot_finished"]
Since = Literal["kernel_start", "userspace_start", "power_on"]
Statistic = Literal["median", "p90", "p95", "max"]
DeviceAccess = Literal["r", "w", "rw"]
Compression = Literal["gzip", "zstd", "xz", "lz4"]
NotifyAccess = Literal["exec", "all"]


class FrozenMap(Mapping[str, str]):
    """An immutable, hashable mapping, so frozen dataclasses holding one stay hashable."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str] | None = None):
        self._items = dict(items or {})

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> typing.Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._items!r})"


@dataclass(frozen=True)
class Identity:
    name: str
    version: str
    source_date_epoch: int
    security_version: int


@dataclass(frozen=True)
class Source:
    """A file tree: a directory, a tar archive, or an OCI image layout (``path``) plus ``ref``."""

    type: SourceType
    path: Path  # absolute, on the build host
    ref: str | None = None  # only for type "oci": a ref name or "sha256:..." manifest digest


@dataclass(frozen=True)
class AddFile:
    path: str  # absolute, in the image
    mode: str  # octal string, e.g. "0644"
    text: str | None = None
    source_path: Path | None = None  # absolute, on the build host


@dataclass(frozen=True)
class Rootfs:
    source: Source
    exclude: tuple[str, ...]
    add_files: tuple[AddFile, ...]


@dataclass(frozen=True)
class Ordering:
    """Bare names are containers of this manifest; names with a suffix are other systemd units."""

    after: tuple[str, ...]
    before: tuple[str, ...]
    requires: tuple[str, ...]
    wants: tuple[str, ...]


@dataclass(frozen=True)
class Resources:
    cpu_weight: int | None = None
    memory_max_mib: int | None = None


@dataclass(frozen=True)
class Bind:
    """A read-only bind mount: ``source`` on the running system, ``target`` in the container."""

    source: str
    target: str


@dataclass(frozen=True)
class SandboxDevice:
    """A device node the container may use: ``path`` on the running system and in the container."""

    path: str
    access: DeviceAccess


@dataclass(frozen=True)
class Sandbox:
    """What a container's sandbox allows beyond the strict default (docs/boot-design.md, "Sandbox");
    every key widens one setting, ``reason`` says why."""

    reason: str
    capabilities: tuple[str, ...] = ()       # CAP_* names
    system_calls: tuple[str, ...] = ()       # names and @groups
    address_families: tuple[str, ...] = ()   # AF_* names
    devices: tuple[SandboxDevice, ...] = ()
    namespaces: tuple[str, ...] = ()         # cgroup ipc mnt net pid user uts
    realtime_priority: int | None = None
    notify_access: NotifyAccess | None = None
    umask: str | None = None                 # octal string
    allow: tuple[str, ...] = ()              # protections switched off


@dataclass(frozen=True)
class Container:
    name: str
    image: Source
    environment: Mapping[str, str]
    ordering: Ordering
    phase: Phase
    readiness: Readiness
    essential: Essential
    restart: Restart
    resources: Resources
    binds: tuple[Bind, ...]
    network: Network
    command: tuple[str, ...] | None = None  # None: the OCI image's entrypoint/cmd
    user: str | None = None  # None: the image's configured user
    deadline_ms: int | None = None
    sandbox: Sandbox | None = None  # None: the strict default


@dataclass(frozen=True)
class Integrity:
    trust: Trust
    fsverity: FsVerity
    trusted_keys: tuple[Path, ...] = ()  # absolute PEM paths; non-empty exactly when trust is "signed"


@dataclass(frozen=True)
class Assessment:
    tries: int
    settle_ms: int                             # the units run this long before the boot is assessed
    requires: tuple[str, ...] | None = None   # None: every essential container


@dataclass(frozen=True)
class Initramfs:
    """What the initramfs holds, as dracut's exclusive lists (``bootimg initramfs``): None is
    dracut's generic choice. bootimg's own dracut module and drivers are added to these."""

    drivers: tuple[str, ...] | None = None   # kernel modules: dracut --drivers
    modules: tuple[str, ...] | None = None   # dracut modules: dracut --modules
    omit: tuple[str, ...] = ()               # dracut modules: dracut --omit
    compress: Compression | None = None      # None: dracut's default
    compress_level: int | None = None        # None: dracut's settings for ``compress``

    def to_dict(self) -> dict[str, Any]:
        """The profile as the manifest writes it (the keys it sets): what release.json records."""
        return _to_data(self)


@dataclass(frozen=True)
class Boot:
    kernel_args: tuple[str, ...]
    etc: EtcPolicy
    var: VarPolicy
    on_verification_failure: VerificationFailure
    assessment: Assessment
    initramfs: Initramfs | None = None       # None: dracut's generic initramfs


@dataclass(frozen=True)
class KpiBudget:
    """Judge ``statistic`` over N boots of ``measure`` (ms since ``since``) against warn/fail; max_ms per boot."""

    name: str
    measure: Measure
    since: Since
    statistic: Statistic
    warn_ms: int
    fail_ms: int
    unit: str | None = None  # for measure "unit_active": a container name or a unit name with suffix
    max_ms: int | None = None


@dataclass(frozen=True)
class Manifest:
    api_version: str = field(metadata={"key": "apiVersion"})
    identity: Identity
    rootfs: Rootfs
    containers: tuple[Container, ...]
    integrity: Integrity
    boot: Boot
    kpis: tuple[KpiBudget, ...]
    # The file it was loaded from (not part of the manifest's content).
    source_file: Path | None = field(default=None, compare=False, metadata={"internal": True})

    def container(self, name: str) -> Container:
        """The container called ``name`` (KeyError if there is none)."""
        for c in self.containers:
            if c.name == name:
                return c
        raise KeyError(name)

    def unit_name(self, ref: str) -> str:
        """The systemd unit an ordering entry or KPI unit means: container 'x' runs as 'x.service'."""
        if "." not in ref:
            return f"{self.container(ref).name}.service"
        return ref

    def good_boot_units(self) -> tuple[str, ...]:
        """The units that must be active for a boot to count as good (boot assessment)."""
        refs = self.boot.assessment.requires
        if refs is None:
            refs = tuple(c.name for c in self.containers if c.essential != "none")
        return tuple(self.unit_name(r) for r in refs)

    def deadline_budgets(self) -> tuple[KpiBudget, ...]:
        """Each container's ``deadline_ms`` as the per-boot KPI it stands for ('NAME.deadline')."""
        return tuple(
            KpiBudget(name=f"{c.name}.deadline", measure="unit_active", since="kernel_start", statistic="max",
                      warn_ms=c.deadline_ms, fail_ms=c.deadline_ms, unit=c.name, max_ms=c.deadline_ms)
            for c in self.containers if c.deadline_ms is not None)

    def all_budgets(self) -> tuple[KpiBudget, ...]:
        """The declared KPIs followed by the deadline KPIs: what the verifier checks."""
        return self.kpis + self.deadline_budgets()

    def to_dict(self) -> dict[str, Any]:
        """The normalized manifest as JSON-ready data (what ``validate --json`` prints)."""
        return _to_data(self)


# -- building from and back to data ------------------------------------------------

T = TypeVar("T")


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build ``cls`` from validated, normalized data, converting by the fields' type hints."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.metadata.get("internal"):
            continue
        key = _key(f)
        if key in data:
            kwargs[f.name] = _convert(hints[f.name], data[key])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{cls.__name__}: normalized data lacks '{key}' (validate and normalize first)")
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return None if value is None else _convert(inner[0], value)
    if origin is tuple:
        return tuple(_convert(args[0], v) for v in value)
    if origin is Mapping:
        return FrozenMap({k: _convert(args[1], v) for k, v in value.items()})
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    if hint is Path:
        return Path(value)
    return value  # str, int and Literal values are already checked by the schema


def _to_data(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.metadata.get("internal") or (f.default is not dataclasses.MISSING and item == f.default):
                continue  # internal, or absent from the manifest
            out[_key(f)] = _to_data(item)
        return out
    if isinstance(value, tuple):
        return [_to_data(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_data(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value
