"""Helpers for tests that run the recipe as real processes: start, wait, signal, read what they left.

Used by test_reliability.py (kill -9, signals to the main process) and test_preemption.py (process groups,
every process of a multi-process run, SLURM job scripts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import psutil
import torch
from safetensors.torch import load_file

from vaegan.checkpointing import MARKER, find_checkpoint, list_checkpoints

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "vaegan_mnist.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
WEIGHT_FILES = ("model.safetensors", "model_1.safetensors", "ema.safetensors")


def start(cmd: Sequence[str], env: Optional[Mapping[str, str]] = None, new_session: bool = False,
          **popen: object) -> subprocess.Popen:
    """Start ``cmd`` in the repository root, capturing its output; ``new_session``: as ``setsid`` does, so
    ``os.killpg(proc.pid, sig)`` reaches it and every process it starts; ``popen``: e.g. ``preexec_fn``."""
    return subprocess.Popen(list(cmd), cwd=ROOT, env=dict(env or ENV), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_session, **popen)


def recipe(out: Path, *args: str) -> List[str]:
    """The recipe's command line writing to ``out``."""
    return [sys.executable, str(RECIPE), "--output-dir", str(out), *args]


def wait_for(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 240.0,
             every: float = 0.02) -> bool:
    """Poll ``condition`` until it holds (True) or ``proc`` ends or time runs out (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(every)
    return False


def finish(proc: subprocess.Popen, timeout: float = 240.0) -> Dict[str, object]:
    """Wait for ``proc``; its exit status and standard error."""
    _, stderr = proc.communicate(timeout=timeout)
    return {"rc": proc.returncode, "stderr": stderr}


def names(out: Path) -> List[str]:
    try:
        return os.listdir(out / "checkpoints")
    except FileNotFoundError:
        return []


def tmp_dirs(out: Path) -> List[str]:
    return [n for n in names(out) if n.startswith(".tmp")]


def complete(out: Path) -> List[int]:
    """The steps of the complete checkpoints under ``out``, oldest first."""
    return [json.loads((p / MARKER).read_text())["step"] for p in list_checkpoints(out / "checkpoints")]


def steps_logged(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def once_training(proc: subprocess.Popen, out: Path) -> bool:
    """Wait until a new metrics line is logged: the handlers are installed and training is under way."""
    logged = steps_logged(out)
    return wait_for(proc, lambda: steps_logged(out) > logged)


def descendants(pids: Sequence[int]) -> List[int]:
    """``pids`` and every process they started (alive now)."""
    found = []
    for pid in pids:
        try:
            parent = psutil.Process(pid)
            found += [pid] + [c.pid for c in parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return found


def signal_all(pids: Sequence[int], sig: int) -> int:
    """Send ``sig`` to each process (what SLURM does to every process of a job step); how many got it."""
    sent = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            sent += 1
        except ProcessLookupError:
            continue
    return sent


def stopped_steps(stderr: str, name: str) -> List[int]:
    """The step each process reported stopping after (``Stopped by <name> ... after step N``)."""
    return [int(line.split("after step ")[1].split(";")[0]) for line in stderr.splitlines()
            if f"Stopped by {name}" in line and "after step " in line]


def final_weights(out: Path, total: int) -> Dict[str, Dict[str, torch.Tensor]]:
    """Both players' and the EMA's weights in the last checkpoint, which must be of step ``total``."""
    ckpt = find_checkpoint(out, "latest")
    assert ckpt.name == f"step_{total:08d}", ckpt
    return {f: load_file(str(ckpt / f)) for f in WEIGHT_FILES}


def assert_same_weights(reference: Path, other: Path, total: int) -> None:
    ref, got = final_weights(reference, total), final_weights(other, total)
    for file in WEIGHT_FILES:
        assert ref[file].keys() == got[file].keys()
        for key in ref[file]:
            assert torch.equal(ref[file][key], got[file][key]), f"{other}: {file}:{key} differs from {reference}"


def side_by_side(jobs: Mapping[str, Callable[[], Dict[str, object]]]) -> Dict[str, Dict[str, object]]:
    """Run each job in its own thread (they are mostly waiting on processes); an exception becomes
    ``{"error": ...}`` for the test that reads the job's result. Each result gets its ``seconds``."""
    results: Dict[str, Dict[str, object]] = {}

    def run(name: str) -> None:
        t0 = time.monotonic()
        try:
            results[name] = jobs[name]()
        except Exception as exc:  # reported by the test that reads it
            results[name] = {"error": repr(exc)}
        results[name]["seconds"] = time.monotonic() - t0

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
