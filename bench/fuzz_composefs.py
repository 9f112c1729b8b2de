"""Long differential fuzz runs of bootimg's composefs core against the reference C tools.

    .venv/bin/python bench/fuzz_composefs.py --seed 7 --dumps 10000 --images 10000 --time 1800 --save out/

Same engine as tests/test_composefs_differential.py (tests/cfsfuzz.py), with any seed, count and
time budget. Prints the outcome counts, every disagreement (and writes its input to --save),
and mutations per second.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import cfsfuzz  # noqa: E402
from reference import reference_tools  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dumps", type=int, default=10000, help="dump mutations (default 10000)")
    ap.add_argument("--images", type=int, default=10000, help="image mutations (default 10000)")
    ap.add_argument("--start", type=int, default=0, help="first case index")
    ap.add_argument("--time", type=float, default=None, metavar="SECONDS", help="time budget for each kind")
    ap.add_argument("--save", metavar="DIR", help="write each disagreeing input here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case's verdict")
    args = ap.parse_args()

    tools = reference_tools()

    def progress(kind: str, i: int, report: cfsfuzz.Report) -> None:
        done = sum(report.counts.values())
        if args.verbose or done % 500 == 0:
            print(f"  {kind} {i}: {report.counts}", file=sys.stderr, flush=True)

    total = cfsfuzz.Report()
    with cfsfuzz.fuzzer(tools, args.seed) as fz:
        for kind, n in (("dump", args.dumps), ("image", args.images)):
            r = fz.run(n if kind == "dump" else 0, n if kind == "image" else 0, args.time, args.start, progress)
            done = sum(r.counts.values())
            rate = done / r.seconds if r.seconds else 0.0
            print(f"{kind}: {done} mutations in {r.seconds:.1f} s ({rate:.0f}/s): {r.counts} deliberate {r.rules}")
            for k, v in r.counts.items():
                total.counts[k] = total.counts.get(k, 0) + v
            total.disagreements += r.disagreements
    for where, detail, case in total.disagreements:
        print(f"DISAGREE {where} [{case.seed_name}; {', '.join(case.ops)}]: {detail}")
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            ext = "dump" if isinstance(case, cfsfuzz.DumpCase) else "img"
            data = case.dump if isinstance(case, cfsfuzz.DumpCase) else case.image
            Path(args.save, f"{where.replace(' ', '-')}.{ext}").write_bytes(data)
    print(f"disagreements: {len(total.disagreements)}")
    return 1 if total.disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
