"""vaegan.checkpointing and the trainer's resume: a checkpoint that contradicts itself is never resumed, a newer
folder that is skipped is named with the reason, and a changed batch layout keeps the data position in images."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import vaegan
from vaegan.checkpointing import MARKER, find_checkpoint, list_checkpoints, resolve_resume
from vaegan.errors import CheckpointError

# 64 digits at batch 16: 4 batches an epoch; checkpoints at steps 2 and 4
RUN = ("train.max_steps=4", "train.checkpoint_every=2", "train.checkpoints_total_limit=5", "train.epochs=10")


def _run(tiny) -> Path:
    cfg = tiny(*RUN)
    vaegan.build_trainer(cfg).fit()
    return Path(cfg.train.output_dir) / "checkpoints"


def _edit(path: Path, **values) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def test_a_newer_folder_whose_marker_names_an_older_step_is_skipped_with_the_reason(tiny, caplog):
    ckpts = _run(tiny)
    _edit(ckpts / "step_00000004" / MARKER, step=1)  # edited or damaged: "latest" must not read it as step 1
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000002"]
    with caplog.at_level(logging.WARNING, logger="vaegan.checkpointing"):
        chosen = resolve_resume(ckpts.parent, "auto")
    assert chosen.name == "step_00000002"
    assert f"Not resuming from {ckpts / 'step_00000004'}, though it is named for a later step: its {MARKER} says " \
           "step 1 but its name says step 4 (edited or damaged)" in caplog.text
    with pytest.raises(CheckpointError, match="cannot be resumed: its vaegan_checkpoint.json says step 1"):
        find_checkpoint(ckpts.parent, str(ckpts / "step_00000004"))


def test_an_unfinished_newer_save_is_named_when_an_older_checkpoint_is_resumed(tiny, caplog):
    ckpts = _run(tiny)
    (ckpts / "step_00000004" / MARKER).unlink()  # a rotation or save cut short
    with caplog.at_level(logging.WARNING, logger="vaegan.checkpointing"):
        assert resolve_resume(ckpts.parent, "latest").name == "step_00000002"
    assert "step_00000004, though it is named for a later step: it has no readable" in caplog.text


def test_a_checkpoint_whose_counters_contradict_its_marker_is_refused(tiny):
    ckpts = _run(tiny)
    _edit(ckpts / "step_00000004" / "trainer_state.json", step=3)
    trainer = vaegan.build_trainer(tiny(*RUN, "train.resume=auto"))
    with pytest.raises(CheckpointError) as info:
        trainer.load_checkpoint(ckpts / "step_00000004")
    msg = str(info.value)
    assert "contradicts itself: trainer_state.json says step 3, vaegan_checkpoint.json says step 4, the folder's " \
           "name says step 4" in msg and "\n" not in msg
    assert trainer.state.step == 0  # nothing was loaded


def test_a_position_beyond_the_data_is_refused(tiny):
    ckpts = _run(tiny)
    _edit(ckpts / "step_00000004" / "trainer_state.json", batch_in_epoch=100)
    with pytest.raises(CheckpointError, match=r"100 batches \(1600 images\) into an epoch, but the data has 64"):
        vaegan.build_trainer(tiny(*RUN, "train.max_steps=6", "train.resume=auto")).fit()


def test_a_new_batch_size_continues_the_epoch_at_the_same_image(tiny, caplog):
    """Saved 2 batches of 16 into the epoch (32 images); resumed at batch 8, the epoch goes on at image 32."""
    cfg = tiny("train.max_steps=2", "train.checkpoint_every=2", "train.epochs=10")
    vaegan.build_trainer(cfg).fit()
    trainer = vaegan.build_trainer(tiny("train.max_steps=6", "train.batch_size=8", "train.epochs=10",
                                        "train.resume=auto"))
    with caplog.at_level(logging.WARNING, logger="vaegan.trainer"):
        trainer.load_checkpoint(find_checkpoint(cfg.train.output_dir, "latest"))
    assert (trainer.state.step, trainer.state.epoch, trainer.state.batch_in_epoch) == (2, 0, 4)
    assert "Resuming with 8 images per batch (train.batch_size 8 x 1 processes)" in caplog.text
    assert "the epoch continues at image 32 (batch 4 of the new size)" in caplog.text
