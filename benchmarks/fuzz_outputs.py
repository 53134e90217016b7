"""Fuzz target for hostile or broken stage outputs read back as input (issue 8): training checkpoints and ONNX exports.

    python benchmarks/fuzz_outputs.py --cases 2000 --seed 0 --json out/fuzz_outputs.json [--target ckpt|onnx]
        [--real-onnx]                                              # fuzz a real `sparsepack export`, not the tiny one
    python benchmarks/fuzz_outputs.py --case 17 --seed 0 --target onnx --keep /tmp/repro    # replay one case

Two targets, each a valid base mutated at random, then read back:

- ``ckpt``: a ``finetune`` checkpoint directory (``latest`` -> ``step-N/{state.json,state.safetensors}``) of a
  RoSA run on a tiny Llama pack, read by ``Trainer.restore`` of a set-up trainer (what ``--resume`` does).
  Property: restore succeeds (harmless damage) or raises a ``FormatError`` subclass naming the file
  (``CheckpointError``, ``CheckpointMismatchError``, ``MissingFileError``, ``SafetensorsHeaderError``,
  ``UnsafePathError``).
- ``onnx``: an export directory (``model.onnx`` + external data, ``sparsepack_onnx.json``,
  ``adapters/*.onnx_adapter``), read by ``OnnxModel(DIR)`` and ``set_adapter`` for every adapter.
  By default the base is a tiny hand-built export of the same layout (milliseconds per case);
  ``--real-onnx`` fuzzes a real ``sparsepack export`` of a tiny pack instead.

On every case, as in ``benchmarks/fuzz_packs.py``: no other exception type, no hang (alarm), no large allocation
(address space capped 2 GiB above its size), no unpickle, nothing written in the sandbox, and no Python-level
open of anything in the sandbox's ``outside/`` directory (the targets of the escaping paths and symlinks; an
audit hook watches). A mutation that breaks a rule the reader enforces must fail; passing it is ``missed``.

The mutators live in ``benchmarks/fuzzing/output_mutators.py`` and the valid bases in
``benchmarks/fuzzing/output_bases.py``; this module runs the cases: seal, read back under the guards, classify,
report.
"""

from __future__ import annotations

import argparse
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
# Run as a script, sys.path[0] is benchmarks/, whose module names (onnx.py) would shadow the real packages.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.fuzzing.output_bases import build_ckpt_base, build_onnx_base, build_real_onnx_base  # noqa: E402
from benchmarks.fuzzing.output_mutators import MUTATORS, TARGETS, Mutation  # noqa: E402
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

BAD = (*BAD, "read_outside")
# the names tests/test_reliability_outputs.py and other scripts import from here
__all__ = ["BAD", "MUTATORS", "TARGETS", "CaseResult", "Mutation", "build_ckpt_base", "build_onnx_base",
           "build_real_onnx_base", "case_params", "main", "run_case", "seal_ckpt"]  # fmt: skip


def seal_ckpt(root: Path) -> None:
    """Record the (mutated) tensor file's size and sha256 in state.json, so the deeper checks are reached."""
    from sparsepack.formats.manifest import sha256_file

    step = root / "step-0000006"
    try:
        meta = json.loads((step / "state.json").read_text())
        st = step / "state.safetensors"
        meta["files"] = {"state.safetensors": {"sha256": sha256_file(st), "bytes": st.stat().st_size}}
        (step / "state.json").write_text(json.dumps(meta, indent=1))
    except (OSError, ValueError, TypeError):
        return


# ------------------------------------------------------------------------------------------------ running a case

_WATCH: list[str] = []  # absolute directory prefixes that must never be opened


def _audit(event: str, args: tuple) -> None:
    if _WATCH and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(args[0]))
        for prefix in _WATCH:
            if path.startswith(prefix):
                _WATCH.clear()
                raise ReadOutside(f"opened {path}")


class ReadOutside(BaseException):
    """Raised by the audit hook when a file under the watched ``outside/`` directory is opened."""


_HOOKED = False


def _install_audit() -> None:
    global _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True


def check_ckpt(root: Path, trainer) -> None:
    from sparsepack.pipeline import checkpoint as ckpt

    path = ckpt.latest_checkpoint(root)
    if path is not None:
        trainer.restore(path)


def check_onnx(root: Path) -> None:
    from sparsepack.runtime.onnx_runtime import OnnxModel

    m = OnnxModel(root)
    for name in m.adapters:
        m.set_adapter(name)


@dataclass
class CaseResult:
    target: str
    mutator: str
    detail: str
    sealed: bool
    must_fail: bool
    outcome: str
    error: str = ""
    seconds: float = 0.0

    @property
    def good(self) -> bool:
        return self.outcome in GOOD


def run_case(target: str, base: Path, work: Path, mutator: str, rng: random.Random, sealed: bool, trainer=None, *,
             timeout: float = 20.0, headroom: int = 2 << 30, keep: bool = False) -> CaseResult:  # fmt: skip
    """Copy ``base`` into a fresh sandbox (and a copy beside it as ``outside/``), mutate, read back, classify."""
    from sparsepack.formats.errors import FormatError

    _install_audit()
    sandbox = Path(tempfile.mkdtemp(prefix="case-", dir=work))
    try:
        root = sandbox / base.name
        shutil.copytree(base, root, symlinks=True)
        shutil.copytree(base, sandbox / "outside", symlinks=True)
        m = MUTATORS[target][mutator](rng, root)
        sealed = sealed and target == "ckpt" and not m.touched_record
        if sealed:
            seal_ckpt(root)
        must_fail = m.must_fail
        if target == "ckpt" and not sealed and not must_fail:
            must_fail = _ckpt_record_violated(root)
        before = snapshot(sandbox)
        start = time.perf_counter()
        _WATCH[:] = [str(sandbox / "outside") + os.sep]
        try:
            with no_unpickling(), memory_cap(headroom), deadline(timeout):
                check_ckpt(root, trainer) if target == "ckpt" else check_onnx(root)
            outcome, error = "ok", ""
        except FormatError as e:
            outcome, error = "typed", f"{type(e).__name__}: {e}"
        except CaseTimeout as e:
            outcome, error = "timeout", str(e)
        except Unpickled as e:
            outcome, error = "unpickled", str(e)
        except ReadOutside as e:
            outcome, error = "read_outside", str(e)
        except BaseException as e:  # noqa: BLE001 - anything else is a bug
            if isinstance(e, KeyboardInterrupt):
                raise
            tb = traceback.format_exception(type(e), e, e.__traceback__)
            outcome, error = "untyped", f"{type(e).__name__}: {e}\n{''.join(tb[-4:])}"
        finally:
            _WATCH.clear()
        seconds = time.perf_counter() - start
        if outcome == "ok" and must_fail:
            outcome, error = "missed", "accepted damage the reader must refuse"
        after = snapshot(sandbox)
        changed = sorted(k for k, v in after.items() if before.get(k) != v) + sorted(set(before) - set(after))
        if changed and outcome not in ("untyped", "timeout"):
            outcome, error = "wrote", f"files created or changed by reading: {changed[:5]}"
        return CaseResult(target, mutator, m.detail, sealed, must_fail, outcome, error[:2000], round(seconds, 4))
    finally:
        if not keep:
            shutil.rmtree(sandbox, ignore_errors=True)


def _ckpt_record_violated(root: Path) -> bool:
    """The tensor file differs from what state.json records (size or sha256): resuming must refuse it."""
    from sparsepack.formats.manifest import sha256_file

    step = root / "step-0000006"
    try:
        rec = json.loads((step / "state.json").read_text())["files"]["state.safetensors"]
        st = step / "state.safetensors"
        return st.stat().st_size != rec["bytes"] or sha256_file(st) != rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # no usable record: the mutation's own must_fail decides


def case_params(seed: int, i: int, names: list[str]) -> tuple[str, random.Random, bool]:
    rng = random.Random(seed * 1_000_003 + i)
    return names[rng.randrange(len(names))], rng, rng.random() < 0.6


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000, help="cases per target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", action="append", choices=TARGETS, help="only these targets (default: both)")
    ap.add_argument("--real-onnx", action="store_true", help="fuzz a real export of a tiny pack (not the tiny graph)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--case", type=int, default=None, help="replay only case number CASE")
    ap.add_argument("--keep", type=Path, default=None, help="with --case: keep the mutated sandbox here")
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    work = Path(tempfile.mkdtemp(prefix="fuzz-outputs-"))
    report: dict = {"seed": args.seed, "real_onnx": args.real_onnx, "targets": {}}
    bad_total = 0
    try:
        for target in args.target or TARGETS:
            trainer = None
            if target == "ckpt":
                base, trainer = build_ckpt_base(work / "ckpt-base")
            elif args.real_onnx:
                base = build_real_onnx_base(work / "onnx-base")
            else:
                base = build_onnx_base(work / "onnx-base")
            names = sorted(MUTATORS[target])
            outcomes: Counter = Counter()
            per_mutator: dict[str, Counter] = defaultdict(Counter)
            bad = []
            start = time.perf_counter()
            for i in [args.case] if args.case is not None else range(args.cases):
                mutator, rng, sealed = case_params(args.seed, i, names)
                r = run_case(target, base, work, mutator, rng, sealed, trainer, timeout=args.timeout,
                             keep=args.keep is not None)  # fmt: skip
                if args.keep is not None:
                    shutil.copytree(sorted(work.glob("case-*"))[-1], args.keep, symlinks=True, dirs_exist_ok=True)
                outcomes[r.outcome] += 1
                per_mutator[mutator][r.outcome] += 1
                if not r.good:
                    replay = (f"python benchmarks/fuzz_outputs.py --target {target} --seed {args.seed} --case {i}"
                              + " --real-onnx" * args.real_onnx)  # fmt: skip
                    bad.append({"case": i, **asdict(r), "replay": replay})
                    print(f"[{target} {i}] {r.outcome}: {mutator} {r.detail}\n    "
                          f"{r.error.splitlines()[0] if r.error else ''}", file=sys.stderr)  # fmt: skip
                done = sum(outcomes.values())
                if done % 200 == 0:
                    print(f"{target}: {done} cases, {dict(outcomes)}, {time.perf_counter() - start:.0f} s",
                          file=sys.stderr)  # fmt: skip
            bad_total += len(bad)
            report["targets"][target] = {
                "cases": sum(outcomes.values()), "seconds": round(time.perf_counter() - start, 1),
                "outcomes": dict(outcomes), "bad": len(bad),
                "by_mutator": {k: dict(v) for k, v in sorted(per_mutator.items())}, "bad_cases": bad[:100],
            }  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    summary = {t: {k: v[k] for k in ("cases", "seconds", "outcomes", "bad")} for t, v in report["targets"].items()}
    print(json.dumps(summary, indent=2))
    return 1 if bad_total else 0


if __name__ == "__main__":
    sys.exit(main())
