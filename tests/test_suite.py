"""The suite itself: it leaves nothing behind outside pytest's tmp_path (tests/conftest.py's sandbox)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

# Tests that touch every kind of writer: W&B offline, matplotlib, data workers ended by a signal, torchrun
# (2 processes), torch.compile, the evaluation classifier cache.
PROBES = [
    "tests/test_tracking.py::test_wandb_offline_run_records_config_every_term_and_images",
    "tests/test_tracking.py::test_loss_curves_cover_every_logged_term",
    "tests/test_preemption.py::test_data_workers_ignore_stop_signals_while_training_and_end_quietly_after",
    "tests/test_distributed.py::test_two_processes_end_with_identical_parameters[default]",
    "tests/test_performance.py::test_compiled_players_train_checkpoint_and_resume[aot_eager]",
    "tests/test_evaluation.py::test_classifier_is_cached_by_dataset_key",
]


@pytest.mark.slow
def test_the_suite_writes_nothing_outside_its_temporary_folders(tmp_path):
    """A run of the suite once left 10 vaegan-test-cache-* folders, torchelastic_* and torchinductor_root
    in the temp dir and W&B logs in ~/.cache/wandb: run a slice of it with a fresh temp dir and home."""
    tmp, home = tmp_path / "tmp", tmp_path / "home"
    tmp.mkdir()
    home.mkdir()
    keep = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "PYENV_ROOT", "PYENV_VERSION")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(TMPDIR=str(tmp), HOME=str(home), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PROBES], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{len(PROBES)} passed" in proc.stdout, proc.stdout[-2000:]
    left = sorted(p.name for p in tmp.iterdir())
    assert all(name.startswith("pytest-of-") for name in left), left  # pytest's own tmp_path root, by design
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []
