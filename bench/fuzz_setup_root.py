#!/usr/bin/env python3
"""Longer fuzz runs of bootimg-setup-root than `make test` does (tests/test_setup_root_units.py and
tests/test_setup_root_fuzz.py run fixed-seed batches of the same drivers).

1. the parsers and the crypto in-process (tests/setup_root/check.c under ASan/UBSan): mutated
   keys, signatures, release.json, boot.conf, command lines, base64, TPM responses, security
   versions and release paths; nothing but the genuine key and signature may verify;
2. the root setup end to end (tests/setup_root/fuzz_e2e.py, as root, in a private mount
   namespace): every run fails closed or boots the genuine root of the release the command line
   names, not below the rollback minimum.

Usage: sudo .venv/bin/python bench/fuzz_setup_root.py [--seed N] [--rounds 1000000] [--cases 2000]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=None, help="seed (default: random, printed)")
    ap.add_argument("--rounds", type=int, default=1_000_000, help="in-process rounds (default 1,000,000)")
    ap.add_argument("--cases", type=int, default=2000, help="end-to-end cases (default 2000; needs root)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 2**63)
    print(f"seed {seed}")

    import example_inputs
    from test_setup_root_units import ENV, build_check

    from bootimg.boot import setup_root
    from bootimg.cli import main as cli

    with tempfile.TemporaryDirectory(prefix="fuzz-setup-root-") as tmp:
        top = Path(tmp)
        shutil.copytree(REPO / "manifests", top / "manifests")
        example_inputs.main(top / "build")
        release = top / "release"
        if cli(["build", str(top / "manifests" / "ivi-demo.yaml"), "-o", str(release),
                "--key", str(top / "build" / "keys" / "release-2026.key"), "--no-boot-check"]) != 0:
            return 1
        check = build_check(top / "check")
        (top / "boot.conf").write_text("BOOTIMG_TRUST=signed\nBOOTIMG_FSVERITY=required\nBOOTIMG_ETC=transient\n")
        t0 = time.monotonic()
        res = subprocess.run([str(check), "fuzz", str(seed), str(args.rounds), str(top / "build/keys/release-2026.pub"),
                              str(release / "release.json.minisig"), str(release / "release.json"),
                              str(top / "boot.conf")], env={**os.environ, **ENV}, text=True, capture_output=True)
        print(f"in-process: {res.stdout.strip() or res.stderr.strip()[-2000:]} ({time.monotonic() - t0:.0f} s)")
        if res.returncode != 0:
            return 1
        if args.cases and os.geteuid() == 0:
            program = setup_root.build(variant="test-asan")
            t0 = time.monotonic()
            res = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable,
                                  str(REPO / "tests/setup_root/fuzz_e2e.py"), str(program), str(release),
                                  str(top / "work"), str(seed), str(args.cases)],
                                 text=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            print(f"end to end: {res.stdout.strip()} ({time.monotonic() - t0:.0f} s)")
            if res.returncode != 0:
                print(res.stderr[-3000:])
                return 1
        elif args.cases:
            print("end to end: skipped (needs root)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
