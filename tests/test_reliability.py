"""Faults during training, provoked for real: NaN/inf steps, a dominating discriminator, SIGINT/SIGTERM,
``kill -9`` during training and during a checkpoint save, saves that fail half-way.

The process tests run the MNIST recipe as a user does (``python recipes/vaegan_mnist.py``, and under
``torchrun`` with two gloo processes) on the committed digits; all of them run side by side (module
fixture ``chains``) to keep the file fast.
"""

from __future__ import annotations

import json
import logging
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from conftest import MNIST_ROOT, TINY, registered
from processes import (
    ROOT,
    WEIGHT_FILES,
    assert_same_weights,
    complete,
    finish,
    names,
    once_training,
    recipe,
    side_by_side,
    start,
    tmp_dirs,
    wait_for,
)
from safetensors.torch import load_file

import vaegan
from vaegan.api import LossTerm
from vaegan.checkpointing import MARKER, find_checkpoint, list_checkpoints
from vaegan.errors import OutputError, TrainingDiverged, VaeganError
from vaegan.guards import CollapseMonitor


class NonFiniteOnCalls(LossTerm):
    """A loss term (test plugin) that is 0 except on the listed calls of its forward, where its value
    (``kind="loss"``) or only its gradient (``kind="grad"``: sqrt at 0) is not finite."""

    def __init__(self, calls=(), kind: str = "loss", side: str = "generator") -> None:
        super().__init__()
        self.calls, self.kind, self.count = set(calls), kind, 0
        self.player = side  # whose optimizer the NaN reaches
        self.needs_discriminator = side == "discriminator"

    def forward(self, inputs):
        self.count += 1
        source = inputs.output.recon if self.player == "generator" else inputs.disc("real").logits.float()
        if self.count not in self.calls:
            return source.mean() * 0.0
        if self.kind == "loss":
            return source.mean() * float("nan")
        return (source * 0.0).sqrt().sum()  # value 0, gradient 0 * inf = NaN


@pytest.fixture
def nan_term():
    with registered("vaegan.losses", "nonfinite_on_calls", f"{__name__}:NonFiniteOnCalls") as name:
        yield name


def _with_nan(tiny, calls, kind="loss", side="generator", *overrides):
    term = f"{{name: nonfinite_on_calls, options: {{calls: {list(calls)}, kind: {kind}, side: {side}}}}}"
    return tiny(f"losses=[{{name: bce}}, {{name: kl}}, {term}]", *overrides)


# ---- non-finite steps ------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["generator", "discriminator"])
@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_non_finite_step_is_skipped_for_both_players(tiny, nan_term, caplog, kind, side):
    # checkpoint_every=1 syncs the guard at every step; the log interval (2) alone is tested below.
    trainer = vaegan.build_trainer(_with_nan(tiny, [3], kind, side, "train.max_steps=4", "train.checkpoint_every=1"))
    with caplog.at_level(logging.WARNING, logger="vaegan.guards"):
        trainer.fit()
    # Four optimizer steps were taken (four batches); the third changed nothing and is counted as skipped.
    assert trainer.state.step == 4 and trainer.state.skipped_steps == 1 and trainer.state.batch_in_epoch == 4
    for opt in (trainer.train_step.generator.optimizer, trainer.train_step.discriminator.optimizer):  # the fused kernels skipped the update and its Adam step count
        assert {int(s["step"]) for s in opt.optimizer.state.values()} == {3}
    # Bit for bit: generator, discriminator and EMA weights after step 3 are those after step 2. (Buffers
    # such as spectral norm's power-iteration vectors move in every training forward, as in any trainer.)
    # The EMA's n_averaged counts optimizer steps taken, a skipped one included (its decay warm-up).
    buffers = {"n_averaged", *(n for m in (trainer.train_step.generator.module, trainer.train_step.discriminator.module) for n, _ in m.named_buffers())}
    ckpt = {step: Path(trainer.output_dir) / "checkpoints" / f"step_{step:08d}" for step in (2, 3, 4)}
    for name in WEIGHT_FILES:
        before, during, after = (load_file(str(ckpt[s] / name)) for s in (2, 3, 4))
        weights = [k for k in before if k not in buffers]
        assert weights and all(torch.equal(before[k], during[k]) for k in weights), f"{name} changed on the skipped step"
        assert not all(torch.equal(during[k], after[k]) for k in weights), f"{name} did not train on after it"
    assert all(torch.isfinite(p).all() for m in (trainer.train_step.generator.module, trainer.train_step.discriminator.module) for p in m.parameters())
    which = {"loss": f"{side[0]} loss", "grad": f"grad_norm/{side[0]}"}[kind]
    assert any("1 optimizer step(s) skipped for both players (the last at step 3)" in r.message and which in r.message
               for r in caplog.records)
    rows = [json.loads(line) for line in (Path(trainer.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1]  # counted and logged
    assert all(torch.isfinite(torch.tensor(v)) for r in rows for v in r.values()), "a skipped step leaked into metrics"


def test_skipped_steps_are_counted_at_the_log_interval_without_a_host_read_per_step(tiny, nan_term):
    """The host reads the guard only at log intervals. Inside a training step nothing that vaegan's code
    calls turns a tensor into a Python value: no .item(), .tolist(), bool(), float(), .cpu(), .numpy(),
    and no tensor silently passed where torch wants a Python number (aten._local_scalar_dense, e.g.
    ``torch._foreach_lerp_(xs, ys, tensor)``). Yet every skipped step is counted."""
    from torch.overrides import TorchFunctionMode

    from vaegan._compat import LOCAL_SCALAR_DENSE, TorchDispatchMode

    ours = (str(ROOT / "vaegan"), str(ROOT / "plugins"))
    # AveragedModel keeps its n_averaged counter on the host by design (device=None): reading it is no sync.
    host_by_design = "torch/optim/swa_utils.py"
    found: List[str] = []

    # Frames between the code making a read and the modes above: this test, torch's mode plumbing and its
    # dynamo-disable wrappers.
    machinery = (__file__, "torch/overrides.py", "torch/utils/_python_dispatch.py", "torch/_compile.py",
                 "torch/_dynamo/eval_frame.py")

    def record(what: str) -> None:
        stack, frame = [], sys._getframe(1)
        while frame is not None:
            stack.append((frame.f_code.co_filename, frame.f_lineno))
            frame = frame.f_back
        caller = next(name for name, _ in stack if not name.endswith(machinery))  # the code making the read
        inside = [f"{name}:{line}" for name, line in stack if name.startswith(ours)]
        if inside and not caller.endswith(host_by_design):
            found.append(f"{what} in {caller}, under {inside[0]}")

    class PythonReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in {"item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"}:
                record(func.__name__)
            return func(*args, **(kwargs or {}))

    class ScalarReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is LOCAL_SCALAR_DENSE:
                record("a tensor read as a Python number")
            return func(*args, **(kwargs or {}))

    class WatchEachStep(vaegan.Callback):
        """Records every host read made while the two-player step runs on a micro-batch."""

        def on_batch_start(self, trainer, batch):
            found.clear()
            self.modes = [PythonReads(), ScalarReads()]
            for mode in self.modes:
                mode.__enter__()

        def on_batch_end(self, trainer, output):
            for mode in reversed(self.modes):
                mode.__exit__(None, None, None)
            per_step[trainer.state.step + 1] = list(found)

    cfg = _with_nan(tiny, [3, 5, 6], "loss", "generator", "train.epochs=3", "train.log_every=6")
    per_step: Dict[int, List[str]] = {}
    trainer = vaegan.build_trainer(cfg, callbacks=[WatchEachStep()])
    trainer.fit()
    assert sorted(per_step) == list(range(1, 13))
    assert all(lines == [] for lines in per_step.values()), {s: lines for s, lines in per_step.items() if lines}
    assert trainer.state.skipped_steps == 3
    rows = [json.loads(line) for line in (Path(trainer.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in rows] == [(6, 3), (12, 3)]
    assert {int(s["step"]) for s in trainer.train_step.generator.optimizer.optimizer.state.values()} == {9}


def test_too_many_non_finite_steps_stop_training_and_keep_the_last_good_checkpoint(tiny, nan_term):
    cfg = _with_nan(tiny, range(4, 100), "loss", "generator", "train.max_steps=12", "train.checkpoint_every=1",
                    "train.max_nonfinite_steps=3")
    trainer = vaegan.build_trainer(cfg)
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row") as info:
        trainer.fit()
    assert isinstance(info.value, VaeganError)  # the CLI prints it as one paragraph, exit status 2
    out = Path(cfg.train.output_dir)
    # Steps 4 and 5 were skipped (fewer than 3 in a row when saved): their checkpoints hold step 3's weights
    # (checkpoints_total_limit keeps 3). The third skip in a row stops the run before its checkpoint is written.
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == [f"step_{s:08d}" for s in (3, 4, 5)]
    assert not (out / "final").exists()
    good = load_file(str(out / "checkpoints" / "step_00000003" / "model.safetensors"))
    saved = load_file(str(find_checkpoint(out, "latest") / "model.safetensors"))
    live = trainer.train_step.generator.module.state_dict()
    assert all(torch.isfinite(v).all() and torch.equal(v, live[k]) and torch.equal(v, good[k]) for k, v in saved.items())


def _fp16_accelerator():
    """CI has no GPU and Accelerate creates its GradScaler only there: attach the same real torch
    GradScaler, built for CPU tensors, so the fp16 path (scaled backward, one unscale, skip, update) runs."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    acc = Accelerator(mixed_precision="fp16", step_scheduler_with_optimizer=False,
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), True
    return acc


def test_fp16_grad_scaler_unscales_once_and_a_bad_step_lowers_the_scale(tiny, nan_term):
    from vaegan._compat import reset_accelerate_state

    overrides = ("train.max_steps=4", "train.log_every=2", "train.checkpoint_every=0")
    fp32 = vaegan.build_trainer(_with_nan(tiny, [3], "loss", "generator", *overrides))
    fp32.fit()
    reset_accelerate_state()
    fp16 = vaegan.build_trainer(_with_nan(tiny, [3], "loss", "generator", *overrides, "train.overwrite=true"), accelerator=_fp16_accelerator())
    fp16.fit()
    assert fp16.state.step == 4 and fp16.state.skipped_steps == 1
    assert fp16.accelerator.scaler.get_scale() == 2.0 ** 9  # backed off once, for the one bad step
    for opt in (fp16.train_step.generator.optimizer, fp16.train_step.discriminator.optimizer):
        assert {int(s["step"]) for s in opt.optimizer.state.values()} == {3}
    for a, b in zip(fp32.history, fp16.history):  # true (unscaled once) gradient norms, as in fp32
        for key in ("grad_norm/g", "grad_norm/d"):
            assert b[key] == pytest.approx(a[key], rel=1e-2), key


def test_non_finite_weights_are_never_saved(tiny):
    trainer = vaegan.build_trainer(tiny("train.max_steps=2"))
    trainer.fit()
    before = list_checkpoints(trainer.checkpoints.root)
    with torch.no_grad():
        next(trainer.model.decoder.parameters())[0] = float("inf")
    with pytest.raises(TrainingDiverged, match="NaN or inf"):
        trainer.save_checkpoint()
    assert list_checkpoints(trainer.checkpoints.root) == before
    assert not any(p.name.startswith(".tmp") for p in trainer.checkpoints.root.iterdir())


# ---- discriminator domination -----------------------------------------------------------------------


def test_discriminator_domination_is_reported_with_numbers(tiny, caplog):
    """A strong, fast discriminator against a generator that barely learns: D wins every image."""
    cfg = tiny("optim_d.lr=0.01", "optim_g.lr=1e-6", "adversarial.weight=0.0", "train.epochs=5",
               "train.log_every=2", "discriminator.options={channels: [8, 16], spectral_norm: false}")
    trainer = vaegan.build_trainer(cfg)
    trainer.collapse = CollapseMonitor(patience=3)
    with caplog.at_level(logging.WARNING, logger="vaegan.guards"):
        trainer.fit()
    last = trainer.history[-1]
    assert last["d/acc_real"] >= 0.99 and last["d/acc_fake"] >= 0.99
    warnings = [r.message for r in caplog.records if "discriminator has won" in r.message]
    assert len(warnings) == 1, trainer.history  # once, however long it lasts
    assert "D accuracy on real 100.0%" in warnings[0] and "mean logit real" in warnings[0]
    assert "lecam" in warnings[0] and "optim_d.lr" in warnings[0]


def test_collapse_monitor_needs_a_streak_and_reports_exploding_adversarial_loss():
    monitor = CollapseMonitor(patience=2)
    won = {"d/acc_real": 1.0, "d/acc_fake": 0.995}
    assert monitor.update(2, won) is None
    assert monitor.update(4, {"d/acc_real": 0.7, "d/acc_fake": 0.99}) is None  # streak broken
    assert monitor.update(6, won) is None
    assert "since step 6" in monitor.update(8, won)
    assert monitor.warned and monitor.update(10, won) is None  # once
    monitor = CollapseMonitor(patience=1, adversarial_max=10.0)
    assert monitor.update(2, {"g/adversarial": 3.0}) is None
    assert "generator adversarial loss 42" in monitor.update(4, {"g/adversarial": 42.0})


def test_collapse_monitor_sees_the_hinge_game_lost_without_perfect_accuracy():
    """The ldm_kl_f4 failure: D at 90% accuracy, logits far apart, the adaptive weight scaled away."""
    monitor = CollapseMonitor(patience=2)
    assert monitor.update(50, {"d/acc_real": 0.9, "d/acc_fake": 0.9, "d/logits_real": 1.0, "d/logits_fake": -1.0,
                               "g/adaptive_weight": 0.05}) is None
    lost = {"d/acc_real": 0.9, "d/acc_fake": 0.92, "d/logits_real": 2.5, "d/logits_fake": -2.1,
            "g/adaptive_weight": 0.003}
    assert monitor.update(100, lost) is None
    message = monitor.update(150, lost)
    assert "gap >= 4" in message and "adaptive weight 0.003, down from 0.05" in message
    fresh = CollapseMonitor(patience=1)
    fresh.update(1, {"g/adaptive_weight": 0.05})
    assert "adaptive weight" in fresh.update(2, {"g/adaptive_weight": 0.004})
    assert CollapseMonitor(patience=1).update(1, {"d/logits_real": 1.0, "d/logits_fake": -1.0}) is None


# ---- checkpoints written atomically ---------------------------------------------------------------


def test_a_save_that_fails_half_way_leaves_the_complete_checkpoints_alone(tiny):
    trainer = vaegan.build_trainer(tiny("train.max_steps=2", "train.checkpoints_total_limit=1"))
    trainer.fit()
    manager, acc = trainer.checkpoints, trainer.accelerator
    good = find_checkpoint(trainer.output_dir, "latest")

    def disk_full(path: Path) -> None:
        path.write_bytes(b"\0" * 10)
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match="No space left on device") as failed:
        manager.save(acc, 3, {"trainer_state.json": disk_full}, {})
    assert f"The last complete checkpoint, {good}, is intact" in str(failed.value)
    assert list_checkpoints(manager.root) == [good]  # with total_limit=1 the only complete one survives
    assert not (manager.root / ".tmp-step_00000003").exists()  # the half-written folder is removed
    assert find_checkpoint(trainer.output_dir, "latest") == good
    # A save killed half-way (kill -9: nothing could clean up) leaves its temporary folder ...
    (manager.root / ".tmp-step_00000003").mkdir()
    (manager.root / ".tmp-step_00000003" / "model.safetensors").write_bytes(b"partial")
    # A rotation killed half-way: marker gone, folder left. Neither leftover is ever picked...
    half_deleted = manager.root / "step_00000009"
    half_deleted.mkdir()
    (half_deleted / "model.safetensors").write_bytes(b"partial")
    assert find_checkpoint(trainer.output_dir, "latest") == good
    # ... and the next save removes both, then rotates only once the new one is complete.
    trainer.state.step = 5
    new = trainer.save_checkpoint()
    assert sorted(p.name for p in manager.root.iterdir()) == ["step_00000005"] == [new.name]
    assert json.loads((new / MARKER).read_text())["step"] == 5


def test_saving_the_same_step_again_replaces_it_atomically(tiny):
    trainer = vaegan.build_trainer(tiny("train.max_steps=2"))
    trainer.fit()
    first = find_checkpoint(trainer.output_dir, "latest")
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)
    again = trainer.save_checkpoint()
    assert again == first and list_checkpoints(trainer.checkpoints.root) == [first]
    saved = load_file(str(again / "model.safetensors"))
    assert all(torch.equal(v, trainer.train_step.generator.module.state_dict()[k]) for k, v in saved.items())
    assert not any(p.name.startswith(".tmp") for p in trainer.checkpoints.root.iterdir())


# ---- real processes: signals to the main process and kill -9 -------------------------------------------
# (process groups, every process of a 2-process run and SLURM job scripts: test_preemption.py)

ARGS = [*TINY, "--data-dir", str(MNIST_ROOT), "data.download=false", "train.epochs=6"]  # 4 steps per epoch: 24
TOTAL = 24


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return start(recipe(out, *ARGS, *extra))


def _signals(out: Path) -> Dict[str, object]:
    """SIGTERM during the first run, SIGINT during its resumed run, then a resume to the end."""
    stops = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = _start(out, *(["--resume", "latest"] if stops else []))
        started = once_training(proc, out)
        proc.send_signal(sig)
        stops.append({"signal": signal.Signals(sig).name, "started": started, **finish(proc),
                      "complete": complete(out)})
    return {"stops": stops, "resumed": finish(_start(out, "--resume", "latest"))}


def _stop_inside_a_save(proc: subprocess.Popen, out: Path, tries: int = 200) -> bool:
    """Freeze the process (SIGSTOP) as soon as a save's temporary folder appears; keep it frozen if the
    folder is still there (the save is half-written), else let it go on (SIGCONT) and wait for the next
    save. Deterministic where a bare kill on sight is a race: every step saves, so a save that ended
    before the freeze only costs a retry, and the kill that follows lands inside a save for sure."""
    for _ in range(tries):
        seen = set(tmp_dirs(out))
        if not wait_for(proc, lambda: any(n not in seen for n in tmp_dirs(out)), every=0.001):
            return False  # the run ended first
        proc.send_signal(signal.SIGSTOP)
        if any(n not in seen for n in tmp_dirs(out)):
            return True
        proc.send_signal(signal.SIGCONT)
    return False


def _kill_9(out: Path) -> Dict[str, object]:
    """kill -9 at a random moment of training, then, in the resumed run, inside a save (frozen there
    first, see _stop_inside_a_save); then a resume to the end."""
    rng = random.Random(0)
    kills: List[Dict[str, object]] = []
    proc = _start(out, "train.checkpoint_every=1")
    # anywhere after the third checkpoint
    started = wait_for(proc, lambda: any(n >= "step_00000003" for n in names(out) if n.startswith("step_")))
    time.sleep(rng.uniform(0.0, 0.3))
    proc.kill()
    kills.append({"started": started, **finish(proc), "tmp_left": tmp_dirs(out), "complete": complete(out)})
    proc = _start(out, "train.checkpoint_every=1", "--resume", "latest")
    started = _stop_inside_a_save(proc, out)
    proc.kill()  # a frozen process dies of SIGKILL too
    kills.append({"started": started, **finish(proc), "tmp_left": tmp_dirs(out), "complete": complete(out)})
    resumed = finish(_start(out, "train.checkpoint_every=1", "--resume", "latest"))
    return {"kills": kills, "resumed": resumed, "tmp_after_resume": tmp_dirs(out)}


@pytest.fixture(scope="module")
def chains(tmp_path_factory) -> Dict[str, Dict[str, object]]:
    """Every process test of this file, side by side: an uninterrupted reference run; SIGTERM, then SIGINT
    in the resumed run; kill -9 during training, then during a save; each followed by ``--resume latest``."""
    base = tmp_path_factory.mktemp("processes")
    results = side_by_side({
        "reference": lambda: {"run": finish(_start(base / "reference"))},
        "signals": lambda: _signals(base / "signals"),
        "kill_9": lambda: _kill_9(base / "kill_9"),
    })
    for name in results:
        results[name]["out"] = base / name
    return results


def _assert_same_final_weights(chains, name: str) -> None:
    assert_same_weights(chains["reference"]["out"], chains[name]["out"], TOTAL)


@pytest.mark.slow
def test_reference_run(chains):
    run = chains["reference"]["run"]
    assert run["rc"] == 0, run["stderr"][-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("index, name, status", [(0, "SIGTERM", 143), (1, "SIGINT", 130)])
def test_a_signal_writes_a_checkpoint_and_exits_cleanly(chains, index, name, status):
    chain = chains["signals"]
    assert "error" not in chain, chain
    stop = chain["stops"][index]
    assert stop["started"] and stop["rc"] == status, stop["stderr"][-3000:]
    assert "Traceback" not in stop["stderr"]
    lines = [line for line in stop["stderr"].splitlines() if f"Stopped by {name} after step" in line]
    assert lines, stop["stderr"][-3000:]
    stopped_at = int(lines[0].split("after step ")[1].split(";")[0])
    assert 1 <= stopped_at < TOTAL and stop["complete"][-1] == stopped_at  # checkpoint_every is 0
    if index:  # the second run resumed from the first stop's checkpoint
        assert f"at step {chain['stops'][0]['complete'][-1]}" in stop["stderr"]


@pytest.mark.slow
def test_resume_after_signals_continues_exactly(chains):
    chain = chains["signals"]
    assert "error" not in chain, chain
    assert chain["resumed"]["rc"] == 0, chain["resumed"]["stderr"][-3000:]
    assert f"at step {chain['stops'][1]['complete'][-1]}" in chain["resumed"]["stderr"]  # "Resumed from ..."
    _assert_same_final_weights(chains, "signals")


@pytest.mark.slow
def test_kill_9_during_training_and_during_a_save_then_resume_equals_an_uninterrupted_run(chains):
    chain = chains["kill_9"]
    assert "error" not in chain, chain
    kills = chain["kills"]
    assert all(k["started"] and k["rc"] == -signal.SIGKILL for k in kills), kills
    assert 3 <= kills[0]["complete"][-1] < TOTAL
    last = kills[-1]
    assert len(kills) == 2 and last["tmp_left"], kills  # the second kill landed inside a save
    # The interrupted save is ignored, and rotation (limit 3) had kept the complete ones before it.
    tmp_step = int(last["tmp_left"][0].rsplit("_", 1)[1])
    assert len(last["complete"]) >= 2 and max(last["complete"]) < tmp_step
    assert chain["resumed"]["rc"] == 0, chain["resumed"]["stderr"][-3000:]
    assert f"at step {max(last['complete'])}" in chain["resumed"]["stderr"]  # the newest complete one
    assert chain["tmp_after_resume"] == []  # the leftover was cleaned by the next save
    _assert_same_final_weights(chains, "kill_9")
