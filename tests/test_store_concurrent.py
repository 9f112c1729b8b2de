"""Four `bootimg mkcomposefs --digest-store=STORE` runs at once, over overlapping trees, into
one store, with the reference mkcomposefs filling the same store at the same time: all succeed,
every object the images name is there, every object's content has the fs-verity digest its name
says, and no temp file is left behind."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

from bootimg.composefs import fsverity
from bootimg.composefs.info import list_objects
from bootimg.composefs.reader import load_image

N_RUNS = 4
ROUNDS = 2


def _trees(top: Path, rng: random.Random) -> list[Path]:
    """N_RUNS trees: files every tree has, files pairs of trees share, files of one tree only,
    the same content under several names, and sizes from just over the inline limit to 2 MiB."""
    shared = [rng.randbytes(rng.choice([65, 4096, 70_000, 2 << 20])) for _ in range(30)]
    pairs = [rng.randbytes(rng.choice([100, 8192, 300_000])) for _ in range(20)]
    trees = []
    for t in range(N_RUNS):
        root = top / f"tree{t}"
        (root / "sub" / "deep").mkdir(parents=True)
        for i, data in enumerate(shared):
            (root / ("sub" if i % 2 else "") / f"shared{i}").write_bytes(data)
        for i, data in enumerate(pairs):
            if i % N_RUNS in (t, (t + 1) % N_RUNS):
                (root / "sub" / "deep" / f"pair{i}").write_bytes(data)
        for i in range(10):
            (root / f"own{i}").write_bytes(rng.randbytes(rng.choice([65, 5000, 100_000])))
        (root / "dup-a").write_bytes(shared[0])
        (root / "sub" / "dup-b").write_bytes(shared[0])
        trees.append(root)
    return trees


def test_concurrent_mkcomposefs_into_one_store(tmp_path, reference):
    rng = random.Random(7)
    for rnd in range(ROUNDS):
        work = tmp_path / f"round{rnd}"
        trees = _trees(work, rng)
        store = work / "store"
        procs = [subprocess.Popen([sys.executable, "-m", "bootimg", "mkcomposefs", "-q", f"--digest-store={store}",
                                   str(tree), str(work / f"img{i}.cfs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for i, tree in enumerate(trees)]
        procs.append(subprocess.Popen([str(reference.mkcomposefs), f"--digest-store={store}", str(trees[rnd % N_RUNS]),
                                       str(work / "ref.cfs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        results = [(p.wait(timeout=600), p.stderr.read().decode()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        for rc, err in results:
            assert rc == 0 and "Traceback" not in err, err

        assert (work / "ref.cfs").read_bytes() == (work / f"img{rnd % N_RUNS}.cfs").read_bytes()
        wanted = set()
        for i in range(N_RUNS):
            wanted |= set(list_objects(load_image(work / f"img{i}.cfs").root))
        stored = set()
        leftovers = []
        for dirpath, _, files in os.walk(store):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), store).encode()
                if len(rel) != 65 or rel[2:3] != b"/":
                    leftovers.append(rel)
                    continue
                stored.add(rel)
                with open(os.path.join(dirpath, name), "rb") as f:
                    assert fsverity.digest(f.read()).hex() == rel.replace(b"/", b"").decode(), rel
        assert not leftovers, leftovers
        assert stored == wanted
