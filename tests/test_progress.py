"""Progress of every long phase (vaegan.progress): what a log file of a non-terminal run shows.

A phase is quiet for its first seconds, then writes lines with the count, the rate and the time left (or a
tqdm bar on a terminal); the lines go through logging once the program configured it, else to stderr, so a
plain Python script shows them too. The end-to-end tests run real processes whose stderr is a file.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MNIST_ROOT, TINY

from vaegan.errors import ConfigError
from vaegan.progress import Phase, progress_mode, set_progress

ROOT = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def _process_choice_restored(monkeypatch):
    from vaegan import progress

    monkeypatch.setattr(progress, "_chosen", {})
    # pytest's own log capture configures logging; a plain script has no handler at all (lines to stderr)
    monkeypatch.setattr(progress.logger, "propagate", False)
    monkeypatch.delenv("VAEGAN_PROGRESS", raising=False)
    monkeypatch.delenv("VAEGAN_PROGRESS_SECONDS", raising=False)


def test_log_lines_give_count_rate_and_time_left_then_the_time_taken(capsys):
    with Phase("encode", total=4, unit="img", mode="log", every_seconds=0, hint="--limit N for fewer") as phase:
        for _ in range(4):
            time.sleep(0.01)
            phase.update(1)
    lines = capsys.readouterr().err.splitlines()  # no logging configured: straight to stderr
    assert lines[0].startswith("encode: 1/4 img (25.0%) | ") and "img/s" in lines[0] and ", left 0:00:0" in lines[0]
    assert lines[0].endswith("(--limit N for fewer)") and "--limit" not in lines[1]  # the hint once
    assert lines[3].startswith("encode: 4/4 img (100.0%)") and lines[4].startswith("encode: 4 img in 0:00:0")


def test_a_short_phase_says_nothing_and_an_upper_bound_says_at_most(capsys):
    with Phase("fit", total=10, mode="log") as phase:  # the default: quiet for its first seconds
        phase.update(10)
    assert capsys.readouterr().err == ""
    with Phase("gmm fit", total=200, unit="EM iterations", mode="log", every_seconds=0, bound=True) as phase:
        time.sleep(0.01)
        phase.update(1)
    assert "left at most" in capsys.readouterr().err


def test_lines_go_through_logging_once_it_is_configured(caplog, capsys, monkeypatch):
    from vaegan import progress

    monkeypatch.setattr(progress.logger, "propagate", True)  # to pytest's handler on the root logger
    with caplog.at_level(logging.INFO, logger="vaegan.progress"):
        with Phase("decode", total=2, mode="log", every_seconds=0) as phase:
            phase.update(2)
    assert any(r.name == "vaegan.progress" and r.getMessage().startswith("decode: 2/2") for r in caplog.records)
    assert "decode" not in capsys.readouterr().err


def test_the_process_choice_and_the_environment_switch_it(monkeypatch, capsys):
    monkeypatch.setenv("VAEGAN_PROGRESS_SECONDS", "soon")
    with pytest.raises(ConfigError, match="VAEGAN_PROGRESS_SECONDS must be a number"):
        Phase("eval", total=1)
    monkeypatch.setenv("VAEGAN_PROGRESS_SECONDS", "0")
    monkeypatch.setenv("VAEGAN_PROGRESS", "off")
    assert progress_mode() == "off" and progress_mode("log") == "log"  # an explicit mode wins
    set_progress("log", every_seconds=0)  # the Python switch wins over the environment
    assert progress_mode() == "log"
    with Phase("eval", total=1) as phase:
        phase.update(1)
    assert "eval: 1/1" in capsys.readouterr().err
    with Phase("eval", total=1, enabled=False) as phase:  # other processes than the local main one
        phase.update(1)
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError, match="one of auto, bar, log, off"):
        set_progress("loud")  # type: ignore[arg-type]


def test_a_terminal_gets_a_bar(capsys):
    with Phase("encode", total=3, mode="bar", every_seconds=0) as phase:
        phase.update(3)
    assert "encode: 100%" in capsys.readouterr().err and phase.done == 3


@pytest.mark.slow
def test_a_python_script_shows_training_and_sampler_fit_progress_in_its_log(tmp_path):
    """The README's Python use, stderr to a file, no logging configured: the training steps, the line before
    the sampler's fit, the encoding and the EM iterations, each with the time left."""
    overrides = [*TINY, f"data.root={MNIST_ROOT}", "data.download=false", f"train.output_dir={tmp_path / 'run'}",
                 "train.progress_seconds=0", "sampler={name: gmm, options: {n_components: 2, max_iter: 3}}"]
    script = f"import vaegan\nvaegan.train(vaegan.config.apply_overrides(vaegan.ExperimentConfig(), {overrides!r}))\n"
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        subprocess.run([sys.executable, "-c", script], stderr=err, check=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "VAEGAN_PROGRESS_SECONDS": "0"})
    text = log.read_text()
    assert "step 2/8 (25.0%)" in text and "left" in text  # training: 64 images, batch 16, 2 epochs
    assert "Fitting the 'gmm' sampler to the posterior means of 64 images" in text and "sampler.limit" in text
    assert "encode: 64/64 img (100.0%)" in text and "encode: 64 img in 0:00:0" in text
    assert "gmm fit: 1/3 EM iterations" in text and "left at most" in text


@pytest.mark.slow
def test_cli_commands_write_progress_to_a_log_file(saved_run, tmp_path):
    """`vaegan score` and `fit-sampler` with stderr to a file: the split read, the phase's lines with the time
    left and, once, how to make it shorter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VAEGAN_PROGRESS_SECONDS": "0"}

    def run(*argv: str) -> str:
        log = tmp_path / "stderr.log"
        with open(log, "w") as err:
            subprocess.run([sys.executable, "-m", "vaegan.cli", *argv], stderr=err, stdout=subprocess.DEVNULL,
                           check=True, timeout=300, env=env)
        return log.read_text()

    text = run("score", "--model", str(saved_run), "--data-dir", str(MNIST_ROOT), "--limit", "20", "--batch-size",
               "8", "--nll-samples", "4", "--out", str(tmp_path / "s.csv"))
    assert "score: 20 images of the test split of 'mnist'" in text
    assert "INFO vaegan.progress: score: 8/20 img (40.0%)" in text and ", left " in text
    assert "(--limit N scores fewer images, --nll-samples K (now 4)" in text
    text = run("fit-sampler", "--model", str(saved_run), "--sampler", "gmm", "--option", "n_components=2",
               "--option", "max_iter=2", "--data-dir", str(MNIST_ROOT), "--limit", "30")
    assert "Fitting the 'gmm' sampler to the posterior means of 30 images" in text and "--limit N" in text
    assert "gmm fit: 2/2 EM iterations (100.0%)" in text


def test_only_the_local_main_process_shows_progress(monkeypatch, capsys):
    """Every rank of a run fits the sampler (or evaluates) alike; one of them shows it (LOCAL_RANK 0)."""
    from vaegan.progress import emit

    monkeypatch.setenv("LOCAL_RANK", "1")
    with Phase("encode", total=2, mode="log", every_seconds=0) as phase:
        phase.update(2)
    emit("Fitting the 'gmm' sampler ...")
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    emit("Fitting the 'gmm' sampler ...")
    assert "Fitting the 'gmm' sampler" in capsys.readouterr().err
