"""vaegan.run_folder: a run owns its output folder. A fresh run never replaces an earlier one, two runs never
share a folder (real processes), and nothing is written or deleted through a link inside it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

import vaegan
from vaegan.errors import OutputError
from vaegan.run_folder import LOCK_NAME, RunFolder, read_lock

from conftest import MNIST_ROOT, TINY
from processes import ENV, ROOT, finish, recipe, start

HOLD = """
import sys, time
from vaegan.run_folder import RunFolder
RunFolder(sys.argv[1], resume=None, overwrite=False).claim(command="the holder")
print("held", flush=True)
time.sleep(600)
"""


def _hashes(folder: Path) -> Dict[str, str]:
    """Every regular file under ``folder`` (links not followed) -> its sha256."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def holder(tmp_path):
    """A real other process holding a folder's lock: ``holder(folder)`` -> the Popen (killed at the end)."""
    procs = []

    def hold(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_fresh_run_into_a_finished_run_is_refused_and_nothing_changes(tiny):
    cfg = tiny("train.max_steps=2", "train.checkpoint_every=2")
    vaegan.build_trainer(cfg).fit()
    run = Path(cfg.train.output_dir)
    before = _hashes(run)
    with pytest.raises(OutputError) as err:
        vaegan.build_trainer(tiny("train.max_steps=4"))
    msg = str(err.value)
    assert "already holds a vaegan run" in msg and "1 checkpoint (newest step_00000002)" in msg and "final/" in msg
    assert "--resume auto" in msg and "--overwrite" in msg and "\n" not in msg
    assert _hashes(run) == before and not (run / LOCK_NAME).exists()  # refused before anything was written


def test_overwrite_moves_the_earlier_run_aside_and_deletes_nothing(tiny):
    cfg = tiny("train.max_steps=2", "train.checkpoint_every=2")
    vaegan.build_trainer(cfg).fit()
    run = Path(cfg.train.output_dir)
    (run / "notes.txt").write_text("the user's own file")
    earlier = _hashes(run)
    vaegan.build_trainer(tiny("train.max_steps=3", "train.checkpoint_every=3", "train.overwrite=true")).fit()
    (moved,) = list((run / "previous").iterdir())
    assert {k: v for k, v in earlier.items() if k != "notes.txt"} == _hashes(moved)  # the earlier run, bit for bit
    assert (run / "notes.txt").read_text() == "the user's own file"  # not vaegan's: left where it was
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000003"]  # only the new run's to resume
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and max(steps) == 3


def test_resume_auto_continues_a_run_in_its_own_folder(tiny):
    vaegan.build_trainer(tiny("train.max_steps=2", "train.checkpoint_every=2")).fit()
    trainer = vaegan.build_trainer(tiny("train.max_steps=4", "train.resume=auto"))
    trainer.fit()
    assert trainer.state.step == 4


def test_a_folder_held_by_a_live_run_is_refused_naming_it_then_taken_over_once_it_died(tiny, holder, caplog):
    cfg = tiny("train.max_steps=2")
    run = Path(cfg.train.output_dir)
    proc = holder(run)
    for resume in (None, "auto"):  # also --resume: another run is writing there
        with pytest.raises(OutputError) as err:
            vaegan.build_trainer(tiny("train.max_steps=2", *([f"train.resume={resume}"] if resume else [])))
        msg = str(err.value)
        assert f"in use by another vaegan run (process {proc.pid} on host" in msg and "the holder" in msg
        assert f"rm '{run / LOCK_NAME}'" in msg
    assert read_lock(run / LOCK_NAME)["pid"] == proc.pid  # the holder's lock is untouched
    proc.send_signal(signal.SIGKILL)  # dies without cleaning up: its lock stays behind
    proc.wait()
    vaegan.build_trainer(cfg).fit()
    assert f"Taking over the lock of {run}: process {proc.pid}" in caplog.text and "not running any more" in caplog.text
    assert not (run / LOCK_NAME).exists()  # released when the run ended


def test_a_lock_of_an_earlier_incarnation_of_the_same_slurm_job_is_stale(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-node", "started": 0, "slurm_job_id": "77"}))
    folder = RunFolder(run, resume="auto", overwrite=False)
    with pytest.raises(OutputError, match="process 1 on host another-node, SLURM job 77"):
        folder.claim()  # another host, another job: cannot be checked, refused
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued onto another node
    folder.claim()
    assert read_lock(run / LOCK_NAME)["pid"] == os.getpid()
    folder.release()
    assert not (run / LOCK_NAME).exists()


@pytest.mark.slow  # two recipe processes
def test_two_runs_started_together_into_one_folder_one_trains_the_other_is_refused(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--data-dir", str(MNIST_ROOT), "data.download=false", "train.epochs=3"]
    procs = [start(recipe(out, *args)) for _ in range(2)]
    results = [finish(p) for p in procs]
    assert sorted(r["rc"] == 0 for r in results) == [False, True], [r["stderr"][-2000:] for r in results]
    loser = next(r for r in results if r["rc"] != 0)["stderr"]
    assert "in use by another vaegan run" in loser or "already holds a vaegan run" in loser, loser[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one run's log, not two interleaved
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("name", ["checkpoints", "final", "samples"])
def test_a_link_among_the_folders_a_run_writes_is_refused(tiny, tmp_path, name):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the run's")
    cfg = tiny("train.max_steps=2")
    run = Path(cfg.train.output_dir)
    run.mkdir(parents=True)
    (run / name).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutputError, match=f"'{run / name}' is a symbolic link .* Remove the link"):
        vaegan.build_trainer(cfg)
    assert _hashes(elsewhere) == {"keep.txt": hashlib.sha256(b"not the run's").hexdigest()}


def test_checkpoint_rotation_and_cleanup_never_reach_through_a_link(tiny, tmp_path):
    """A link planted inside checkpoints/ (to a folder with a marker, and to one without) is neither resumed,
    rotated nor cleaned up; what it points to is unchanged."""
    cfg = tiny("train.max_steps=4", "train.checkpoint_every=1", "train.checkpoints_total_limit=1")
    vaegan.build_trainer(tiny("train.max_steps=1", "train.checkpoint_every=1")).fit()
    ckpts = Path(cfg.train.output_dir) / "checkpoints"
    outside = tmp_path / "outside"
    with_marker = outside / "complete"
    with_marker.mkdir(parents=True)
    (with_marker / "vaegan_checkpoint.json").write_text(json.dumps({"step": 99}))
    (outside / "half").mkdir()
    (outside / "half" / "data.bin").write_bytes(b"precious")
    (ckpts / "step_00000099").symlink_to(with_marker, target_is_directory=True)  # would be "latest" and rotated
    (ckpts / "step_00000098").symlink_to(outside / "half", target_is_directory=True)  # looks like a killed rotation
    before = _hashes(outside)
    trainer = vaegan.build_trainer(tiny("train.max_steps=4", "train.checkpoint_every=1",
                                        "train.checkpoints_total_limit=1", "train.resume=auto"))
    trainer.fit()
    assert trainer.state.step == 4 and _hashes(outside) == before
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000004", "step_00000098", "step_00000099"]


def test_overwrite_flag_sets_the_config_key():
    import argparse

    from vaegan.cli import add_train_flags, config_from_flags

    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    args = parser.parse_args(["--config", str(ROOT / "recipes/configs/vaegan_mnist.yaml"), "--overwrite"])
    assert config_from_flags(args).train.overwrite is True


@pytest.mark.slow
def test_the_refusal_reaches_every_process_of_a_two_process_run(tmp_path, holder):
    """Under real DDP (2 processes, gloo) the main process's refusal is every rank's: both exit, none hangs."""
    out = tmp_path / "run"
    proc = holder(out)
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *recipe(out, *TINY, "--data-dir", str(MNIST_ROOT), "data.download=false")[1:]]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert done.stderr.count(f"in use by another vaegan run (process {proc.pid}") >= 2, done.stderr[-3000:]
