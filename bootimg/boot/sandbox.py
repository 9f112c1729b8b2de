"""The sandbox of a boot-time container: the strictest systemd settings its manifest allows.

A boot-time container in a car is attack surface (ISO/SAE 21434), so by default its unit
denies everything the container did not declare a need for. What the manifest already says
decides part of it; ``sandbox:`` relaxes the rest, one visible key per setting, with a reason
(schema.json, ``definitions.sandbox``). ``service_lines`` writes the settings, in this order:

==========================================  ================================================
default                                     relaxed by
==========================================  ================================================
NoNewPrivileges=yes                         (never)
CapabilityBoundingSet= (empty)              capabilities: [...] (+ AmbientCapabilities= for a
                                            non-root user)
PrivateUsers=yes                            allow: [host_users], or any capability
RemoveIPC=yes (non-root user, private IPC)  (follows user and host_ipc)
UMask=0077                                  umask: "0027"
ProtectSystem=strict, ProtectHome=yes,      (never; the root is the read-only image anyway)
PrivateTmp=yes, PrivateMounts=yes
PrivateDevices=yes                          (never; devices: [{path, access}] add nodes)
BindReadOnlyPaths=-/run/systemd/journal/    (never; see below)
socket
DeviceAllow=SRC r for each /dev bind        devices: [{path: SRC, access: rw}]
PrivateIPC=yes                              allow: [host_ipc]
ProtectKernelTunables/Modules/Logs=yes      allow: [kernel_tunables / kernel_modules /
                                            kernel_logs]
ProtectControlGroups=yes                    allow: [control_groups]
ProtectClock=yes                            allow: [clock]
ProtectHostname=yes                         allow: [hostname]
ProtectProc=invisible                       allow: [other_processes]
ProcSubset=pid                              allow: [proc_files]
network none: PrivateNetwork=yes,           (network: host), address_families: [...]
IPAddressDeny=any, RestrictAddressFamilies  (AF_INET/AF_INET6 there lift IPAddressDeny=)
=AF_UNIX
network host: RestrictAddressFamilies=      address_families: [AF_CAN, ...]
AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes                      namespaces: [net, ...]
RestrictRealtime=yes                        realtime_priority: N (RestrictRealtime=no,
                                            LimitRTPRIO=N, sched_set* system calls)
RestrictSUIDSGID=yes                        allow: [suid_sgid]
LockPersonality=yes                         allow: [personality]
MemoryDenyWriteExecute=yes                  allow: [write_execute_memory]
SystemCallArchitectures=native              allow: [foreign_abis]
SystemCallFilter=@system-service,           system_calls: [name, @group, ...] (allowed on top,
~@privileged @resources;                    also where the deny list names them)
SystemCallErrorNumber=EPERM
NotifyAccess=main (readiness notify)        notify_access: exec | all
==========================================  ================================================

AF_UNIX is always allowed: sd_notify readiness and the journal's sockets need it. The
journal's native socket is bound into the container (``-`` if absent), as systemd >= 256 does
by default (BindLogSockets=): systemd 252 reports why a container could not start (e.g. that
execve failed, and with which error) from inside its namespaces, where the private /dev has
no /dev/kmsg, and without the socket that message is lost.
A denied system call fails with EPERM rather than killing the process, so a program that
probes for a feature sees "not permitted" instead of dying on SIGSYS.

Podman (``quadlet_lines``): DropCapability=all plus AddCapability=, device nodes as
AddDevice= (a bind would not pass podman's device cgroup), Ulimit=rtprio= for a realtime
priority; podman applies its own default seccomp profile and has no equivalent of the rest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..manifest.model import Container, Sandbox

DEFAULT_SYSCALLS = "@system-service"
DENIED_SYSCALLS = "@privileged @resources"
REALTIME_SYSCALLS = ("sched_setattr", "sched_setparam", "sched_setscheduler")
HOST_FAMILIES = ("AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK")
DEFAULT_UMASK = "0077"
JOURNAL_SOCKET = "/run/systemd/journal/socket"

# sandbox.allow value -> the line written while that protection is on, in unit order: the
# file system and /proc ones before the network settings, the kernel interface ones after.
FILESYSTEM_PROTECTIONS = {
    "host_ipc": "PrivateIPC=yes",
    "kernel_tunables": "ProtectKernelTunables=yes",
    "kernel_modules": "ProtectKernelModules=yes",
    "kernel_logs": "ProtectKernelLogs=yes",
    "control_groups": "ProtectControlGroups=yes",
    "clock": "ProtectClock=yes",
    "hostname": "ProtectHostname=yes",
    "other_processes": "ProtectProc=invisible",
    "proc_files": "ProcSubset=pid",
}
KERNEL_PROTECTIONS = {
    "suid_sgid": "RestrictSUIDSGID=yes",
    "personality": "LockPersonality=yes",
    "write_execute_memory": "MemoryDenyWriteExecute=yes",
    "foreign_abis": "SystemCallArchitectures=native",
}

_NONE = Sandbox(reason="")


@dataclass(frozen=True)
class Device:
    """A device node in the container: ``source`` on the system, ``target`` in the container."""

    source: str
    target: str
    access: str
    bound: bool   # already bound by the container's binds


def _unit(path: str) -> str:
    """A path for a unit setting (unit_syntax.check_path has refused whitespace and ':' in binds,
    the schema in sandbox.devices): '%' starts a specifier there."""
    return path.replace("%", "%%")


def _sandbox(c: Container) -> Sandbox:
    return c.sandbox or _NONE


def runs_as_root(user: str | None) -> bool:
    """None is the image's default user, root unless the image configured one (resolve() has
    already put an image's configured user in place)."""
    return user is None or user in ("0", "root")


def devices(c: Container) -> list[Device]:
    """The device nodes the container gets: its /dev binds (read-only unless ``sandbox.devices``
    says more) and ``sandbox.devices``, in that order."""
    declared = {d.path: d.access for d in _sandbox(c).devices}
    out = [Device(b.source, b.target, declared.pop(b.target, "r"), True)
           for b in c.binds if b.source.startswith("/dev/")]
    out += [Device(path, path, access, False) for path, access in declared.items()]
    return out


def address_families(c: Container) -> list[str]:
    base = list(HOST_FAMILIES) if c.network == "host" else ["AF_UNIX"]
    return base + sorted(set(_sandbox(c).address_families) - set(base))


def private_users(c: Container) -> bool:
    s = _sandbox(c)
    return not s.capabilities and "host_users" not in s.allow


def notify_access(c: Container) -> str | None:
    if _sandbox(c).notify_access is not None:
        return _sandbox(c).notify_access
    return "main" if c.readiness == "notify" else None


def service_lines(c: Container, user: str | None) -> list[str]:
    """The [Service] sandbox settings of NAME.service (the table in the module docstring)."""
    s = _sandbox(c)
    caps = sorted(s.capabilities)
    lines = ["NoNewPrivileges=yes", "CapabilityBoundingSet=" + " ".join(caps)]
    if caps and not runs_as_root(user):
        lines.append("AmbientCapabilities=" + " ".join(caps))
    if private_users(c):
        lines.append("PrivateUsers=yes")
    if not runs_as_root(user) and "host_ipc" not in s.allow:
        lines.append("RemoveIPC=yes")
    lines.append(f"UMask={s.umask or DEFAULT_UMASK}")
    lines += ["ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes", "PrivateMounts=yes", "PrivateDevices=yes",
              f"BindReadOnlyPaths=-{JOURNAL_SOCKET}"]
    nodes = devices(c)
    lines += [f"DeviceAllow={_unit(d.source)} {d.access}" for d in nodes]
    unbound = [d for d in nodes if not d.bound]
    if unbound:
        lines.append("BindPaths=" + " ".join(f"{_unit(d.source)}:{_unit(d.target)}" for d in unbound))
    lines += [line for key, line in FILESYSTEM_PROTECTIONS.items() if key not in s.allow]
    families = address_families(c)
    if c.network == "none":
        lines.append("PrivateNetwork=yes")
        if not {"AF_INET", "AF_INET6"} & set(families):
            lines.append("IPAddressDeny=any")
    lines.append("RestrictAddressFamilies=" + " ".join(families))
    lines.append("RestrictNamespaces=" + (" ".join(sorted(s.namespaces)) if s.namespaces else "yes"))
    if s.realtime_priority is None:
        lines.append("RestrictRealtime=yes")
    else:
        lines += ["RestrictRealtime=no", f"LimitRTPRIO={s.realtime_priority}"]
    lines += [line for key, line in KERNEL_PROTECTIONS.items() if key not in s.allow]
    lines += [f"SystemCallFilter={DEFAULT_SYSCALLS}", f"SystemCallFilter=~{DENIED_SYSCALLS}"]
    extra = sorted(set(s.system_calls) | (set(REALTIME_SYSCALLS) if s.realtime_priority is not None else set()))
    if extra:
        lines.append("SystemCallFilter=" + " ".join(extra))
    lines.append("SystemCallErrorNumber=EPERM")
    access = notify_access(c)
    if access is not None:
        lines.append(f"NotifyAccess={access}")
    return lines


def quadlet_lines(c: Container) -> list[str]:
    """The [Container] settings of NAME.container that podman has equivalents for."""
    s = _sandbox(c)
    lines = ["DropCapability=all"]
    if s.capabilities:
        lines.append("AddCapability=" + " ".join(sorted(s.capabilities)))
    lines += [f"AddDevice={_unit(d.source)}:{_unit(d.target)}:{d.access}" for d in devices(c)]
    if s.realtime_priority is not None:
        lines.append(f"Ulimit=rtprio={s.realtime_priority}:{s.realtime_priority}")
    return lines


def relaxations(c: Container) -> dict[str, object]:
    """What the manifest relaxes, as written there (for comments and the build's report)."""
    if c.sandbox is None:
        return {}
    out: dict[str, object] = {}
    for f in dataclasses.fields(c.sandbox):
        value = getattr(c.sandbox, f.name)
        if f.name == "reason" or value in ((), None):
            continue
        out[f.name] = [f"{d.path} {d.access}" for d in value] if f.name == "devices" else \
            (list(value) if isinstance(value, tuple) else value)
    return out


def comment_lines(c: Container) -> list[str]:
    """``# bootimg:`` lines naming the relaxations and their reason (one line each, whatever the
    manifest's text holds)."""
    if c.sandbox is None:
        return []
    relaxed = relaxations(c)
    what = "; ".join(f"{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in relaxed.items())
    return [f"# bootimg: sandbox relaxed by the manifest: {what or 'nothing'}",
            "# bootimg: reason: " + " ".join(c.sandbox.reason.split())]
