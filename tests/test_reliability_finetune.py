"""finetune crash safety (issue 8): kill -9 mid-training and mid-checkpoint-save, then ``--resume``; two writers.

Guarantees under test, each in child processes running the real CLI on a tiny Llama pack:

- a killed run never touches the previous output at OUT (it is intact and reads with ``verify=True``);
- ``--resume`` continues from the newest complete checkpoint and ends with the same adapter tensors, bit for
  bit, as an uninterrupted run with the same seed (dropout on, so the RNG state must be restored too);
- a checkpoint save killed half-way leaves only a ``.step-N.tmp-*`` sibling, and after the next run completes
  nothing temporary is left: no ``OUT.ckpt``, no ``.OUT.tmp-*``;
- two runs writing the same OUT at once: one wins, the other fails at once with one clear line (the checkpoint
  directory is locked), and the winner's output is valid.

The kill harness is ``run_and_kill`` of ``tests/test_reliability_crash.py``; faults fire inside the child at the
n-th call of a function (``module:Class.method`` works too). The sweep over every kill point is slow-marked;
``SPARSEPACK_FT_SWEEP=N`` adds N kills at random instants.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sparsepack.formats import staging as pack_mod
from sparsepack.formats.manifest import MANIFEST_FILE, Manifest
from sparsepack.formats.pack import read_pack
from sparsepack.pipeline import checkpoint as ckpt
from tests.factories import rtn_pack, tiny_llama
from tests.test_reliability_crash import Kill, Ran, _fault, run_and_kill

SAVE = "sparsepack.pipeline.checkpoint:save_file"  # inside a checkpoint save, in its staging directory
STEP = "sparsepack.pipeline.trainer:Trainer._train_step"
FSYNC_TREE = "sparsepack.formats.staging:fsync_tree"  # a staged directory complete, not yet renamed
POINTER = "sparsepack.pipeline.checkpoint:_point_latest"  # just after `latest` was replaced


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ft-crash")
    rtn_pack(tiny_llama(), d / "pack")
    lines = [f"def function_{i}(x): return x * {i} + sum(range({i % 7})) # the quick brown fox" for i in range(120)]
    (d / "c.txt").write_text("\n".join(lines))
    return d


def ft_argv(env: Path, out: Path, *extra: str) -> list[str]:
    """6 optimizer steps (2 warm-up, support selection, 4 joint), a checkpoint every 2: saves at 2, 4, 6."""
    return ["finetune", str(env / "pack"), "--data", str(env / "c.txt"), "-o", str(out), "--adapter", "a1",
            "--rank", "2", "--density", "0.02", "--steps", "4", "--warmup-steps", "2", "--batch-size", "2",
            "--grad-accum", "1", "--seqlen", "32", "--mask-samples", "2", "--save-every", "2", "--dropout", "0.1",
            "--json", *extra]  # fmt: skip


def adapter(out: Path) -> dict[str, torch.Tensor]:
    d = out / "adapters" / "a1"
    return {**load_file(str(d / "adapter_model.safetensors")), **load_file(str(d / "sparse_adapter.safetensors"))}


def previous(out: Path) -> str:
    """A valid pack at ``out`` standing for an earlier output; returns its manifest text."""
    rtn_pack(tiny_llama(seed=3), out)
    return (out / MANIFEST_FILE).read_text()


def run_all(jobs: list[tuple[list[str], Path, Kill]], workers: int = 3) -> list[Ran]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda j: run_and_kill(*j, timeout=300), jobs))


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name != out.name)


def assert_same_adapter(got: Path, want: dict[str, torch.Tensor]) -> None:
    a = adapter(got)
    assert a.keys() == want.keys()
    for k in want:
        assert torch.equal(a[k], want[k]), f"{k} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def first_round(env, tmp_path_factory):
    """In parallel: the uninterrupted reference run and a run killed inside a checkpoint save."""
    root = tmp_path_factory.mktemp("ft-runs")
    ref, killed = root / "ref" / "out", root / "killed" / "out"
    ref.parent.mkdir()
    killed.parent.mkdir()
    before = previous(killed)
    kill = Kill(faults=(_fault(SAVE, "after", nth=2),))  # the save of step 4: tensors written, state.json not
    runs = run_all([(ft_argv(env, ref), ref, Kill()), (ft_argv(env, killed, "--overwrite"), killed, kill)])
    assert runs[0].rc == 0, runs[0].stderr[-2000:]
    return ref, killed, before, runs


def test_clean_exit_leaves_no_temporary_directory(first_round):
    ref = first_round[0]
    read_pack(ref, verify=True)
    assert Manifest.read(ref / MANIFEST_FILE).history[-1].stage == "finetune"
    assert leftovers(ref) == []  # no OUT.ckpt, no .OUT.tmp-*


@pytest.mark.slow
def test_two_writers_one_wins_the_other_fails_clearly(env, tmp_path):
    ref = tmp_path / "out"
    runs = run_all([(ft_argv(env, ref), ref, Kill()), (ft_argv(env, ref), ref, Kill())])
    a, b = runs
    assert sorted([a.rc, b.rc]) == [0, 1], [a.stderr[-800:], b.stderr[-800:]]
    loser = a if a.rc else b
    assert "Traceback" not in loser.stderr
    assert "OutputBusyError" in loser.stderr or "OutputExistsError" in loser.stderr, loser.stderr[-800:]
    read_pack(ref, verify=True)
    assert Manifest.read(ref / MANIFEST_FILE).history[-1].stage == "finetune"
    assert leftovers(ref) == []  # clean exit: no checkpoint dir, no staging dir (the loser removed nothing of ours)


def test_kill_during_a_checkpoint_save_keeps_the_previous_output_and_checkpoint(first_round):
    _, killed, before, runs = first_round
    assert runs[1].rc == -signal.SIGKILL, runs[1].stderr[-800:]
    assert (killed / MANIFEST_FILE).read_text() == before
    read_pack(killed, verify=True)
    ckpt_dir = killed.parent / "out.ckpt"
    assert (ckpt_dir / "latest").read_text() == "step-0000002"  # the save of step 4 never completed
    assert [p.name for p in ckpt_dir.iterdir() if ".tmp-" in p.name][0].startswith(".step-0000004.tmp-")


def test_resume_after_the_kill_matches_the_uninterrupted_run_and_leaves_nothing(first_round, env):
    ref, killed, _, _ = first_round
    (r,) = run_all([(ft_argv(env, killed, "--resume", "--overwrite"), killed, Kill())])
    assert r.rc == 0, r.stderr[-2000:]
    assert_same_adapter(killed, adapter(ref))
    read_pack(killed, verify=True)
    assert leftovers(killed) == []


def test_next_save_removes_dead_savers_staging_of_any_step(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = pack_mod.host()
    stale = directory / f".step-0000100.tmp-{dead.pid}@{host}-abcd1234"
    live = directory / f".step-0000100.tmp-{os.getppid()}@{host}-live1234"  # a running process: left alone
    for d in (stale, live):
        d.mkdir()
        (d / "state.safetensors").write_bytes(b"\0" * 8)
    (directory / f"latest.tmp-{dead.pid}").write_text("step-0000100")
    ckpt.save_checkpoint(directory, 2, {"rng.torch": torch.get_rng_state()}, {"phase": 0})
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted([live.name, "latest", "step-0000002"])


def test_a_second_run_on_a_locked_checkpoint_dir_fails_at_once(tmp_path):
    from sparsepack.formats.errors import OutputBusyError

    code = ("import sys, time; from sparsepack.pipeline import checkpoint as c\n"
            "with c.exclusive(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "o.ckpt")], stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        with pytest.raises(OutputBusyError, match=rf"o.ckpt: another run \(pid {holder.pid}\) is writing"):
            with ckpt.exclusive(tmp_path / "o.ckpt"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with ckpt.exclusive(tmp_path / "o.ckpt"):  # the kernel dropped the dead holder's lock
        pass


# ------------------------------------------------------------------------------------------------ slow sweep


@dataclass(frozen=True)
class FtKill:
    id: str
    kill: Kill
    previous: bool


SWEEP_KILLS = [
    FtKill("step-1-before", Kill(faults=(_fault(STEP, "before", nth=1),)), True),
    FtKill("step-2-after-warmup", Kill(faults=(_fault(STEP, "after", nth=2),)), False),
    FtKill("step-4-mid-train", Kill(faults=(_fault(STEP, "before", nth=4),)), True),
    FtKill("step-6-last", Kill(faults=(_fault(STEP, "after", nth=6),)), False),
    FtKill("save-1-in-tensors", Kill(faults=(_fault(SAVE, "before", nth=1),)), True),
    FtKill("save-2-after-tensors", Kill(faults=(_fault(SAVE, "after", nth=2),)), False),
    FtKill("save-3-end-boundary", Kill(faults=(_fault(SAVE, "after", nth=3),)), True),
    FtKill("save-2-complete-not-renamed", Kill(faults=(_fault(FSYNC_TREE, "after", nth=2),)), True),
    FtKill("pointer-2-just-replaced", Kill(faults=(_fault(POINTER, "after", nth=2),)), False),
    FtKill("pointer-3-just-replaced", Kill(faults=(_fault(POINTER, "after", nth=3),)), True),
    FtKill(
        "prune-old-checkpoint", Kill(faults=(_fault("sparsepack.pipeline.checkpoint:shutil.rmtree", "before"),)), True
    ),  # fmt: skip
    FtKill("output-complete-not-renamed", Kill(faults=(_fault(FSYNC_TREE, "after", nth=4),)), True),
    FtKill(
        "output-just-exchanged",
        Kill(faults=(_fault("sparsepack.formats.staging:_rename_exchange", "after"),)),
        True,
    ),  # fmt: skip
    FtKill(
        "output-written-ckpt-not-removed",
        Kill(faults=(_fault("sparsepack.pipeline.finetune:write_adapter_pack", "after"),)),
        False,
    ),  # fmt: skip
]
_rng = random.Random(int(os.environ.get("SPARSEPACK_FT_SWEEP_SEED", "0")))
SWEEP_KILLS += [
    FtKill(f"random-{i}-{t}s", Kill(after_s=t, from_start=True), bool(i % 2))
    for i, t in enumerate(round(_rng.uniform(3.0, 12.0), 2) for _ in range(int(os.environ.get("SPARSEPACK_FT_SWEEP",
                                                                                                  "0"))))
]  # fmt: skip


@pytest.mark.slow
def test_kill_9_sweep_then_resume_loses_nothing(first_round, env, tmp_path):
    ref = adapter(first_round[0])
    outs, prev, jobs = {}, {}, []
    for k in SWEEP_KILLS:
        out = tmp_path / k.id / "out"
        out.parent.mkdir()
        prev[k.id] = previous(out) if k.previous else None
        kill = Kill(k.kill.after_s, tuple({**f, **({"arg0": str(out)} if f.get("arg0") == "{out}" else {})}
                                          for f in k.kill.faults), k.kill.from_start)  # fmt: skip
        outs[k.id] = out
        jobs.append((ft_argv(env, out, *(["--overwrite"] if k.previous else [])), out, kill))
    killed = run_all(jobs, workers=4)
    resumes = []
    for k, r in zip(SWEEP_KILLS, killed, strict=True):
        out = outs[k.id]
        assert r.rc in (0, -signal.SIGKILL), f"{k.id}: rc {r.rc}\n{r.stderr[-1500:]}"
        if k.kill.faults:
            assert r.rc == -signal.SIGKILL, f"{k.id}: the fault point was never reached\n{r.stderr[-1500:]}"
        if prev[k.id] is not None:  # the previous output, or a complete new one: never a partial or no output
            read_pack(out, verify=True)
            if (out / MANIFEST_FILE).read_text() != prev[k.id]:
                assert_same_adapter(out, ref)
        resumes.append((ft_argv(env, out, "--resume", "--overwrite"), out, Kill()))
    for k, r in zip(SWEEP_KILLS, run_all(resumes, workers=4), strict=True):
        assert r.rc == 0, f"{k.id}: resume failed\n{r.stderr[-2000:]}"
        assert_same_adapter(outs[k.id], ref)
        assert leftovers(outs[k.id]) == [], f"{k.id}: left {leftovers(outs[k.id])}"
    n_killed = sum(r.rc == -signal.SIGKILL for r in killed)
    print(f"finetune sweep: {len(SWEEP_KILLS)} runs, {n_killed} killed, {len(SWEEP_KILLS)} resumed bit for bit, "
          "0 outputs lost, 0 leftovers")  # fmt: skip


def test_disk_full_during_a_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from sparsepack.formats.errors import WriteError

    directory = tmp_path / "ckpt"
    meta = {"phase": 0}
    ckpt.save_checkpoint(directory, 2, {"rng.torch": torch.get_rng_state()}, meta)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "state.safetensors")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(WriteError, match=r"step-0000004: writing failed \(ENOSPC"):
        ckpt.save_checkpoint(directory, 4, {"rng.torch": torch.get_rng_state()}, meta)
    assert sorted(p.name for p in directory.iterdir()) == ["latest", "step-0000002"]
    assert ckpt.latest_checkpoint(directory).name == "step-0000002"
    assert load_file(str(directory / "step-0000002" / "state.safetensors")).keys() == {"rng.torch"}
