"""End-to-end fuzzing of bootimg-setup-root's root setup: fails closed and never mounts a root
it did not authenticate.

Run inside a private mount namespace (`unshare -m --propagation private`), as root:

    python fuzz_e2e.py PROGRAM RELEASE_DIR WORKDIR SEED COUNT

PROGRAM is the TEST build (paths from the environment, fs-verity simulated as "enabled", no
TPM). RELEASE_DIR is a signed release. The physical root has the boot contract 2 layout: the
release at /bootimg/releases/VERSION over the shared store /bootimg/objects, with decoys that must
never boot (a copy at /bootimg/release, the old layout's place, and an installer's temporary
/bootimg/releases/.VERSION.tmp). Each case mutates ONE input (boot.conf, the kernel command line
with bootimg.release= and bootimg.security_version=, release.json, its signature, a trusted key
or its file name, the rollback state file) with byte-level damage (bit flips, truncation,
inserted separators, "/..", NUL bytes, huge runs) and runs the program on a bind mount of the
physical root. Every run must end either
- exit 1 with exactly one "bootimg: FATAL:" line, nothing mounted but the physical root, no
  booted.json, or
- exit 0 having mounted the genuine root digest with verity=require, from the release the
  command line names (a direct child of /bootimg/releases), at a security_version not below the
  minimum (a mutation that changed nothing that is authenticated, e.g. the untrusted comment or
  an unknown boot.conf line).
Prints one summary line; exits 1 at the first violation (with the case), 0 otherwise.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bootimg.release.layout import ReleaseDir


def mountpoints_under(top: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4] == top or ln.split()[4].startswith(top + "/")]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randint(0, len(b)) if b else 0
        op = rng.randrange(9)
        if op == 0 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(pos, len(b) - 1)] = rng.randrange(256)
        elif op == 2:
            del b[pos:]
        elif op == 3:
            b[pos:pos] = rng.choice([b"\n", b"\0", b"/", b".", b":", b"=", b'"', b"\\", b"{", b"}", b",", b" ", b"\r"])
        elif op == 4:
            b[pos:pos] = bytes([rng.choice(b"A0/.=")]) * rng.choice([10, 1000, 70000])
        elif op == 5 and b:
            del b[pos:pos + rng.randint(1, 64)]
        elif op == 6:
            b[pos:pos] = b"/.."
        elif op == 7 and len(b) > 1:
            i = rng.randrange(len(b))
            j = min(pos, len(b) - 1)
            b[i], b[j] = b[j], b[i]
        else:
            b[pos:pos] = rng.choice([b"BOOTIMG_RELEASE=/bootimg/../x\n", b"bootimg.release=/x/../y ",
                                     b"composefs.digest=v1-sha256-12:" + b"0" * 64 + b" ", b"BOOTIMG_TRUST=sealed\n",
                                     b"BOOTIMG_STATE=//\n", b'"kernel_argument": "composefs.digest=v1-sha256-12:',
                                     b"BOOTIMG_FSVERITY=optional\n", b"bootimg.release=/bootimg/release ",
                                     b"bootimg.release=/bootimg/releases/.1.4.0.tmp ", b"bootimg.security_version=1 ",
                                     b"bootimg.security_version=4294967296 ", b"BOOTIMG_RELEASES=/bootimg\n",
                                     b"BOOTIMG_ROLLBACK_NV=0x01500017\n", b'"security_version": 7, ', b"9"])
    return bytes(b)


def main() -> int:
    program, release, work, seed, count = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), \
        int(sys.argv[5])
    rng = random.Random(seed)
    genuine = json.loads((release / "release.json").read_bytes())["root"]["digest"]
    rd = ReleaseDir(release)
    root = rd.load_image().root
    conf0 = rd.read_file(root.lookup(b"/usr/lib/bootimg/boot.conf"))
    keys0 = {n.decode(): rd.read_file(k) for n, k in root.lookup(b"/usr/lib/bootimg/keys").children.items()}
    json0 = (release / "release.json").read_bytes()
    sig0 = (release / "release.json.minisig").read_bytes()
    described = json.loads(json0)
    version, secver = described["version"], described["security_version"]
    cmdline0 = (b"quiet rw composefs.digest=v1-sha256-12:" + genuine.encode() + f" bootimg.release=/bootimg/releases/"
                f"{version} bootimg.security_version={secver}\n".encode())
    state0 = f"{secver}\n".encode()

    if work.exists():
        shutil.rmtree(work)
    phys, sysroot, run, initrd = work / "phys", work / "sysroot", work / "run", work / "initrd"
    for d in (sysroot, run, initrd / "keys"):
        d.mkdir(parents=True)
    rel = phys / "bootimg" / "releases" / version
    shutil.copytree(release, rel, ignore=lambda d, names: ["objects"] if Path(d) == release else [])
    shutil.copytree(release / "objects", phys / "bootimg" / "objects")
    for decoy in (phys / "bootimg" / "release", phys / "bootimg" / "releases" / f".{version}.tmp"):
        shutil.copytree(release, decoy)
    (phys / "bootimg" / "state" / "var").mkdir(parents=True)
    (phys / "bootimg" / "state" / ".provisioned").touch()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ASAN_OPTIONS": "detect_leaks=0:exitcode=99",
           "UBSAN_OPTIONS": "halt_on_error=1:exitcode=98", "BOOTIMG_CONF": str(initrd / "boot.conf"),
           "BOOTIMG_SYSROOT": str(sysroot), "BOOTIMG_RUN": str(run), "BOOTIMG_CMDLINE": str(work / "cmdline"),
           "BOOTIMG_KEYS_DIR": str(initrd / "keys"), "BOOTIMG_KMSG": str(work / "kmsg"),
           "BOOTIMG_TEST_VERITY": "enabled", "BOOTIMG_TEST_TPM": "none"}
    stats = {"refused": 0, "booted": 0}
    for case in range(count):
        # the genuine inputs, then ONE of them damaged
        (initrd / "boot.conf").write_bytes(conf0)
        (work / "cmdline").write_bytes(cmdline0)
        shutil.rmtree(initrd / "keys")
        (initrd / "keys").mkdir()
        for name, data in keys0.items():
            (initrd / "keys" / name).write_bytes(data)
        (rel / "release.json").write_bytes(json0)
        (rel / "release.json.minisig").write_bytes(sig0)
        (phys / "bootimg" / "state" / "rollback").write_bytes(state0)
        shutil.rmtree(run)
        run.mkdir()
        what = rng.choice(["conf", "cmdline", "cmdline", "json", "sig", "key", "keyname", "state"])
        if what == "conf":
            (initrd / "boot.conf").write_bytes(mutate(rng, conf0))
        elif what == "cmdline":
            (work / "cmdline").write_bytes(mutate(rng, cmdline0))
        elif what == "json":
            (rel / "release.json").write_bytes(mutate(rng, json0))
        elif what == "sig":
            (rel / "release.json.minisig").write_bytes(mutate(rng, sig0))
        elif what == "state":
            (phys / "bootimg" / "state" / "rollback").write_bytes(mutate(rng, state0))
        else:
            name = rng.choice(sorted(keys0))
            p = initrd / "keys" / name
            if what == "key":
                p.write_bytes(mutate(rng, keys0[name]))
            else:
                new = mutate(rng, name.encode()).replace(b"/", b"_").replace(b"\0", b"_")[:200] or b"_"
                p.rename(initrd / "keys" / new.decode("latin-1"))
        subprocess.run(["mount", "--bind", str(phys), str(sysroot)], check=True)
        before = mountpoints_under(str(work))
        res = subprocess.run([program], env=env, capture_output=True, timeout=120)
        err = res.stderr.decode("utf-8", "replace")
        fatal = [ln for ln in err.splitlines() if ln.startswith("bootimg: FATAL:")]
        booted = run / "booted.json"
        where = f"case {case} (seed {seed}, {what}): rc {res.returncode}: {err.strip()[-600:]}"
        if res.returncode == 1:
            if len(fatal) != 1 or booted.exists() or mountpoints_under(str(work)) != before:
                print(f"VIOLATION (not closed) {where}; mounts {mountpoints_under(str(work))}")
                return 1
            stats["refused"] += 1
        elif res.returncode == 0:
            data = json.loads(booted.read_text())
            named = [w[16:] for w in (work / "cmdline").read_bytes().decode("latin-1").split() if w.startswith("bootimg.release=")]
            wanted = named[-1] if named else None
            if (data["digest"] != genuine or data["verity"] != "require" or fatal or data["release"] != wanted
                    or not re.fullmatch(r"/bootimg/releases/[A-Za-z0-9_-][A-Za-z0-9._-]*", wanted)
                    or data["release_dir"] != "/sysroot" + wanted or data["security_version"] < data["rollback_minimum"]):
                print(f"VIOLATION (booted something else) {where}: {data}")
                return 1
            stats["booted"] += 1
        else:
            print(f"VIOLATION (exit status) {where}")
            return 1
        for m in sorted(set(mountpoints_under(str(work))), key=len, reverse=True):
            subprocess.run(["umount", "-R", "-l", m], capture_output=True)
        left = mountpoints_under(str(work))
        if left:
            print(f"harness: cannot clean up after case {case}: {left}")
            return 2
    print(f"fuzz_e2e: {count} cases, seed {seed}: {stats['refused']} refused with one FATAL line and nothing mounted, "
          f"{stats['booted']} booted the genuine root")
    return 0


if __name__ == "__main__":
    sys.exit(main())
