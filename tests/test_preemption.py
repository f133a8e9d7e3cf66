"""Stopped the way schedulers stop jobs (vaegan/preemption.py), provoked for real.

Process tests (module fixture ``chains``, side by side): the recipe on a folder of PNG digits with data
workers, stopped by signals to its whole process group, to every process of a 2-process run (torchrun and
``accelerate launch`` over gloo), and through the SLURM job scripts of recipes/slurm with stand-ins for
``srun`` and ``scontrol``; every chain resumes with ``--resume auto`` and must end with the weights of an
uninterrupted run. In-process tests: ``train.max_time``, ``train.checkpoint_every_minutes``, progress log
lines, data workers that leave signals to the main process, ``scontrol requeue``, the signal policy.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List

import psutil
import pytest
import torch
from conftest import TINY, tiny_config, write_digit_pngs
from processes import (
    ENV,
    ROOT,
    assert_same_weights,
    complete,
    descendants,
    finish,
    once_training,
    recipe,
    side_by_side,
    signal_all,
    start,
    stopped_steps,
    wait_for,
)
from torch.utils.data import DataLoader

import vaegan
from vaegan.checkpointing import list_checkpoints, resolve_resume
from vaegan.errors import CheckpointError, TrainingStopped
from vaegan.preemption import GracefulStop
from vaegan.preemption import WorkerSignals, requeue_slurm_job, slurm_job_id

SLURM = ROOT / "recipes" / "slurm"


# ---- the data: 64 real digits as PNG files, read by 2 data workers ----------------------------------------

@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    return write_digit_pngs(tmp_path_factory.mktemp("digits"))


def _args(folder: Path, epochs: int, workers: int) -> List[str]:
    # One thread per process under every launcher: the kernels' float sums depend on the thread count, and the
    # "2 nodes" of multi_node.sbatch share this machine (vaegan would give each of them both cores).
    return [*TINY, "--data-dir", str(folder), "data.name=image_folder", f"data.num_workers={workers}",
            f"train.epochs={epochs}", "train.progress_seconds=0", "train.cpu_threads=1"]


ONE = 10  # epochs of the single-process chain: 4 steps each
ONE_TOTAL = 40
TWO = 40  # epochs of the 2-process chain: 2 steps each (a global batch of 32)
TWO_TOTAL = 80


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc, out: Path, send, ready=None) -> Dict[str, object]:
    """Once training is under way (and ``ready()`` holds), ``send()`` the signal(s); then the exit status,
    stderr and checkpoints."""
    started = once_training(proc, out) and (ready is None or wait_for(proc, ready))
    try:
        sent = send() if proc.poll() is None else 0
    except ProcessLookupError:  # it ended meanwhile: reported by the test through "sent"
        sent = 0
    return {"started": started, "sent": sent, **finish(proc), "complete": complete(out)}


def _one_process(folder: Path, out: Path, fake_bin: Path) -> Dict[str, object]:
    """One process with 2 data workers, in its own session (like `setsid`, `timeout` or systemd): SIGTERM
    to the whole group; `--resume auto` and SIGINT to the group (Ctrl-C); `--resume auto` under a stand-in
    SLURM with `--requeue` and USR1 to the group (the scheduler's warning); `--resume auto` to the end."""
    args, runs = _args(folder, ONE, workers=2), []
    for sig, extra, env in ((signal.SIGTERM, [], ENV), (signal.SIGINT, [], ENV),
                            (signal.SIGUSR1, ["--requeue"], _slurm_env(fake_bin, nodes=1, gpus=1))):
        proc = start(recipe(out, *args, "--resume", "auto", *extra), env=env, new_session=True)
        runs.append({"signal": sig.name, **_stop(proc, out, lambda: os.killpg(proc.pid, sig) or 1)})
    end = finish(start(recipe(out, *args, "--resume", "auto")))
    return {"runs": runs, "end": end, "calls": _scontrol_calls(fake_bin)}


# ---- stand-ins for SLURM's srun and scontrol --------------------------------------------------------------

SRUN = """#!/bin/bash
# Stand-in for srun: the command once per node, here, with that node's variables; the step's pids in $SRUN_PIDS.
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
echo "${pids[@]}" > "$SRUN_PIDS"
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

SCONTROL = """#!/bin/bash
# Stand-in for scontrol: `show hostnames` lists this machine once per node; anything else is recorded.
if [ "$1 $2" = "show hostnames" ]; then
  for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done
else
  echo "$@" >> "$(dirname "$0")/scontrol.calls"
fi
"""


@pytest.fixture(scope="module")
def fake_slurm(tmp_path_factory) -> Dict[str, Path]:
    bins = {}
    for name in ("one", "two"):  # one folder per chain: each records its own scontrol calls
        folder = tmp_path_factory.mktemp(f"slurm_bin_{name}")
        for tool, text in (("srun", SRUN), ("scontrol", SCONTROL)):
            (folder / tool).write_text(text)
            (folder / tool).chmod(0o755)
        bins[name] = folder
    return bins


def _slurm_env(fake_bin: Path, nodes: int, gpus: int, **more: str) -> Dict[str, str]:
    return {**ENV, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "vaegan", "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": "node[0-1]",
            "SLURM_GPUS_ON_NODE": str(gpus), "ACCELERATE_USE_CPU": "true", "SRUN_PIDS": str(fake_bin / "srun.pids"),
            "MAIN_PORT": str(_free_port()), **more}


def _scontrol_calls(fake_bin: Path) -> List[str]:
    calls = fake_bin / "scontrol.calls"
    return calls.read_text().splitlines() if calls.is_file() else []


def _job(script: str, out: Path, args: List[str], env: Dict[str, str]):
    return start(["bash", str(SLURM / script), *args], env={**env, "OUTPUT_DIR": str(out)})


def _step_processes(env: Dict[str, str]) -> List[int]:
    """Every process of the job step (what slurmstepd signals): srun's tasks and all they started."""
    pids = Path(env["SRUN_PIDS"]).read_text().split()
    return descendants([int(p) for p in pids])


def _two_processes(folder: Path, out: Path, fake_bin: Path) -> Dict[str, object]:
    """Two gloo processes, one data worker each, stopped five ways in a row, each run resuming the last:
    torchrun with SIGTERM to rank 1 only; `accelerate launch` in its own session with SIGINT to the group;
    recipes/slurm/one_node.sbatch with SIGHUP (its warning signal) to every process of the step, requeued;
    torchrun.sbatch with SIGTERM to every process (scancel, preemption); multi_node.sbatch (2 nodes x 1) to
    the end. The first run also checkpoints every 0.3 s of wall clock."""
    args, runs = _args(folder, TWO, workers=1), []
    cpu = {**ENV, "ACCELERATE_USE_CPU": "true"}

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = start([*torchrun, *recipe(out, *args, "--resume", "auto", "train.checkpoint_every_minutes=0.005")[1:]],
                 env=cpu)

    def to_rank_1():  # the agent's children are the ranks (their data workers are the ranks' children)
        for child in psutil.Process(proc.pid).children():
            if b"RANK=1\0" in Path(f"/proc/{child.pid}/environ").read_bytes():
                child.send_signal(signal.SIGTERM)
                return 1
        return 0

    begun = complete(out)  # a checkpoint by the clock before the signal
    runs.append({"how": "rank 1", **_stop(proc, out, to_rank_1, ready=lambda: len(complete(out)) > len(begun))})

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", str(_free_port())]
    proc = start([*launch, *recipe(out, *args, "--resume", "auto")[1:]], env=cpu, new_session=True)
    runs.append({"how": "group SIGINT", **_stop(proc, out, lambda: os.killpg(proc.pid, signal.SIGINT) or 1)})

    for script, sig, nodes, gpus in (("one_node.sbatch", signal.SIGHUP, 1, 2),
                                     ("torchrun.sbatch", signal.SIGTERM, 1, 2)):
        env = _slurm_env(fake_bin, nodes=nodes, gpus=gpus)
        proc = _job(script, out, args, env)
        runs.append({"how": f"{script} {sig.name}",
                     **_stop(proc, out, lambda: signal_all(_step_processes(env), sig))})
    end = finish(_job("multi_node.sbatch", out, args, _slurm_env(fake_bin, nodes=2, gpus=1)))
    return {"runs": runs, "end": end, "calls": _scontrol_calls(fake_bin)}


@pytest.fixture(scope="module")
def chains(tmp_path_factory, digits_folder, fake_slurm) -> Dict[str, Dict[str, object]]:
    base = tmp_path_factory.mktemp("preemption")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = _args(digits_folder, TWO, workers=1)
    results = side_by_side({
        "one_reference": lambda: {"run": finish(start(recipe(base / "one_reference",
                                                             *_args(digits_folder, ONE, workers=2))))},
        "one": lambda: _one_process(digits_folder, base / "one", fake_slurm["one"]),
        "two_reference": lambda: {"run": finish(start([*torchrun, *recipe(base / "two_reference", *two)[1:]],
                                                      env={**ENV, "ACCELERATE_USE_CPU": "true"}))},
        "two": lambda: _two_processes(digits_folder, base / "two", fake_slurm["two"]),
    })
    for name in results:
        results[name]["out"] = base / name
    return results


def _chain(chains, name: str) -> Dict[str, object]:
    chain = chains[name]
    assert "error" not in chain, chain
    return chain


@pytest.mark.slow
def test_the_references_run_to_the_end(chains):
    for name in ("one_reference", "two_reference"):
        run = _chain(chains, name)["run"]
        assert run["rc"] == 0, run["stderr"][-3000:]
        assert "\r" not in run["stderr"]  # no progress bar redraws in a log: plain lines
        assert "vaegan.progress: step " in run["stderr"] and " left " in run["stderr"]


@pytest.mark.slow
@pytest.mark.parametrize("index, name, status", [(0, "SIGTERM", 143), (1, "SIGINT", 130), (2, "SIGUSR1", 138)])
def test_a_signal_to_the_whole_process_group_checkpoints_and_exits_with_its_status(chains, index, name, status):
    """Data workers get the signal too, and leave it to the main process (before: the run died with
    `DataLoader worker (pid N) is killed by signal: Terminated.` and saved nothing)."""
    run = _chain(chains, "one")["runs"][index]
    assert run["started"] and run["rc"] == status, run["stderr"][-3000:]
    assert "Traceback" not in run["stderr"] and "DataLoader worker" not in run["stderr"]
    stops = stopped_steps(run["stderr"], name)
    assert len(stops) == 1 and 1 <= stops[0] < ONE_TOTAL and run["complete"][-1] == stops[0]


@pytest.mark.slow
def test_the_warning_signal_under_slurm_requeues_the_job_once_its_checkpoint_is_complete(chains):
    chain = _chain(chains, "one")
    assert chain["calls"] == ["requeue 4242"]
    assert "Requeued SLURM job 4242" in chain["runs"][2]["stderr"]


@pytest.mark.slow
def test_resume_auto_after_group_signals_ends_with_the_weights_of_an_uninterrupted_run(chains):
    chain = _chain(chains, "one")
    assert chain["end"]["rc"] == 0, chain["end"]["stderr"][-3000:]
    assert f"at step {chain['runs'][-1]['complete'][-1]}" in chain["end"]["stderr"]  # "Resumed from ..."
    assert_same_weights(chains["one_reference"]["out"], chain["out"], ONE_TOTAL)


@pytest.mark.slow
@pytest.mark.parametrize("index, name", [(0, "SIGTERM"), (1, "SIGINT"), (2, "SIGHUP"), (3, "SIGTERM")])
def test_every_rank_of_a_two_process_run_stops_after_the_same_step_with_one_checkpoint(chains, index, name):
    run = _chain(chains, "two")["runs"][index]
    assert run["started"] and run["sent"], (run["how"], run["stderr"][-3000:])
    stops = stopped_steps(run["stderr"], name)
    assert len(stops) == 2 and stops[0] == stops[1], (run["how"], run["stderr"][-3000:])
    assert run["complete"][-1] == stops[0] and "DataLoader worker" not in run["stderr"]
    ckpt = list_checkpoints(chains["two"]["out"] / "checkpoints")[-1]
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    if name == "SIGINT":  # accelerate launch reports the signal's status too
        assert run["rc"] == 130, run["stderr"][-3000:]


@pytest.mark.slow
def test_timed_checkpoints_and_the_slurm_scripts_end_two_processes_with_uninterrupted_weights(chains):
    chain = _chain(chains, "two")
    first = chain["runs"][0]
    assert len([s for s in first["complete"] if s < first["complete"][-1]]) >= 1  # saved by the clock, too
    assert chain["calls"] == ["requeue 4242"]  # one_node.sbatch's SIGHUP; SIGTERM (scancel) never requeues
    assert chain["end"]["rc"] == 0, chain["end"]["stderr"][-3000:]
    assert "2 process(es)" in chain["end"]["stderr"]  # multi_node.sbatch: 2 nodes x 1 process
    assert_same_weights(chains["two_reference"]["out"], chain["out"], TWO_TOTAL)


# ---- in one process ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_max_time_stops_with_a_checkpoint_before_the_budget_and_auto_resumes(tmp_path):
    cfg = tiny_config(tmp_path, "train.epochs=500", "train.max_time=1.5")
    trainer = vaegan.build_trainer(cfg)
    t0 = time.monotonic()
    with pytest.raises(TrainingStopped) as stop:
        trainer.fit()
    took = time.monotonic() - t0
    assert stop.value.code == 124 and "max_time" in stop.value.reason
    assert took < 1.5 + 1.0, took  # the checkpoint included
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == f"step_{stop.value.step:08d}"
    assert 0 < stop.value.step < trainer.total_steps
    resumed = vaegan.build_trainer(tiny_config(tmp_path, "train.epochs=500", "train.max_time=1.5",
                                               "train.resume=auto"))
    with pytest.raises(TrainingStopped) as again:
        resumed.fit()
    assert again.value.step > stop.value.step


@pytest.mark.slow
def test_checkpoint_every_minutes_saves_by_the_clock(tmp_path):
    cfg = tiny_config(tmp_path, "train.epochs=12", "train.checkpoint_every_minutes=0.001",
                      "train.checkpoints_total_limit=100", "train.progress=log", "train.progress_seconds=0")
    trainer = vaegan.build_trainer(cfg)
    trainer.fit()
    steps = [int(p.name.split("_")[1]) for p in list_checkpoints(tmp_path / "checkpoints")]
    assert len(steps) >= 3 and steps[-1] == trainer.total_steps, steps  # 0.06 s apart, not by step count


def test_progress_without_a_terminal_is_a_plain_log_line_per_interval(tmp_path, caplog):
    cfg = tiny_config(tmp_path, "train.progress_seconds=0")  # pytest's stderr is not a terminal: "auto" logs
    with caplog.at_level(logging.INFO, logger="vaegan.progress"):
        vaegan.build_trainer(cfg).fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "vaegan.progress"]
    assert len(lines) == 4, lines  # 8 steps, logged every 2
    assert lines[0].startswith("step 2/8 (25.0%) epoch 0 | ") and "images/s" in lines[0] and "g/total" in lines[0]
    assert lines[-1].startswith("step 8/8 (100.0%)") and "left 0:00:00" in lines[-1]


def test_progress_lines_are_throttled_to_the_configured_seconds(tmp_path, caplog):
    cfg = tiny_config(tmp_path, "train.progress_seconds=3600")
    with caplog.at_level(logging.INFO, logger="vaegan.progress"):
        vaegan.build_trainer(cfg).fit()
    lines = [r.getMessage() for r in caplog.records if r.name == "vaegan.progress"]
    assert [line.split(" (")[0] for line in lines] == ["step 2/8", "step 8/8"]  # the first, and the end


def test_resume_auto_starts_fresh_without_a_checkpoint_but_latest_refuses(tmp_path):
    assert resolve_resume(tmp_path, "auto") is None and resolve_resume(tmp_path, None) is None
    with pytest.raises(CheckpointError, match="found no complete checkpoint"):
        resolve_resume(tmp_path, "latest")
    trainer = vaegan.build_trainer(tiny_config(tmp_path, "train.resume=auto"))
    trainer.fit()
    assert resolve_resume(tmp_path, "auto") == list_checkpoints(tmp_path / "checkpoints")[-1]


class _Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        return torch.tensor(i)


def _worker_pid(loader_iter) -> int:
    return loader_iter._workers[0].pid


def test_data_workers_ignore_stop_signals_while_training_and_end_quietly_after():
    init = WorkerSignals((signal.SIGINT, signal.SIGTERM, signal.SIGUSR1))
    loader = DataLoader(_Numbers(), batch_size=4, num_workers=1, worker_init_fn=init, persistent_workers=True)
    it = iter(loader)
    assert next(it).tolist() == [0, 1, 2, 3]
    pid = _worker_pid(it)
    init.active.value = 1
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGTERM):
        os.kill(pid, sig)
    time.sleep(0.3)
    assert next(it).tolist() == [4, 5, 6, 7]  # the worker is alive and still loading
    init.active.value = 0
    proc = it._workers[0]
    os.kill(pid, signal.SIGTERM)
    proc.join(timeout=10)
    assert proc.exitcode == 0  # quietly: the loader's SIGCHLD check reports a death by signal as an error
    it._shutdown_workers()


def test_repeated_sigterm_is_one_request_and_a_late_second_ctrl_c_stops_at_once():
    got, previous = [], []
    old = signal.signal(signal.SIGINT, lambda s, f: previous.append(s))
    try:
        with GracefulStop(got.append, repeat_window=0.2) as catch:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a launcher forwarding what the group already got
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # within the window: the forwarded copy
            assert got == [signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGINT] and not previous
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGINT)  # a user pressing Ctrl-C again: the previous handler, now
            assert previous == [signal.SIGINT] and catch.signum == signal.SIGTERM
    finally:
        signal.signal(signal.SIGINT, old)


def test_requeue_runs_scontrol_with_the_job_id(tmp_path, monkeypatch, caplog):
    (tmp_path / "scontrol").write_text(SCONTROL)
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert requeue_slurm_job({"SLURM_JOB_ID": "77"})
    assert requeue_slurm_job({"SLURM_JOB_ID": "80", "SLURM_ARRAY_JOB_ID": "79", "SLURM_ARRAY_TASK_ID": "3"})
    assert (tmp_path / "scontrol.calls").read_text().splitlines() == ["requeue 77", "requeue 79_3"]
    assert slurm_job_id({}) is None
    with caplog.at_level(logging.WARNING):
        assert not requeue_slurm_job({})  # not a SLURM job: said, not raised
    assert "not in a SLURM job" in caplog.text
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho 'Invalid job id specified' >&2\nexit 1\n")
    with caplog.at_level(logging.ERROR):
        assert not requeue_slurm_job({"SLURM_JOB_ID": "77"})
    assert "Invalid job id specified" in caplog.text and "--resume auto" in caplog.text


def test_the_slurm_scripts_are_valid_bash_with_the_directives_the_docs_promise():
    for script in ("one_node.sbatch", "multi_node.sbatch", "torchrun.sbatch"):
        text = (SLURM / script).read_text()
        assert os.system(f"bash -n {SLURM / script}") == 0
        for directive in ("#SBATCH --signal=HUP@", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
            assert directive in text, (script, directive)
        assert "--resume auto --requeue train.warning_signal=HUP" in text
        assert text in (ROOT / "docs" / "distributed.md").read_text()  # the docs show the tested file, whole
