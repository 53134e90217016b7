"""Crash safety (issue 8): kill -9 a stage mid-write, two writers at once, a full disk.

Guarantee under test: whatever instant a writer dies at, the output path holds either the complete previous
output or the complete new one (never a partial one, never nothing when something was there), and the only
leftovers are temporary siblings ``.NAME.tmp-PID@HOST-*`` / ``.NAME.old-*`` that the next write to that path
removes (``clean_stale_siblings``).

The harness is stage-agnostic: a :class:`Stage` says how to run one CLI command writing OUT, how to make a
valid previous output, and how to check one. ``STAGES`` holds compress today; finetune (including a kill during
its checkpoint save) and export plug in by adding their Stage, and every scenario then runs for them too.
Kill points are either external (SIGKILL from this process at some time after the staging directory appears)
or internal (the child SIGKILLs itself at the n-th call of a chosen function, before or after the real call:
see ``BOOT``), which reaches the narrow windows (between fsync and rename, just after the exchange) that a
timer would hit only by luck.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from sparsepack.config import QuantConfig
from sparsepack.formats import errors
from sparsepack.formats import staging as pack_mod
from sparsepack.formats.manifest import MANIFEST_FILE, Manifest
from sparsepack.formats.pack import read_pack, write_pack
from sparsepack.formats.staging import clean_stale_siblings, staged_dir, stale_siblings
from sparsepack.pipeline.compress import compress
from tests.factories import random_adapter, rtn_pack, save_hf, tiny_llama

ROOT = Path(__file__).resolve().parent.parent

# Runs the CLI with faults installed. argv[1] is a JSON list of faults: {"target": "module:attr[.attr]", "when":
# "before"|"after", "nth": n, "arg0": str|None} SIGKILLs the process at the n-th call (counting calls whose first
# argument is arg0, when given); {"target": ..., "returns": value} replaces the function by a constant.
BOOT = r"""
import importlib, json, os, signal, sys
for f in json.loads(sys.argv[1]):
    module, attr = f["target"].split(":")
    mod = importlib.import_module(module)
    *owner, attr = attr.split(".")  # "module:Class.method" patches a method
    for name in owner:
        mod = getattr(mod, name)
    real = getattr(mod, attr)

    def hooked(*a, _real=real, _f=f, _n=[0], **k):
        if "returns" in _f:
            return _f["returns"]
        if _f.get("arg0") is not None and (not a or str(a[0]) != _f["arg0"]):
            return _real(*a, **k)
        _n[0] += 1
        hit = _n[0] == _f.get("nth", 1)
        if hit and _f["when"] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        out = _real(*a, **k)
        if hit and _f["when"] == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(mod, attr, hooked)
sys.argv = ["sparsepack", *sys.argv[2:]]
from sparsepack.cli import main
main()
"""


# ------------------------------------------------------------------------------------------------ harness


@dataclass(frozen=True)
class Kill:
    """How one child dies: ``after_s`` seconds after its staging directory appears (after it starts, with
    ``from_start``), or by its own ``faults``."""

    after_s: float | None = None
    faults: tuple[dict, ...] = ()
    from_start: bool = False


@dataclass
class Ran:
    rc: int  # -9 when SIGKILLed
    seconds: float
    stderr: str
    saw_staging: bool  # a .NAME.tmp-* sibling existed while it ran


def run_and_kill(argv: list[str], out: Path, kill: Kill, timeout: float = 180.0) -> Ran:
    """Run ``sparsepack ARGV`` (which writes ``out``) in a child process and kill -9 it as ``kill`` says."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}  # fmt: skip
    with tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", BOOT, json.dumps(list(kill.faults)), *argv],
                                stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=out.parent)  # fmt: skip
        saw = False
        killed_at = start + kill.after_s if kill.from_start and kill.after_s is not None else None
        while proc.poll() is None and time.monotonic() - start < timeout:
            if not saw and any(".tmp-" in p.name for p in stale_siblings(out)):
                saw = True
                if kill.after_s is not None and not kill.from_start:
                    killed_at = time.monotonic() + kill.after_s
            if killed_at is not None and time.monotonic() >= killed_at:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        if proc.poll() is None and killed_at is None:  # ran past the timeout: a hang
            proc.kill()
        rc = proc.wait()
        err.seek(0)
        return Ran(rc, time.monotonic() - start, err.read().decode(errors="replace")[-3000:], saw)


@dataclass(frozen=True)
class Stage:
    """One CLI stage that writes an output directory."""

    name: str
    argv: Callable[[Path, Path], list[str]]  # (inputs, out) -> CLI arguments, without --overwrite
    previous: Callable[[Path, Path], None]  # write a valid previous output at out (in-process, fast)
    check: Callable[[Path], None] = field(default=lambda out: read_pack(out, verify=True))  # raises if invalid
    made_by_stage: Callable[[Path], bool] | None = None  # default: the manifest's last history entry is this stage


def _compress_argv(inputs: Path, out: Path) -> list[str]:
    return ["compress", str(inputs / "hf"), "-o", str(out), "--calib", str(inputs / "corpus.txt"), "--nsamples",
            "16", "--seqlen", "64", "--group-size", "32", "--json"]  # fmt: skip


def _previous_pack(inputs: Path, out: Path) -> None:
    rtn_pack(tiny_llama(seed=3), out)


def _merge_argv(inputs: Path, out: Path) -> list[str]:
    return ["merge", str(inputs / "packad"), "-o", str(out), "--adapter", "ad1", "--json"]


def _export_argv(inputs: Path, out: Path) -> list[str]:
    return ["export", str(inputs / "packad"), "--format", "onnx", "-o", str(out), "--adapter", "ad1", "--json"]


def _previous_export(inputs: Path, out: Path) -> None:
    from benchmarks.fuzz_outputs import build_onnx_base

    shutil.copytree(build_onnx_base(Path(tempfile.mkdtemp(dir=out.parent.parent))), out)  # a small valid export


def _check_export(out: Path) -> None:
    import numpy as np

    from sparsepack.runtime.onnx_runtime import OnnxModel

    m = OnnxModel(out)
    for name in [None, *m.adapters]:
        m.set_adapter(name)
        assert np.isfinite(m.logits(np.array([[1, 2, 3]]))).all()


def tree_digest(out: Path) -> str:
    """sha256 over every file's relative path and bytes: changes if anything in the output changed."""
    h = hashlib.sha256()
    for p in sorted(q for q in out.rglob("*") if q.is_file()):
        h.update(p.relative_to(out).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _made_by_export(out: Path) -> bool:
    return json.loads((out / "sparsepack_onnx.json").read_text()).get("merged_adapter", "x") is None


STAGES = {
    "compress": Stage("compress", _compress_argv, _previous_pack),
    "merge": Stage("merge", _merge_argv, _previous_pack),
    "export": Stage("export", _export_argv, _previous_export, check=_check_export, made_by_stage=_made_by_export),
}


@dataclass(frozen=True)
class Scenario:
    id: str
    stage: str
    previous: bool  # a valid output exists at the path before the run (then --overwrite is passed)
    kills: tuple[Kill, ...]  # one child per entry, all started together
    must_die: bool = True  # every child must have been killed (the fault point was reached)


def _fault(target: str, when: str = "before", nth: int = 1, **kw) -> dict:
    return {"target": target, "when": when, "nth": nth, **kw}


SHARDS_SAVE = "sparsepack.formats.shards:_write_shard"
FSYNC_TREE = "sparsepack.formats.staging:fsync_tree"
EXCHANGE = "sparsepack.formats.staging:_rename_exchange"

SCENARIOS = [
    Scenario("two-writers-no-overwrite", "compress", False, (Kill(), Kill()), must_die=False),  # first: a real race
    Scenario("timer-0s-over-previous", "compress", True, (Kill(after_s=0.0),), must_die=False),
    Scenario("complete-but-not-renamed-no-previous", "compress", False,
             (Kill(faults=(_fault(FSYNC_TREE, "after"),)),)),  # fmt: skip
    Scenario("just-after-exchange", "compress", True, (Kill(faults=(_fault(EXCHANGE, "after"),)),)),
    # Without renameat2 the replacement takes two renames; dying between them is recovered by the next write.
    Scenario("between-the-two-renames", "compress", True,
             (Kill(faults=(_fault(EXCHANGE, returns=False), _fault("os:rename", "after", arg0="{out}"))),)),
]
SLOW_SCENARIOS = [
    Scenario(f"timer-{t}s-{'over-previous' if prev else 'no-previous'}", "compress", prev, (Kill(after_s=t),),
             must_die=False)  # fmt: skip
    for t in (0.05, 0.15, 0.5, 1.0, 1.5, 2.5, round(random.Random(8).uniform(0, 2), 2))
    for prev in (True, False)
] + [
    Scenario("timer-0.3s-no-previous", "compress", False, (Kill(after_s=0.3),), must_die=False),
    Scenario("in-tensor-write-over-previous", "compress", True, (Kill(faults=(_fault(SHARDS_SAVE),)),)),
    Scenario("complete-but-not-renamed-over-previous", "compress", True,
             (Kill(faults=(_fault(FSYNC_TREE, "after"),)),)),  # fmt: skip
    Scenario("fsync-3rd-file", "compress", True, (Kill(faults=(_fault("os:fsync", nth=3),)),)),
    Scenario("after-tensors-written-no-previous", "compress", False, (Kill(faults=(_fault(SHARDS_SAVE, "after"),)),)),
    Scenario("two-writers-overwrite", "compress", True, (Kill(), Kill()), must_die=False),
    Scenario("three-writers-no-overwrite", "compress", False, (Kill(), Kill(), Kill()), must_die=False),
]
# SPARSEPACK_KILL_SWEEP=N: N more kills at seeded random instants of the write, half of them over a previous output.
_sweep_rng = random.Random(int(os.environ.get("SPARSEPACK_KILL_SWEEP_SEED", "0")))
SWEEP = [
    Scenario(f"random-{i}-{'over-previous' if i % 2 else 'no-previous'}", "compress", bool(i % 2),
             (Kill(after_s=round(_sweep_rng.uniform(0.0, 1.5), 3)),), must_die=False)  # fmt: skip
    for i in range(int(os.environ.get("SPARSEPACK_KILL_SWEEP", "0")))
]


@dataclass
class Outcome:
    scenario: Scenario
    out: Path
    previous_manifest: str | None
    runs: list[Ran]


def _resolve(kill: Kill, out: Path) -> Kill:
    faults = tuple({k: (str(out) if v == "{out}" else v) for k, v in f.items()} for f in kill.faults)
    return Kill(kill.after_s, faults, kill.from_start)


def run_scenarios(scenarios: list[Scenario], inputs: Path, root: Path, workers: int = 4) -> dict[str, Outcome]:
    """Prepare every scenario's directory, then run all children at once (they mostly wait on imports)."""
    jobs, outcomes = [], {}
    for sc in scenarios:
        stage = STAGES[sc.stage]
        out = root / sc.id / "out"
        out.parent.mkdir(parents=True)
        prev = None
        if sc.previous:
            stage.previous(inputs, out)
            prev = (out / MANIFEST_FILE).read_text()
        argv = stage.argv(inputs, out) + (["--overwrite"] if sc.previous else [])
        outcomes[sc.id] = Outcome(sc, out, prev, [])
        jobs += [(sc.id, argv, out, _resolve(k, out)) for k in sc.kills]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [(sid, pool.submit(run_and_kill, argv, out, kill)) for sid, argv, out, kill in jobs]
        for sid, fut in futures:
            outcomes[sid].runs.append(fut.result())
    return outcomes


def assert_nothing_lost(o: Outcome) -> None:
    """The output path holds the previous output or a complete new one; leftovers are stale siblings only."""
    sc, out = o.scenario, o.out
    for r in o.runs:
        assert r.rc in (0, 1, -signal.SIGKILL), f"{sc.id}: child crashed on its own (rc {r.rc}):\n{r.stderr}"
        if sc.must_die:
            assert r.rc == -signal.SIGKILL, f"{sc.id}: the fault point was never reached:\n{r.stderr}"
    if not out.exists() and o.previous_manifest is not None:
        # only the two-rename fallback has this window; the path says where the previous output is
        with pytest.raises(errors.MissingFileError, match="previous version is in"):
            read_pack(out)
    clean_stale_siblings(out)  # what the next write does first (the children are all dead now)
    assert sorted(p.name for p in out.parent.iterdir()) in ([], ["out"]), f"{sc.id}: leftovers after cleanup"
    if o.previous_manifest is not None:
        assert out.is_dir(), f"{sc.id}: the previous output was lost"
    if out.exists():
        STAGES[sc.stage].check(out)
        manifest = (out / MANIFEST_FILE).read_text()
        if manifest != o.previous_manifest:  # replaced: then by a complete run of this stage
            assert Manifest.read(out / MANIFEST_FILE).history[-1].stage == sc.stage
    else:
        assert all(r.rc != 0 for r in o.runs), f"{sc.id}: a child succeeded but left no output"


# ------------------------------------------------------------------------------------------------ kill -9


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("crash-inputs")
    save_hf(tiny_llama(), d / "hf")
    lines = [f"def function_{i}(x): return x * {i} + sum(range({i % 7})) # the quick brown fox" for i in range(400)]
    (d / "corpus.txt").write_text("\n".join(lines))
    return d


@pytest.fixture(scope="module")
def killed(inputs, tmp_path_factory) -> dict[str, Outcome]:
    return run_scenarios(SCENARIOS, inputs, tmp_path_factory.mktemp("crash-runs"))


@pytest.mark.parametrize("sid", [sc.id for sc in SCENARIOS])
def test_kill_9_loses_nothing(killed, sid):
    o = killed[sid]
    assert all(r.saw_staging or r.rc != -signal.SIGKILL for r in o.runs) or sid.startswith("two-writers")
    assert_nothing_lost(o)


def test_timer_kill_hits_the_write(killed):
    # the timed kill is meant to land while the staging directory exists, not before or after the run
    run = killed["timer-0s-over-previous"].runs[0]
    assert run.saw_staging and run.rc == -signal.SIGKILL


def test_two_writers_one_wins_the_other_fails_clearly(killed):
    o = killed["two-writers-no-overwrite"]
    assert sorted(r.rc for r in o.runs) == [0, 1], [r.stderr[-500:] for r in o.runs]
    loser = next(r for r in o.runs if r.rc == 1)
    assert "OutputExistsError" in loser.stderr and "out: output" in loser.stderr
    assert "Traceback" not in loser.stderr
    read_pack(o.out, verify=True)
    assert sorted(p.name for p in o.out.parent.iterdir()) == ["out"]  # the loser cleaned up after itself


@pytest.mark.slow
@pytest.mark.parametrize("sid", [sc.id for sc in SLOW_SCENARIOS])
def test_kill_9_sweep_loses_nothing(inputs, tmp_path, sid):
    sc = next(s for s in SLOW_SCENARIOS if s.id == sid)
    o = run_scenarios([sc], inputs, tmp_path)[sid]
    assert_nothing_lost(o)
    if sid.endswith("writers-no-overwrite"):
        assert sorted(r.rc for r in o.runs).count(0) == 1


@pytest.mark.slow
@pytest.mark.skipif(not SWEEP, reason="set SPARSEPACK_KILL_SWEEP=N to run N random kills")
def test_kill_9_random_sweep_loses_nothing(inputs, tmp_path):
    outcomes = run_scenarios(SWEEP, inputs, tmp_path)
    for o in outcomes.values():
        assert_nothing_lost(o)
    killed = sum(r.rc == -signal.SIGKILL for o in outcomes.values() for r in o.runs)
    print(f"random sweep: {len(SWEEP)} runs, {killed} killed mid-write, 0 outputs lost")


# Export and merge: the same staged writer as compress, so the slow set covers them with fewer points; each killed
# run is followed by a real rerun of the stage (not a simulated cleanup), which must leave nothing temporary.
STAGE_SCENARIOS = [
    Scenario(f"{st}-{what}", st, prev, kills, must_die=die)
    for st in ("merge", "export")
    for what, prev, kills, die in [
        ("timer-0s-over-previous", True, (Kill(after_s=0.0),), False),
        ("timer-1s-over-previous", True, (Kill(after_s=1.0),), False),
        ("complete-but-not-renamed-over-previous", True, (Kill(faults=(_fault(FSYNC_TREE, "after"),)),), True),
        ("complete-but-not-renamed-no-previous", False, (Kill(faults=(_fault(FSYNC_TREE, "after"),)),), True),
        ("just-after-exchange", True, (Kill(faults=(_fault(EXCHANGE, "after"),)),), True),
        ("two-writers-no-overwrite", False, (Kill(), Kill()), False),
    ]
] + [
    Scenario("merge-in-tensor-write", "merge", True,
             (Kill(faults=(_fault("sparsepack.pipeline.merge:save_file"),)),)),  # fmt: skip
    Scenario("export-in-adapter-write", "export", True,
             (Kill(faults=(_fault("sparsepack.exporters.onnx:write_adapter"),)),)),  # fmt: skip
    Scenario("export-in-graph-save", "export", True, (Kill(faults=(_fault("sparsepack.exporters.onnx:save_model"),)),)),
]


@pytest.fixture(scope="module")
def stage_inputs(inputs) -> Path:
    if not (inputs / "packad").exists():
        model = tiny_llama()
        rtn_pack(model, inputs / "packad", adapters={"ad1": random_adapter(model)})
    return inputs


@pytest.mark.slow
def test_kill_9_export_and_merge_lose_nothing_and_the_next_run_cleans_up(stage_inputs, tmp_path):
    digests = {}
    for sc in STAGE_SCENARIOS:  # previous outputs first, to compare byte for byte afterwards
        out = tmp_path / sc.id / "out"
        out.parent.mkdir(parents=True)
        if sc.previous:
            STAGES[sc.stage].previous(stage_inputs, out)
            digests[sc.id] = tree_digest(out)
    jobs = []
    for sc in STAGE_SCENARIOS:
        out = tmp_path / sc.id / "out"
        argv = STAGES[sc.stage].argv(stage_inputs, out) + (["--overwrite"] if sc.previous else [])
        jobs += [(sc, out, argv, _resolve(k, out)) for k in sc.kills]
    with ThreadPoolExecutor(max_workers=4) as pool:
        ran = list(pool.map(lambda j: (j[0], j[1], run_and_kill(j[2], j[1], j[3], timeout=300)), jobs))
    killed = 0
    for sc, out, r in ran:
        assert r.rc in (0, 1, -signal.SIGKILL), f"{sc.id}: rc {r.rc}\n{r.stderr[-1500:]}"
        assert r.rc == -signal.SIGKILL or not sc.must_die, f"{sc.id}: fault never reached\n{r.stderr[-1500:]}"
        killed += r.rc == -signal.SIGKILL
        if sc.id in digests:  # the previous output, untouched, or a complete new one
            assert out.is_dir(), f"{sc.id}: previous output lost"
            if tree_digest(out) != digests[sc.id]:
                STAGES[sc.stage].check(out)
                made = STAGES[sc.stage].made_by_stage
                assert made(out) if made else Manifest.read(out / MANIFEST_FILE).history[-1].stage == sc.stage
            else:
                STAGES[sc.stage].check(out)
        if sc.id.endswith("two-writers-no-overwrite") and r.rc == 1:
            assert "OutputExistsError" in r.stderr and "Traceback" not in r.stderr
    reruns = [(sc, tmp_path / sc.id / "out") for sc in STAGE_SCENARIOS]
    with ThreadPoolExecutor(max_workers=4) as pool:
        again = list(pool.map(lambda j: run_and_kill(STAGES[j[0].stage].argv(stage_inputs, j[1]) + ["--overwrite"],
                                                     j[1], Kill(), timeout=300), reruns))  # fmt: skip
    for (sc, out), r in zip(reruns, again, strict=True):
        assert r.rc == 0, f"{sc.id}: rerun failed\n{r.stderr[-1500:]}"
        assert sorted(p.name for p in out.parent.iterdir()) == ["out"], f"{sc.id}: leftovers after the next run"
        STAGES[sc.stage].check(out)
    print(f"export/merge: {len(jobs)} processes, {killed} killed mid-write, 0 outputs lost, "
          f"{len(reruns)} reruns, 0 leftovers")


# ------------------------------------------------------------------------------------------------ stale siblings


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _sibling(out: Path, tag: str, pid: int, host: str | None = None, suffix: str = "abcd1234") -> Path:
    d = out.parent / f".{out.name}.{tag}-{pid}@{host or pack_mod.host()}-{suffix}"
    d.mkdir()
    (d / "partial.safetensors").write_bytes(b"\0" * 10)
    return d


def test_next_write_removes_stale_staging_dirs_of_dead_writers_only(tmp_path):
    out = tmp_path / "pack"
    dead = _sibling(out, "tmp", _dead_pid(), suffix="dead0001")
    dead_old = _sibling(out, "old", _dead_pid(), suffix="dead0002")
    alive = _sibling(out, "tmp", os.getppid(), suffix="live0001")  # a running process: maybe writing right now
    elsewhere = _sibling(out, "tmp", _dead_pid(), host="other-host", suffix="host0001")  # its pids mean nothing here
    other_name = _sibling(tmp_path / "other", "tmp", _dead_pid(), suffix="name0001")
    legacy = tmp_path / ".pack.tmp-k3j4h5g6"  # no pid: not ours to judge
    legacy.mkdir()
    write_pack(out, Manifest(), lambda d: (d / "a.txt").write_text("new"))
    left = {p.name for p in tmp_path.iterdir()}
    assert dead.name not in left and dead_old.name not in left
    assert {alive.name, elsewhere.name, other_name.name, legacy.name, "pack"} == left
    assert (out / "a.txt").read_text() == "new"


def test_death_between_the_two_renames_is_repaired(tmp_path):
    # The state a writer leaves when killed between `rename(out, old/x)` and `rename(tmp, out)`.
    out = tmp_path / "pack"
    write_pack(out, Manifest(history=[]), lambda d: (d / "a.txt").write_text("previous"))
    pid = _dead_pid()
    old = _sibling(out, "old", pid, suffix="oldd0001")
    os.rename(out, old / "x")
    _sibling(out, "tmp", pid, suffix="tmpp0001")
    with pytest.raises(errors.MissingFileError, match=r"previous version is in \.pack\.old-.*/x"):
        read_pack(out)
    with pytest.raises(errors.OutputExistsError):  # the repair runs first, so the path is not free
        write_pack(out, Manifest(), lambda d: (d / "a.txt").write_text("new"))
    assert (out / "a.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


def test_replacing_never_leaves_the_path_empty(tmp_path, monkeypatch):
    # The atomic exchange: at no point between start and end of the replacement is `out` missing.
    out = tmp_path / "pack"
    write_pack(out, Manifest(), lambda d: (d / "a.txt").write_text("1"))
    seen = []
    real = pack_mod._rename_exchange

    def watched(a, b):
        seen.append(out.exists())
        ok = real(a, b)
        seen.append(out.exists())
        return ok

    monkeypatch.setattr(pack_mod, "_rename_exchange", watched)
    write_pack(out, Manifest(), lambda d: (d / "a.txt").write_text("2"), overwrite=True)
    assert (out / "a.txt").read_text() == "2" and seen == [True, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


def test_written_pack_is_as_readable_as_any_new_directory(tmp_path):
    write_pack(tmp_path / "pack", Manifest(), lambda d: (d / "a.txt").write_text("1"))
    umask = pack_mod.umask()
    assert (tmp_path / "pack").stat().st_mode & 0o777 == 0o777 & ~umask  # mkdtemp alone gives 0700


# ------------------------------------------------------------------------------------------------ disk full


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model-00001.safetensors.part")


@pytest.fixture
def small_cfg(inputs) -> QuantConfig:
    return QuantConfig(bits=4, group_size=32, calib=str(inputs / "corpus.txt"), nsamples=4, seqlen=32, method="rtn")


@pytest.mark.parametrize("previous", [False, True])
def test_disk_full_while_writing_tensors(inputs, tmp_path, monkeypatch, small_cfg, previous):
    out = tmp_path / "p"
    if previous:
        _previous_pack(inputs, out)
        before = (out / MANIFEST_FILE).read_text()
    monkeypatch.setattr("sparsepack.formats.shards._write_shard", _enospc)
    pattern = r"p: writing failed \(ENOSPC: No space left on device: model-00001.safetensors.part\); the output path"
    with pytest.raises(errors.WriteError, match=pattern):
        compress(inputs / "hf", out, small_cfg, overwrite=previous, progress=False)
    if previous:
        assert (out / MANIFEST_FILE).read_text() == before
        read_pack(out, verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["p"] if previous else [])


def test_disk_full_as_safetensors_reports_it(tmp_path, monkeypatch):
    # A real ENOSPC inside safetensors.save_file surfaces as SafetensorError("... os error 28"), not OSError.
    from safetensors import SafetensorError

    def full(*_a, **_k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("tests.factories.save_file", full)
    with pytest.raises(errors.WriteError, match="No space left on device"):
        rtn_pack(tiny_llama(), tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing_the_manifest(tmp_path, monkeypatch):
    out = tmp_path / "p"
    write_pack(out, Manifest(), lambda d: (d / "a.txt").write_text("old"))
    real = Path.write_text

    def write_text(self, *a, **k):
        if self.name == MANIFEST_FILE:
            real(self, "{\"form", encoding="utf-8")  # a torn write, then the error
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(errors.WriteError, match="ENOSPC"):
        write_pack(out, Manifest(), lambda d: (d / "a.txt").write_text("new"), overwrite=True)
    monkeypatch.undo()
    assert (out / "a.txt").read_text() == "old"
    assert Manifest.read(out / MANIFEST_FILE).format == "sparsepack"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_cli_reports_a_full_disk_in_one_line(inputs, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sparsepack.cli import main

    monkeypatch.setattr("sparsepack.formats.shards._write_shard", _enospc)
    r = CliRunner().invoke(main, [*_compress_argv(inputs, tmp_path / "p"), "--method", "rtn"])
    assert r.exit_code == 1, r.output
    assert "WriteError" in r.output and "ENOSPC" in r.output and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_other_errors_inside_a_write_keep_their_type(tmp_path):
    with pytest.raises(KeyError):
        with staged_dir(tmp_path / "p"):
            raise KeyError("not an I/O problem")
    with pytest.raises(RuntimeError):
        with staged_dir(tmp_path / "p"):
            torch.zeros(2) @ torch.zeros(3)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_real_full_filesystem(inputs, tmp_path, small_cfg):
    """A real ENOSPC from a 48 KiB tmpfs, smaller than the 94 KB of tensors (needs root; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        with pytest.raises(errors.WriteError, match="No space left on device"):
            compress(inputs / "hf", mnt / "p", small_cfg, progress=False)
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
