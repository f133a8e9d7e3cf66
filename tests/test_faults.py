"""Faults of the machine and the data (vaegan/faults.py), provoked for real: an output folder that is a file,
read-only or too small, a disk that fills during a checkpoint (RLIMIT_FSIZE in the recipe's process), a final
model that cannot be written, image files that vanish while data workers read them, out of memory in a step.

Each checks what the issue asked: the exit status, the one paragraph as the last line (no traceback), no
half-written folder, the last complete checkpoint loads, and ``--resume auto`` ends with the weights of an
uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from conftest import MNIST_ROOT, TINY, registered, tiny_config, write_digit_pngs
from processes import (
    assert_same_weights,
    complete,
    finish,
    recipe,
    side_by_side,
    start,
    steps_logged,
    tmp_dirs,
    wait_for,
)
from safetensors.torch import load_file

import vaegan
from vaegan.api import LossTerm
from vaegan.checkpointing import list_checkpoints
from vaegan.errors import DataError, OutputError, ResourceError

ARGS = [*TINY, "--data-dir", str(MNIST_ROOT), "data.download=false", "train.epochs=6", "train.checkpoint_every=4"]
TOTAL = 24  # 4 steps per epoch
FILE_LIMIT = 100_000  # bytes: a checkpoint's optimizer.bin (~125 kB) is larger, every other file of the run smaller


def _limit_file_size() -> None:  # runs in the child before exec: writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


# ---- before any data is read ---------------------------------------------------------------------------------

def test_an_output_dir_that_is_a_file_is_refused_before_the_data_is_read(tmp_path):
    (tmp_path / "out").write_text("my notes")
    cfg = tiny_config(tmp_path / "out", f"data.root={tmp_path / 'no-data-here'}")  # reading data would fail too
    with pytest.raises(OutputError, match="is a file, not a folder"):
        vaegan.build_trainer(cfg)
    assert (tmp_path / "out").read_text() == "my notes"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (a read-only mount would do)")
def test_a_read_only_output_folder_is_refused_before_the_data_is_read(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        with pytest.raises(OutputError, match="cannot be written"):
            vaegan.build_trainer(tiny_config(tmp_path / "ro" / "run", f"data.root={tmp_path / 'no-data-here'}"))
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_too_little_free_space_is_refused_with_the_numbers(tmp_path):
    # 10^9 kept checkpoints of the tiny model need far more than any disk: the real free space is compared.
    cfg = tiny_config(tmp_path / "out", "train.checkpoints_total_limit=1000000000")
    with pytest.raises(OutputError, match=r"needs about .* checkpoints of .* but only .* are free under"):
        vaegan.build_trainer(cfg)
    assert not (tmp_path / "out").exists()  # nothing written


# ---- writes that fail during training ------------------------------------------------------------------------

def test_a_final_model_that_cannot_be_written_leaves_the_last_checkpoint_and_resume_auto_writes_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "final").write_text("a file where final/ goes")  # mkdir fails: a real OSError, not a mock
    with pytest.raises(OutputError, match=r"Writing the final model .* --resume auto") as failed:
        vaegan.build_trainer(tiny_config(out)).fit()
    assert "step_00000008" in str(failed.value) and list_checkpoints(out / "checkpoints")[-1].name == "step_00000008"
    (out / "final").unlink()
    final = vaegan.build_trainer(tiny_config(out, "train.resume=auto")).fit()
    assert (final / "model.safetensors").is_file()


def test_sample_grids_and_logs_that_cannot_be_written_warn_once_and_training_goes_on(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples").write_text("a file where samples/ goes")
    (out / "metrics.jsonl").mkdir()  # appending to a folder fails
    with caplog.at_level(logging.WARNING, logger="vaegan.faults"):
        final = vaegan.build_trainer(tiny_config(out, "train.sample_every=2")).fit()
    warnings = [r.getMessage() for r in caplog.records if r.name == "vaegan.faults"]
    assert len(warnings) == 2, warnings  # once per kind, not once per write
    assert any("sample grids" in w for w in warnings) and any("metrics.jsonl" in w for w in warnings)
    assert (final / "model.safetensors").is_file() and list_checkpoints(out / "checkpoints")[-1].name == "step_00000008"


# ---- out of memory inside a step -------------------------------------------------------------------------------

class OutOfMemoryOnCall(LossTerm):
    """A loss term (test plugin) that adds nothing, except that its ``call``-th forward raises the real
    ``torch.OutOfMemoryError`` inside the step, as the CUDA caching allocator does."""

    def __init__(self, call: int = 0) -> None:
        super().__init__()
        self.call, self.count = call, 0

    def forward(self, inputs):
        self.count += 1
        if self.count == self.call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return inputs.output.recon.mean() * 0.0


@pytest.fixture
def oom_term():
    with registered("vaegan.losses", "oom_on_call", f"{__name__}:OutOfMemoryOnCall") as name:
        yield name


def test_out_of_memory_in_a_step_saves_the_last_completed_step_and_resumes_exactly(tmp_path, oom_term):
    losses = "losses=[{name: bce}, {name: kl, weight: {value: 1.0, warmup: 4}}, {name: oom_on_call, options: {call: %d}}]"
    reference = vaegan.build_trainer(tiny_config(tmp_path / "ref", losses % 0)).fit().parent
    out = tmp_path / "oom"
    with pytest.raises(ResourceError, match=r"Out of memory in step 6.*The last completed step, 5, is saved.*"
                                            r"Lower train.batch_size \(now 16 per process\)"):
        vaegan.build_trainer(tiny_config(out, losses % 6)).fit()
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000005"]
    vaegan.build_trainer(tiny_config(out, losses % 0, "train.resume=auto")).fit()
    assert_same_weights(reference, out, 8)


# ---- unreadable images, skipped ------------------------------------------------------------------------------

@pytest.fixture
def digits_folder(tmp_path) -> Path:
    return write_digit_pngs(tmp_path / "digits")


class DeleteFiles(vaegan.Callback):
    """Deletes image files after a step (a network file system losing them mid-run)."""

    def __init__(self, files: List[Path], after_step: int) -> None:
        self.files, self.after_step = files, after_step

    def on_step_end(self, trainer, output) -> None:
        if trainer.state.step == self.after_step:
            for f in self.files:
                f.unlink(missing_ok=True)


def _folder_trainer(tmp_path, folder: Path, options: str, files: List[Path]):
    cfg = tiny_config(tmp_path / "out", "data.name=image_folder", f"data.root={folder}", f"data.options={options}",
                      "train.epochs=4")
    return vaegan.build_trainer(cfg, callbacks=[DeleteFiles(files, after_step=2)])


def test_skipped_unreadable_images_are_counted_and_training_goes_on(tmp_path, digits_folder, caplog):
    gone = sorted(digits_folder.iterdir())[:1]
    trainer = _folder_trainer(tmp_path, digits_folder, "{skip_unreadable: true, max_unreadable: 0.05}", gone)
    with caplog.at_level(logging.WARNING, logger="vaegan.data"):
        trainer.fit()
    unreadable = trainer.loader.dataset.unreadable.value  # once per later epoch that drew the file
    assert trainer.state.step == 16 and 1 <= unreadable <= 4
    assert any("cannot be read" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    assert trainer.history[-1]["data/unreadable_images"] == unreadable


def test_a_folder_that_loses_most_of_its_files_still_stops_with_the_last_step_saved(tmp_path, digits_folder):
    gone = sorted(digits_folder.iterdir())[:48]
    trainer = _folder_trainer(tmp_path, digits_folder, "{skip_unreadable: true, max_unreadable: 0.2}", gone)
    with pytest.raises(DataError, match=r"image reads failed .* more than data.options.max_unreadable = 0.2 .*"
                                        r"The last completed step, \d+, is saved"):
        trainer.fit()
    assert complete(tmp_path / "out")[-1] == trainer.state.step and not tmp_dirs(tmp_path / "out")


# ---- real processes: a full disk during a save, files vanishing under the data workers ----------------------

def _disk_full(out: Path) -> Dict[str, object]:
    """Run A is stopped (SIGTERM) once checkpoints 4 and 8 are complete; run B resumes under a file-size limit
    and fails at its first save; run C resumes without it to the end."""
    proc = start(recipe(out, *ARGS))
    started = wait_for(proc, lambda: 8 in complete(out))
    proc.send_signal(signal.SIGTERM)
    first = {"started": started, **finish(proc), "complete": complete(out)}
    full = start(recipe(out, *ARGS, "--resume", "auto"), preexec_fn=_limit_file_size)
    failed = {**finish(full), "complete": complete(out), "tmp": tmp_dirs(out)}
    kept = list_checkpoints(out / "checkpoints")[-1]
    loads = {f: len(load_file(str(kept / f))) for f in ("model.safetensors", "model_1.safetensors", "ema.safetensors")}
    return {"first": first, "failed": failed, "loads": loads, "end": finish(start(recipe(out, *ARGS, "--resume", "auto")))}


def _vanishing(folder: Path, out: Path, args: List[str]) -> Dict[str, object]:
    """Files deleted while 2 data workers read them, then put back and resumed."""
    backup = folder.parent / f"{folder.name}-backup"
    shutil.copytree(folder, backup)
    proc = start(recipe(out, *args))
    started = wait_for(proc, lambda: steps_logged(out) >= 2)
    for f in sorted(folder.iterdir())[8:]:
        f.unlink()
    stopped = {"started": started, **finish(proc), "complete": complete(out), "tmp": tmp_dirs(out)}
    shutil.rmtree(folder)
    shutil.copytree(backup, folder)
    return {"stopped": stopped, "end": finish(start(recipe(out, *args, "--resume", "auto")))}


@pytest.fixture(scope="module")
def chains(tmp_path_factory) -> Dict[str, Dict[str, object]]:
    base = tmp_path_factory.mktemp("faults")
    folders = {name: write_digit_pngs(base / name) for name in ("reference_digits", "vanishing_digits")}
    folder_args = [*TINY, "data.name=image_folder", "data.num_workers=2", "train.epochs=10", "train.progress_seconds=0"]
    results = side_by_side({
        "reference": lambda: {"run": finish(start(recipe(base / "reference", *ARGS)))},
        "disk_full": lambda: _disk_full(base / "disk_full"),
        "folder_reference": lambda: {"run": finish(start(recipe(
            base / "folder_reference", *folder_args, "--data-dir", str(folders["reference_digits"]))))},
        "vanishing": lambda: _vanishing(folders["vanishing_digits"], base / "vanishing",
                                        [*folder_args, "--data-dir", str(folders["vanishing_digits"])]),
    })
    for name in results:
        results[name]["out"] = base / name
    return results


def _chain(chains, name: str) -> Dict[str, object]:
    assert "error" not in chains[name], chains[name]
    return chains[name]


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_paragraph_leaves_no_litter_and_loses_nothing(chains):
    chain = _chain(chains, "disk_full")
    assert chain["first"]["started"] and chain["first"]["rc"] == 143, chain["first"]["stderr"][-2000:]
    failed = chain["failed"]
    assert failed["rc"] == 2, failed["stderr"][-3000:]
    last = _last_line(failed["stderr"])
    assert last.startswith("vaegan: error: Saving the checkpoint of step ") and "a file-size limit" in last, last
    assert "The last complete checkpoint" in last and "--resume auto" in last
    assert "Traceback" not in failed["stderr"] and failed["tmp"] == []  # no half-written folder left
    assert failed["complete"] == chain["first"]["complete"]  # nothing lost, nothing new
    assert all(n > 0 for n in chain["loads"].values())
    assert chain["end"]["rc"] == 0, chain["end"]["stderr"][-3000:]
    assert_same_weights(chains["reference"]["out"], chain["out"], TOTAL)


@pytest.mark.slow
def test_files_vanishing_under_the_data_workers_save_the_last_step_and_resume_exactly(chains):
    chain = _chain(chains, "vanishing")
    stopped = chain["stopped"]
    assert stopped["started"] and stopped["rc"] == 2, stopped["stderr"][-3000:]
    last = _last_line(stopped["stderr"])
    assert last.startswith("vaegan: error: Image '") and "cannot be read" in last, last
    assert "The last completed step, " in last and "--resume auto" in last and "Traceback" not in stopped["stderr"]
    step = int(last.split("The last completed step, ")[1].split(",")[0])
    assert stopped["complete"][-1] == step and stopped["tmp"] == []
    assert chain["end"]["rc"] == 0, chain["end"]["stderr"][-3000:]
    assert_same_weights(chains["folder_reference"]["out"], chain["out"], 40)
