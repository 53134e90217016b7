"""Fuzz target for hostile or broken packs (issue 8): mutate a valid pack at random, then read and load it.

    python benchmarks/fuzz_packs.py --cases 3000 --seed 0 --json out/fuzz_packs.json [--family paths] [--no-load]
        [--forward]                                                          # a pack that loads must also run
    python benchmarks/fuzz_packs.py --case 1234 --seed 0 --keep /tmp/repro     # replay one case, keep its pack

Property checked on every case: ``read_pack(pack, verify)`` and then ``sparsepack.load(pack, verify)`` either
succeed (the mutation was harmless, e.g. a flipped byte inside tensor data with ``verify=False``) or raise a
:class:`sparsepack.formats.errors.FormatError` subclass; never another exception type, never a hang (per-case
alarm), never a large allocation (the address space is capped a little above its size before the case), never
an unpickle (``torch.load``/``pickle.load(s)`` patched to fail loudly), and nothing written anywhere (the case's
sandbox is compared before and after). Mutations that break a rule the reader must enforce (a symlink out of
the pack, an index out of range, a file that differs from the manifest, ...) must fail: passing them is a miss.

The mutators live in ``benchmarks/fuzzing/pack_mutators.py``, one registration per mutator and grouped by family,
so that the hypothesis tests in ``tests/test_reliability_fuzz.py`` draw from the same set (``FAMILIES``) with a
shrinkable random source; the per-case guards (alarm, memory cap, no unpickling, snapshot) in
``benchmarks/fuzzing/sandbox.py``. This module runs the cases: seal, read, classify, report.
Outcomes: ``ok``, ``typed`` (good), and the bad ones ``untyped``, ``missed``, ``timeout``, ``wrote``,
``unpickled``. The JSON report counts them overall, per family and per mutator, and lists every bad case with
the command line that replays it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# benchmarks/ itself off the path: its onnx.py and kernels.py would shadow those packages
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.fuzzing.hostile import read_st, write_st  # noqa: E402
from benchmarks.fuzzing.pack_mutators import FAMILIES, MANIFEST, MUTATORS, Mutation  # noqa: E402
from benchmarks.fuzzing.sandbox import (  # noqa: E402
    BAD,
    GOOD,
    CaseTimeout,
    Unpickled,
    deadline,
    memory_cap,
    no_unpickling,
    snapshot,
)

# the names tests/test_reliability_fuzz.py and other scripts import from here
__all__ = ["BAD", "FAMILIES", "GOOD", "MUTATORS", "CaseResult", "Mutation", "build_base", "case_params", "check_pack",
           "main", "manifest_violated", "read_st", "run_case", "seal", "write_st"]  # fmt: skip


def seal(pack: Path) -> None:
    """Rewrite the manifest's ``files`` to match the (mutated) files, so that deeper checks are reached."""
    from sparsepack.formats.manifest import sha256_file

    try:
        data = json.loads((pack / MANIFEST).read_text(encoding="utf-8"))
        data["files"] = {}
    except (OSError, ValueError, TypeError):
        return
    for dirpath, _dirs, files in os.walk(pack):
        for name in files:
            p = Path(dirpath) / name
            rel = p.relative_to(pack).as_posix()
            if rel != MANIFEST and p.is_file():
                with contextlib.suppress(OSError):
                    data["files"][rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    (pack / MANIFEST).write_text(json.dumps(data, indent=1))


def manifest_violated(pack: Path, verify: bool) -> bool:
    """True when the pack differs from what its manifest records (in a way ``verify`` covers), or it has none."""
    from sparsepack.formats.manifest import Manifest, sha256_file

    if not (pack / MANIFEST).is_file():
        return False  # read as a foreign checkpoint: nothing recorded to violate
    try:
        m = Manifest.read(pack / MANIFEST)
    except Exception:  # noqa: BLE001 - any manifest the reader cannot parse must make it fail
        return True
    for rel, info in m.files.items():
        p = pack / rel
        try:
            if not p.is_file() or p.stat().st_size != info["bytes"]:
                return True
            if verify and sha256_file(p) != info["sha256"]:
                return True
        except (OSError, ValueError):
            return True
    return False


@dataclass
class CaseResult:
    mutator: str
    detail: str
    verify: bool
    sealed: bool
    must_fail: bool
    outcome: str  # ok | typed | untyped | missed | timeout | wrote | unpickled
    error: str = ""
    seconds: float = 0.0

    @property
    def good(self) -> bool:
        return self.outcome in GOOD


def build_base(directory: Path) -> Path:
    """A valid tiny pack (2-layer Llama, 4-bit RTN, one adapter with low-rank and sparse parts) + nothing else."""
    from tests.factories import random_adapter, rtn_pack, tiny_llama

    model = tiny_llama()
    path, _ref = rtn_pack(model, Path(directory) / "base", adapters={"ad1": random_adapter(model)})
    return path


def check_pack(pack: Path, verify: bool, load: bool, timeout: float, headroom: int,
               forward: bool = False) -> tuple[str, str]:  # fmt: skip
    """Read (and load, and run) ``pack``; returns (outcome, error text): ok | typed | untyped | timeout | unpickled.

    With ``forward``, a pack that loads must also run: one forward pass with every adapter active.
    """
    import sparsepack
    from sparsepack.formats.errors import FormatError
    from sparsepack.formats.pack import read_pack

    try:
        with no_unpickling(), memory_cap(headroom), deadline(timeout):
            read_pack(pack, verify=verify)
            if load:
                model = sparsepack.load(pack, verify=verify)
                if forward:
                    import torch

                    from sparsepack.layers.inject import set_active_adapters

                    set_active_adapters(model, list(model.sparsepack.pack.adapters))
                    with torch.no_grad():
                        model(torch.tensor([[1, 2, 3, 4]]))
    except FormatError as e:
        return "typed", f"{type(e).__name__}: {e}"
    except CaseTimeout as e:
        return "timeout", str(e)
    except Unpickled as e:
        return "unpickled", str(e)
    except BaseException as e:  # noqa: BLE001 - the point is to classify anything else as a bug
        if isinstance(e, KeyboardInterrupt):
            raise
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        return "untyped", f"{type(e).__name__}: {e}\n{''.join(tb[-4:])}"
    return "ok", ""


def run_case(base: Path, work: Path, mutator: str, rng: random.Random, verify: bool, sealed: bool, *,
             load: bool = True, forward: bool = False, timeout: float = 20.0, headroom: int = 2 << 30,
             keep: bool = False) -> CaseResult:  # fmt: skip
    """Copy ``base`` into a fresh sandbox under ``work``, mutate it, and check the property."""
    sandbox = Path(tempfile.mkdtemp(prefix="case-", dir=work))
    try:
        pack = sandbox / "pack"
        shutil.copytree(base, pack, symlinks=True)
        shutil.copytree(base, sandbox / "outside", symlinks=True)
        m = MUTATORS[mutator](rng, pack)
        sealed = sealed and not m.touched_manifest
        if sealed:
            seal(pack)
        must_fail = m.must_fail or manifest_violated(pack, verify)
        before = snapshot(sandbox)
        start = time.perf_counter()
        outcome, error = check_pack(pack, verify, load, timeout, headroom, forward)
        seconds = time.perf_counter() - start
        if outcome == "ok" and must_fail:
            outcome, error = "missed", "the reader accepted a pack that breaks a rule it must enforce"
        changed = sorted(k for k, v in snapshot(sandbox).items() if before.get(k) != v)
        changed += sorted(set(before) - set(snapshot(sandbox)))
        if changed and outcome not in ("untyped", "timeout"):
            outcome, error = "wrote", f"files created or changed by reading: {changed[:5]}"
        return CaseResult(mutator, m.detail, verify, sealed, must_fail, outcome, error[:2000], round(seconds, 4))
    finally:
        if not keep:
            shutil.rmtree(sandbox, ignore_errors=True)


def case_params(seed: int, i: int, names: list[str]) -> tuple[str, random.Random, bool, bool]:
    """Mutator, random source, verify and seal of case ``i``: a pure function of (seed, i)."""
    rng = random.Random(seed * 1_000_003 + i)
    return names[rng.randrange(len(names))], rng, rng.random() < 0.5, rng.random() < 0.7


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these families")
    ap.add_argument("--no-load", action="store_true", help="read_pack only, skip sparsepack.load")
    ap.add_argument("--forward", action="store_true", help="a pack that loads must also run one forward pass")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--case", type=int, default=None, help="replay only case number CASE")
    ap.add_argument("--keep", type=Path, default=None, help="with --case: keep the mutated sandbox here")
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    names = sorted(n for f in (args.family or sorted(FAMILIES)) for n in FAMILIES[f])
    family_of = {n: f for f, ns in FAMILIES.items() for n in ns}
    work = Path(tempfile.mkdtemp(prefix="fuzz-packs-"))
    base = build_base(work)
    indices = [args.case] if args.case is not None else range(args.cases)
    outcomes: Counter = Counter()
    per_family: dict[str, Counter] = defaultdict(Counter)
    per_mutator: dict[str, Counter] = defaultdict(Counter)
    bad = []
    start = time.perf_counter()
    try:
        for i in indices:
            mutator, rng, verify, sealed = case_params(args.seed, i, names)
            keep = args.keep is not None
            r = run_case(base, work, mutator, rng, verify, sealed, load=not args.no_load, forward=args.forward,
                         timeout=args.timeout, keep=keep)  # fmt: skip
            if keep:
                kept = sorted(work.glob("case-*"))[-1]
                shutil.copytree(kept, args.keep, symlinks=True, dirs_exist_ok=True)
            outcomes[r.outcome] += 1
            per_family[family_of[mutator]][r.outcome] += 1
            per_mutator[mutator][r.outcome] += 1
            if not r.good:
                flags = " --no-load" * args.no_load + " --forward" * args.forward
                replay = f"python benchmarks/fuzz_packs.py --seed {args.seed} --case {i}{flags}"
                bad.append({"case": i, **asdict(r), "replay": replay})
                print(f"[{i}] {r.outcome}: {mutator} {r.detail}\n    {r.error.splitlines()[0] if r.error else ''}",
                      file=sys.stderr)  # fmt: skip
            done = sum(outcomes.values())
            if done % 100 == 0:
                print(f"{done} cases, {dict(outcomes)}, {time.perf_counter() - start:.0f} s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "cases": sum(outcomes.values()),
        "seed": args.seed,
        "load": not args.no_load,
        "forward": args.forward,
        "seconds": round(time.perf_counter() - start, 1),
        "outcomes": dict(outcomes),
        "bad": len(bad),
        "by_family": {k: dict(v) for k, v in sorted(per_family.items())},
        "by_mutator": {k: dict(v) for k, v in sorted(per_mutator.items())},
        "bad_cases": bad[:200],
    }
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(json.dumps({k: report[k] for k in ("cases", "seconds", "outcomes", "bad", "by_family")}, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
