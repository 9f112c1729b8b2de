"""What the target accepts: the limits of systemd 252 and the Linux kernel a manifest must fit.

A value outside them passes a plain schema check yet fails on the target: ``systemd-analyze
verify`` complains, a unit whose ``User=`` is not a valid id never starts, the kernel cuts a
command line that is too long. The bounds JSON Schema can express are ``maximum``s in
schema.json (tests/test_manifest.py holds them equal to the constants here); semantic.py
checks the rest with the functions below, and boot/unit_syntax.py and boot/resolve.py refuse
with the same ones, so ``validate`` and ``build`` agree.
"""

from __future__ import annotations

import re

from . import reserved

# systemd's time spans are µs in a uint64 whose largest value means "infinity"; parse_timespan()
# (src/basic/time-util.c) refuses N<unit> when N >= USEC_INFINITY / unit.
USEC_INFINITY = 2**64 - 1
MAX_TIMESPAN_S = USEC_INFINITY // 1_000_000 - 1
MAX_TIMESPAN_MS = USEC_INFINITY // 1_000 - 1
# Every duration in the manifest (deadline_ms, the KPI budgets). A deadline becomes
# TimeoutStartSec=2 x deadline (whole seconds when it is one): that must stay a time span
# systemd accepts, and a deadline is also a KPI budget, so the budgets share the bound.
MAX_DURATION_MS = MAX_TIMESPAN_S // 2 * 1000

# MemoryMax=<N>M: parse_size() (src/basic/parse-util.c) refuses N > UINT64_MAX / 1024^2.
MAX_MEMORY_MIB = (2**64 - 1) // 2**20

# uid_is_valid() (src/basic/user-util.h): uid_t is 32 bits; (uid_t) -1 and the 16-bit -1 are
# invalid. parse_uid() also refuses a leading zero (the value is then read as a user name,
# which all digits is not).
ID_MAX = 2**32 - 2
INVALID_IDS = {65535: "the 16-bit -1", 2**32 - 1: "the 32-bit -1"}

# The levels each initramfs compressor takes (boot.initramfs.compress_level): gzip(1), zstd(1)
# without --ultra, xz(1) presets, lz4(1) high compression.
COMPRESS_LEVELS = {"gzip": (1, 9), "zstd": (1, 19), "xz": (0, 9), "lz4": (1, 12)}

# The kernel keeps the command line in a buffer of COMMAND_LINE_SIZE bytes including its NUL
# and silently cuts what does not fit: 2048 on x86_64 (arch/x86/include/asm/setup.h) and arm64
# (arch/arm64/include/uapi/asm/setup.h; the newest kernels raise arm64's to 4096).
COMMAND_LINE_SIZE = 2048
CMDLINE_MAX = COMMAND_LINE_SIZE - 1
# What the build and the boot chain add to the manifest's kernel_args, at their longest (as
# shown in messages, and their length): the root digest, where the release is (a version is at
# most 64 characters), its rollback index, the physical root (by PARTUUID) and its mode.
BUILD_KERNEL_ARGS = {
    "composefs.digest": (f"{reserved.KERNEL_DIGEST_PREFIX}<64 hex digits>", len(reserved.KERNEL_DIGEST_PREFIX) + 64),
    "bootimg.release": (f"bootimg.release={reserved.RELEASES_PATH}/<version>",
                        len(f"bootimg.release={reserved.RELEASES_PATH}/") + 64),
    "bootimg.security_version": ("bootimg.security_version=<32-bit>", len("bootimg.security_version=") + 10),
    "root": ("root=PARTUUID=<uuid>", len("root=PARTUUID=") + 36),
    "rw": ("rw", 2),
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Characters that separate entries in list-valued unit settings (BindReadOnlyPaths=, podman's
# Volume=, the mount helper's --bind=): refused there rather than escaped.
_LIST_UNSAFE = re.compile(r"[\s:\"'\\]|[\x00-\x1f\x7f]")


def id_problem(text: str) -> str | None:
    """Why a numeric user or group id cannot be used by systemd, or None."""
    if len(text) > 1 and text.startswith("0"):
        return f"{text} has a leading zero, which systemd does not read as a number"
    value = int(text)
    if value > ID_MAX + 1:
        return f"{text} is not a 32-bit id (at most {ID_MAX})"
    if value in INVALID_IDS:
        return f"{value} is not a valid id for systemd ({INVALID_IDS[value]})"
    return None


def list_path_problem(path: str) -> str | None:
    """Why ``path`` cannot go into a list-valued unit setting (a bind source or target), or None."""
    if _LIST_UNSAFE.search(path):
        return ("contains whitespace, ':', a quote, a backslash or a control character, which systemd and "
                "podman cannot take in a bind")
    return None


def executable_problem(first: str) -> str | None:
    """Why ``first`` cannot be argv[0] of ExecStart= (systemd reads prefix characters off its
    front and expands no variables in it), or None."""
    if not first or first[0] in "-@:+!" or "$" in first or re.search(r"[\"'\\]", first) or _CONTROL.search(first) \
            or first.endswith("/") or ("/" in first and not first.startswith("/")):
        return ("cannot be an executable for systemd (an absolute path or a bare name, without quotes, "
                "backslashes, '$', control characters or a leading '-@:+!')")
    return None


def kernel_arg_problem(arg: str) -> str | None:
    """Why one kernel argument would break the command line, or None."""
    if _CONTROL.search(arg):
        return "contains a control character"
    if arg.count('"') % 2:
        return "has an unbalanced '\"': the kernel would read the rest of the command line into this argument"
    return None


def build_kernel_args(user_args: list[str]) -> list[tuple[str, int]]:
    """The arguments the build and boot chain add, except those the manifest sets itself:
    (as shown, length in bytes) each."""
    keys = {a.split("=", 1)[0] for a in user_args}
    return [arg for key, arg in BUILD_KERNEL_ARGS.items() if key not in keys]


def added_length(user_args: list[str]) -> int:
    """Bytes of the command line that the build and boot chain take (with separating spaces)."""
    added = build_kernel_args(user_args)
    return sum(n for _, n in added) + max(len(added) - 1, 0)


def cmdline_lengths(user_args: list[str]) -> list[int]:
    """The command line's length after each of ``user_args`` in turn, after what the build adds."""
    length = added_length(user_args)
    out = []
    for arg in user_args:
        length += (1 if length else 0) + len(arg.encode("utf-8", "surrogateescape"))
        out.append(length)
    return out
