"""Boot-time container units: what ``bootimg build`` adds to the root for each container.

The contract is docs/boot-design.md, "Boot-time containers". For every container NAME of the
manifest (image digest DIGEST from the release), the root image gets:

- ``/usr/lib/systemd/system/bootimg-image-NAME.service``: oneshot, ``DefaultDependencies=no``,
  ``After=local-fs.target``; runs ``/usr/libexec/bootimg/bootimg-setup-root mount-image
  [--bind=...] NAME DIGEST``, which refuses an image whose fs-verity digest is not DIGEST and mounts it
  (EROFS + read-only overlay with ``verity=require`` over the release's object store, plus a
  skeleton layer of mount points) at ``/run/bootimg/containers/NAME``; ``ExecStop=`` unmounts.
- ``/usr/lib/systemd/system/NAME.service``: the container, ``RootDirectory=`` that mount
  (the mapping from the manifest is :func:`container_service`'s table);
- ``/usr/share/containers/systemd/NAME.container``: the same as a podman quadlet;

and, once: ``bootimg-containers.target`` (wants and is ordered after every container),
drop-ins that make ``multi-user.target`` want that target and ``sysinit.target`` /
``basic.target`` want the early / basic containers (regular files, so no enablement
symlinks are needed), ``/usr/lib/sysusers.d/bootimg-containers.conf`` for the numeric ids
the containers run as (systemd looks User=/Group= up in the system's user database and
fails a unit whose id is not there). The mount helper is the program
``/usr/libexec/bootimg/bootimg-setup-root`` that ``initramfs.add_program`` puts into every root.

The unit names and paths are defined in ``bootimg.manifest.reserved``, whose lists the
manifest checks hold container names and ``add_files`` against.

Everything is a pure function of the manifest, the image digests, the images' OCI configs
and (for checks and name lookups) the container trees, so builds stay byte-identical. What a
container runs and as whom is :func:`resolve.resolve`'s; the file syntax (templates, quoting)
is ``unit_syntax``'s; this module chooses the settings and, as the build's root contributor
and tree hooks, puts the files into the root.

Deadline. ``deadline_ms`` is a per-boot KPI measured from kernel start (the KPI verifier
checks it); the unit records it as ``# bootimg: deadline_ms=N`` and sets
``TimeoutStartSec=max(2 x deadline, 5 s)``: a container that is merely late on a slow boot
still comes up (the KPI reports the miss), one that hangs before readiness fails in bounded
time instead of systemd's default 90 s, so ``essential`` and ``Restart=`` act on it.

Restarts. ``essential`` acts once restarts are exhausted: systemd's start limit, 5 starts
(``StartLimitBurst=5``) within 5 x the start timeout (``StartLimitIntervalSec=``; 90 s without
a deadline). systemd's default window of 10 s is never reached by a container whose every
start takes more than 2 s (setting up its sandbox on a slow board does): it would restart
forever and its failure would never count.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Mapping

from ..composefs.tree import Node
from ..errors import BootimgError
from ..manifest import limits
from ..manifest.model import Container, Manifest
from ..manifest.reserved import (
    CONTAINERS_TARGET,
    DROPIN_NAME,
    PHASE_TARGETS,
    QUADLET_DIR,
    SYSROOT,
    SYSUSERS_FILE,
    TMP_DIR,
    UNIT_DIR,
    image_unit,
    service_unit,
)
from ..manifest.reserved import SETUP_ROOT as HELPER
from ..release.build import BuildContext, InjectedFile
from ..sources import treeops
from . import quadlet, sandbox
from .image_view import ContainerImage
from .resolve import Resolved, resolve
from .unit_syntax import check_path, env_assignment, exec_line, exec_word, render, timespan_ms, unit_path

CONTAINERS_MOUNT_DIR = "/run/bootimg/containers"
MIN_START_TIMEOUT_MS = 5000
DEFAULT_START_TIMEOUT_MS = 90000    # systemd's DefaultTimeoutStartSec=
START_LIMIT_BURST = 5               # systemd's default StartLimitBurst=


# -- the units -----------------------------------------------------------------------------------------

def start_timeout_ms(deadline_ms: int) -> int:
    """TimeoutStartSec= for a container with a deadline (see "Deadline" above)."""
    return max(2 * deadline_ms, MIN_START_TIMEOUT_MS)


def _release(manifest: Manifest) -> str:
    return f"{manifest.identity.name} {manifest.identity.version}"


def _failure_lines(c: Container) -> list[str]:
    if c.essential == "reboot":
        return ["FailureAction=reboot"]
    if c.essential == "emergency":
        return ["OnFailure=emergency.target", "OnFailureJobMode=isolate"]
    return []


def _unit_lines(manifest: Manifest, c: Container, r: Resolved) -> list[str]:
    """[Unit] dependencies of a container (the native service and the quadlet alike)."""
    lines: list[str] = []
    if r.user is not None and r.user != "0":
        lines.append("After=systemd-sysusers.service")
    if c.phase == "early":
        lines += ["DefaultDependencies=no", "After=local-fs.target", "Before=sysinit.target"]
    elif c.phase == "basic":
        lines += ["DefaultDependencies=no", "After=sysinit.target", "Before=basic.target"]
    if c.phase != "default":
        lines += ["Conflicts=shutdown.target", "Before=shutdown.target"]
    o = c.ordering
    for key, refs in (("After", o.after), ("Before", o.before), ("Requires", o.requires), ("Wants", o.wants)):
        if refs:
            lines.append(f"{key}=" + " ".join(manifest.unit_name(ref) for ref in refs))
    return lines + _failure_lines(c) + _start_limit(c)


def _start_limit(c: Container) -> list[str]:
    """Restarts are exhausted after START_LIMIT_BURST starts within as many start timeouts."""
    if c.restart == "never":
        return []
    timeout = start_timeout_ms(c.deadline_ms) if c.deadline_ms is not None else DEFAULT_START_TIMEOUT_MS
    # a deadline near the manifest's bound would give a window systemd cannot parse: capped at its largest
    interval = min(START_LIMIT_BURST * timeout, limits.MAX_TIMESPAN_S * 1000)
    return [f"StartLimitIntervalSec={timespan_ms(interval)}", f"StartLimitBurst={START_LIMIT_BURST}"]


def _comments(c: Container, r: Resolved) -> list[str]:
    lines = []
    if c.deadline_ms is not None:
        lines.append(f"# bootimg: deadline_ms={c.deadline_ms} (a per-boot KPI from kernel start; "
                     f"TimeoutStartSec=max(2 x deadline, 5s))")
    return lines + list(r.notes) + sandbox.comment_lines(c)


def _start_timeout(c: Container) -> list[str]:
    return [f"TimeoutStartSec={timespan_ms(start_timeout_ms(c.deadline_ms))}"] if c.deadline_ms is not None else []


def _resources(c: Container) -> list[str]:
    lines = []
    if c.resources.cpu_weight is not None:
        lines.append(f"CPUWeight={c.resources.cpu_weight}")
    if c.resources.memory_max_mib is not None:
        lines.append(f"MemoryMax={c.resources.memory_max_mib}M")
    return lines


def image_service(manifest: Manifest, c: Container, digest: str) -> str:
    """bootimg-image-NAME.service. The helper also gets each bind (--bind=SRC:TARGET) so that
    the read-only container root has a mount point for it (see the helper's header)."""
    args = ["--fsverity=optional"] if manifest.integrity.fsverity == "optional" else []
    args += [f"--bind={check_path(b.source, container=c.name, what='bind source')}:"
             f"{check_path(b.target, container=c.name, what='bind target')}" for b in c.binds]
    args += [c.name, digest]
    return render("bootimg-image.service.in", {
        "RELEASE": _release(manifest), "NAME": c.name, "DIGEST": digest,
        "MOUNT_ARGS": " ".join(exec_word(a) for a in args), "FAILURE": _failure_lines(c), "HELPER": HELPER,
    })


def container_service(manifest: Manifest, c: Container, r: Resolved) -> str:
    """NAME.service. The manifest maps to it like this:

    ============================  ==========================================================
    (always)                      Requires=/After=bootimg-image-NAME.service,
                                  RootDirectory=/run/bootimg/containers/NAME, MountAPIVFS=yes,
                                  the sandbox (sandbox.py: the strictest settings the
                                  manifest allows, relaxed by its sandbox: key)
    phase early                   DefaultDependencies=no, After=local-fs.target,
                                  Before=sysinit.target, Conflicts=/Before=shutdown.target
                                  (+ wanted by sysinit.target)
    phase basic                   DefaultDependencies=no, After=sysinit.target,
                                  Before=basic.target, Conflicts=/Before=shutdown.target
                                  (+ wanted by basic.target)
    phase default                 default dependencies (wanted by bootimg-containers.target)
    readiness notify / started    Type=notify + NotifyAccess=main / Type=exec
    essential reboot / emergency  FailureAction=reboot / OnFailure=emergency.target +
                                  OnFailureJobMode=isolate (on the image unit too)
    restart never/on-failure/...  Restart=no / on-failure / always (+ StartLimitBurst=5,
                                  StartLimitIntervalSec=5 x the start timeout)
    deadline_ms N                 # bootimg: deadline_ms=N, TimeoutStartSec=max(2N ms, 5s)
    ordering after/before/...     After=/Before=/Requires=/Wants= (bare name -> NAME.service)
    network none / host           PrivateNetwork=yes, IPAddressDeny=any, AF_UNIX only /
                                  AF_UNIX AF_INET AF_INET6 AF_NETLINK (sandbox.py)
    resources                     CPUWeight=, MemoryMax=<MiB>M
    binds                         BindReadOnlyPaths=SRC:TARGET (+ a mount point for TARGET
                                  in the image unit's skeleton layer: --bind=SRC:TARGET);
                                  a /dev/... SRC also DeviceAllow=SRC r
    user U[:G] / name             User=U (Group=G); names -> the image's numeric ids;
                                  After=systemd-sysusers.service, ids in sysusers.d
    command / OCI config          ExecStart= (quoted); else Entrypoint + Cmd; Env under
                                  the manifest's environment; WorkingDir -> WorkingDirectory=
    ============================  ==========================================================
    """
    service = ["Type=notify"] if c.readiness == "notify" else ["Type=exec"]
    service.append("Restart=" + {"never": "no"}.get(c.restart, c.restart))
    service += _start_timeout(c)
    if r.user is not None:
        service.append(f"User={r.user}")
    if r.group is not None:
        service.append(f"Group={r.group}")
    if r.workdir:
        service.append(f"WorkingDirectory={unit_path(r.workdir, container=c.name, what='working directory')}")
    service += [f"Environment={env_assignment(k, v)}" for k, v in r.environment]
    service.append("MountAPIVFS=yes")
    service += _resources(c)
    if c.binds:
        service.append("BindReadOnlyPaths=" + " ".join(
            f"{unit_path(b.source, container=c.name, what='bind source')}:"
            f"{unit_path(b.target, container=c.name, what='bind target')}" for b in c.binds))
    return render("container.service.in", {
        "RELEASE": _release(manifest), "NAME": c.name, "COMMENTS": _comments(c, r),
        "UNIT": _unit_lines(manifest, c, r), "SERVICE": service,
        "EXEC": [f"ExecStart={exec_line(r.argv, container=c.name)}"], "SANDBOX": sandbox.service_lines(c, r.user),
    })


def container_quadlet(manifest: Manifest, c: Container, r: Resolved) -> str:
    """NAME.container: the same container for podman's quadlet generator."""
    container = [f"Exec={' '.join(exec_word(a) for a in r.argv)}"]
    container += [f"Environment={exec_word(f'{k}={v}')}" for k, v in r.environment]
    if r.user is not None:
        container.append(f"User={r.user}")
    if r.group is not None:
        container.append(f"Group={r.group}")
    if r.workdir:
        container.append(f"WorkingDir={unit_path(r.workdir, container=c.name, what='working directory')}")
    container.append("Network=none" if c.network == "none" else "Network=host")
    if c.readiness == "notify":
        container.append("Notify=true")
    for b in c.binds:
        source = unit_path(b.source, container=c.name, what="bind source")
        target = unit_path(b.target, container=c.name, what="bind target")
        if not b.source.startswith("/dev/"):  # device nodes: AddDevice= below (podman's device cgroup)
            container.append(f"Volume={source}:{target}:ro")
    container += sandbox.quadlet_lines(c)
    # Recent quadlet (podman-systemd.unit(5) of the 5.3 line) orders its units after
    # network-online.target unless [Quadlet] DefaultDependencies=false: an ordering cycle for
    # early/basic containers and a pointless wait for network-less ones. Older podman copies
    # the unknown [Quadlet] section into the service, where systemd ignores it with a warning.
    extra = ["[Quadlet]", "DefaultDependencies=false", ""] if (c.phase != "default" or c.network == "none") else []
    service = ["Restart=" + {"never": "no"}.get(c.restart, c.restart)] + _start_timeout(c) + _resources(c)
    used = {"Container": ["Rootfs", "ReadOnly", "NoNewPrivileges"] + [line.split("=", 1)[0] for line in container]}
    return render("container.container.in", {
        "RELEASE": _release(manifest), "NAME": c.name, "COMMENTS": _comments(c, r),
        "PODMAN": "%d.%d" % quadlet.min_podman(used),
        "UNIT": _unit_lines(manifest, c, r), "CONTAINER": container, "QUADLET": extra, "SERVICE": service,
    })


def containers_target(manifest: Manifest) -> str:
    services = " ".join(service_unit(c.name) for c in manifest.containers)
    return render("bootimg-containers.target.in", {
        "RELEASE": _release(manifest), "UNIT": [f"Wants={services}", f"After={services}"],
    })


def wants_dropin(manifest: Manifest, wants: list[str], why: str) -> str:
    return render("wants.conf.in", {"RELEASE": _release(manifest), "WHY": why, "WANTS": " ".join(wants)})


def sysusers(manifest: Manifest, resolved: Mapping[str, Resolved]) -> str | None:
    """sysusers.d lines for every non-root numeric user and group the containers run as
    (None when they all run as root or as their image's default)."""
    groups: dict[int, list[str]] = {}
    users: dict[int, tuple[int | None, list[str]]] = {}
    for c in manifest.containers:
        r = resolved[c.name]
        if r.user is None or not r.user.isdigit() or r.user == "0":
            continue
        gid = int(r.group) if r.group is not None and r.group.isdigit() else None
        if gid is not None and gid != 0:
            groups.setdefault(gid, []).append(c.name)
        _, names = users.setdefault(int(r.user), (gid, []))
        names.append(c.name)
    if not users:
        return None
    lines = [f"g bootimg-{gid} {gid}" for gid in sorted(groups)]
    for uid, (gid, names) in sorted(users.items()):
        ident = f"{uid}:{gid}" if gid is not None else str(uid)
        lines.append(f'u bootimg-{uid} {ident} "bootimg containers {", ".join(names)}" - -')
    return render("sysusers.conf.in", {"RELEASE": _release(manifest), "LINES": lines})


def unit_files(manifest: Manifest, digests: Mapping[str, str], configs: Mapping[str, Mapping | None] | None = None,
               images: Mapping[str, ContainerImage] | None = None) -> dict[str, tuple[bytes, int]]:
    """Every file the boot-time containers need in the root: {absolute path: (content, mode)}."""
    if not manifest.containers:
        return {}
    configs = configs or {}
    images = images or {}
    files: dict[str, tuple[bytes, int]] = {}

    def add(path: str, text: str | bytes, mode: int = 0o644) -> None:
        data = text.encode() if isinstance(text, str) else text
        if not data.endswith(b"\n"):
            data += b"\n"
        files[path] = (data, mode)

    resolved: dict[str, Resolved] = {}
    for c in manifest.containers:
        digest = digests.get(c.name)
        if digest is None or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise BootimgError(f"container '{c.name}': no image digest (64 hex digits) to pin its units to",
                               file=str(manifest.source_file or "manifest"))
        r = resolved[c.name] = resolve(manifest, c, configs.get(c.name), images.get(c.name))
        add(f"{UNIT_DIR}/{image_unit(c.name)}", image_service(manifest, c, digest))
        add(f"{UNIT_DIR}/{service_unit(c.name)}", container_service(manifest, c, r))
        text = container_quadlet(manifest, c, r)
        problems = quadlet.check_container(text, f"{QUADLET_DIR}/{c.name}.container")
        if problems:  # a bug here, not in the manifest
            raise AssertionError("\n".join(problems))
        add(f"{QUADLET_DIR}/{c.name}.container", text)
    add(f"{UNIT_DIR}/{CONTAINERS_TARGET}", containers_target(manifest))
    add(f"{UNIT_DIR}/multi-user.target.d/{DROPIN_NAME}",
        wants_dropin(manifest, [CONTAINERS_TARGET], "Start the boot-time containers."))
    for phase, target in PHASE_TARGETS.items():
        members = [service_unit(c.name) for c in manifest.containers if c.phase == phase]
        if members:
            add(f"{UNIT_DIR}/{target}.d/{DROPIN_NAME}",
                wants_dropin(manifest, members, f"Containers of phase {phase} start before {target}."))
    users = sysusers(manifest, resolved)
    if users is not None:
        add(SYSUSERS_FILE, users)
    return dict(sorted(files.items()))


# -- build integration ---------------------------------------------------------------------------------

def _built_images(ctx: BuildContext) -> dict[str, ContainerImage]:
    """The container images the build has written so far, read back from the release
    directory being built."""
    return {name: ContainerImage(ctx.out.load_image(name).root, ctx.out) for name in ctx.containers}


def container_units(ctx: BuildContext) -> list[InjectedFile]:
    """Root contributor: the units, quadlets and mount helper of the manifest's containers."""
    files = unit_files(ctx.manifest, {n: r.digest for n, r in ctx.containers.items()},
                       ctx.container_configs, _built_images(ctx))
    return [InjectedFile(path, data, mode) for path, (data, mode) in files.items()]


def add_sysroot(ctx: BuildContext, root: Node) -> None:
    """Make the root's /sysroot an empty directory: the initramfs hook moves the physical root
    onto it (boot-design.md, step 7). A tree hook, not a contributor: InjectedFile only makes
    regular files. Anything already in /sysroot is an error (it would be hidden at boot)."""
    name = SYSROOT.lstrip("/").encode()
    existing = root.children.get(name)
    if existing is not None and (not existing.is_dir() or existing.link_to is not None):
        raise BootimgError(f"the root's {SYSROOT} is not a directory; the physical root is mounted there at boot")
    if existing is not None and existing.children:
        inside = ", ".join(sorted(n.decode("utf-8", "backslashreplace") for n in existing.children))
        raise BootimgError(f"the root's {SYSROOT} must be empty (the physical root is mounted over it at boot); "
                           f"it holds: {inside}")
    treeops.make_dirs(root, [name], mtime=ctx.manifest.identity.source_date_epoch)


def add_tmp(ctx: BuildContext, root: Node) -> None:
    """Give a root with containers a /tmp directory (1777) if its tree has none: bootimg-setup-root
    mounts a tmpfs there, which the container units need (systemd 252 builds the private /dev of
    PrivateDevices= in /tmp; boot-design.md, "Sandbox")."""
    name = TMP_DIR.lstrip("/").encode()
    if not ctx.manifest.containers or name in root.children:
        return
    treeops.make_dirs(root, [name], mtime=ctx.manifest.identity.source_date_epoch).mode = stat.S_IFDIR | 0o1777
