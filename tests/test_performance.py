"""The speed features stay correct: batched in-memory data, fused optimizers, channels_last, torch.compile.

Speed itself is measured by benchmarks/ (docs/benchmarks.md), never asserted here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import vaegan
from vaegan.data import TensorImages
from vaegan.optim import WarmupEMA, default_precision, step_unless


def _final_weights(run: Path):
    final = run / "final"
    return load_file(str(final / "model.safetensors")), load_file(str(final / "raw" / "model.safetensors"))


def test_in_memory_batches_equal_item_by_item_batches():
    images = (torch.rand(50, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    ds = TensorImages(images, value_range=(-1.0, 1.0))
    calls = []
    fetch = TensorImages.__getitems__

    class Counted(TensorImages):
        def __getitems__(self, indices):
            calls.append(len(indices))
            return fetch(self, indices)

    ds = Counted(images, value_range=(-1.0, 1.0))
    batches = list(DataLoader(ds, batch_size=8))  # __getitems__: one indexing op per batch
    assert calls == [8] * 6 + [2]  # the DataLoader fetched whole batches, never item by item
    for k, batch in enumerate(batches):
        expected = torch.stack([ds[i] for i in range(8 * k, min(8 * k + 8, 50))])
        assert torch.equal(batch, expected)
    assert batches[-1].shape == (2, 3, 8, 8)


def test_both_players_use_fused_optimizers(tiny):
    trainer = vaegan.build_trainer(tiny())
    for opt in (trainer.train_step.generator.optimizer, trainer.train_step.discriminator.optimizer):
        assert opt.optimizer.defaults["fused"] is True


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_a_skipped_update_changes_nothing_and_an_applied_one_steps(fused):
    """The guard's device verdict: fused AdamW reads it in its kernel (no host sync), foreach by one read."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, weight_decay=0.1, fused=fused or None, foreach=not fused or None)

    def step(found_inf: float):
        net(torch.randn(8, 4)).square().mean().backward()
        before = [p.detach().clone() for p in net.parameters()]
        step_unless(opt, torch.tensor(found_inf))
        opt.zero_grad(set_to_none=True)
        return before, [int(s["step"]) for s in opt.state.values()]

    step(0.0)
    before, counts = step(1.0)  # skipped: weights (weight decay included) and Adam's step count unchanged
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters())) and counts == [1, 1]
    before, counts = step(0.0)
    assert not any(torch.equal(a, b) for a, b in zip(before, net.parameters())) and counts == [2, 2]


def test_ema_stays_bit_for_bit_on_a_skipped_step():
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    update = WarmupEMA(0.999)
    ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=update, use_buffers=True)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update_parameters(net)  # the first update copies
    with torch.no_grad():
        net.weight.add_(1.0)
    held = [p.clone() for p in ema.module.parameters()]
    update.skip = torch.tensor(1.0)
    ema.update_parameters(net)
    assert all(torch.equal(a, b) for a, b in zip(held, ema.module.parameters()))
    update.skip = torch.tensor(0.0)
    ema.update_parameters(net)
    d = min(0.999, (1 + 2) / (10 + 2))  # warm-up decay after n = 2 updates
    assert torch.allclose(ema.module.weight, d * held[0] + (1 - d) * net.weight)


def test_default_precision_follows_the_launcher_then_the_hardware(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert default_precision("fp16") == "fp16"  # an explicit choice always wins
    expected = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
    assert default_precision(None) == expected  # CPU: fp32 (None lets Accelerate read its config)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # set by `accelerate launch`
    assert default_precision(None) is None


CPUINFO = "processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu sse2 avx2 fma {extra}\nbogomips\t: 4890\n"


@pytest.mark.parametrize("extra, units", [("", None), ("avx512f avx512_bf16", "avx512_bf16"),
                                          ("avx512_bf16 amx_tile amx_bf16", "amx_bf16")])
def test_bf16_units_are_read_from_the_cpu_flags(tmp_path, extra, units):
    from vaegan.optim import cpu_bf16_units

    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.format(vendor="GenuineIntel", extra=extra) * 2)  # two processors, as a real file
    assert cpu_bf16_units.__wrapped__(str(info)) == units
    assert cpu_bf16_units.__wrapped__(str(tmp_path / "absent")) is None  # not Linux: no claim


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule; a GPU decides by its own bf16 support")
def test_auto_precision_is_bf16_exactly_where_the_cpu_has_bf16_units(monkeypatch, caplog, tiny):
    import logging

    from vaegan import optim

    for units, expected in ((None, "no"), ("amx_bf16", "bf16")):
        monkeypatch.setattr(optim, "cpu_bf16_units", lambda units=units: units)  # the machine's answer
        with caplog.at_level(logging.INFO, logger="vaegan.optim"):
            assert default_precision("auto") == expected
        assert f"auto -> {'bf16' if expected == 'bf16' else 'fp32'}" in caplog.text
        caplog.clear()
    assert default_precision("no") == "no"  # an explicit choice is never overridden
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --mixed_precision fp16
    assert default_precision("auto") is None  # auto yields to the launcher: Accelerate reads its setting
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what accelerate launch sets when nobody asked
    assert default_precision("auto") == "bf16"  # (units still amx_bf16 here): auto decides
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.undo()
    real = "bf16" if optim.cpu_bf16_units() else "no"
    trainer = vaegan.build_trainer(tiny("train.mixed_precision=auto", "train.max_steps=1"))
    assert trainer.accelerator.mixed_precision == real  # this machine's own answer, end to end


def test_channels_last_trains_to_the_same_weights(tmp_path):
    runs = {}
    for name, extra in (("default", ()), ("nhwc", ("train.channels_last=true",))):
        trainer = vaegan.build_trainer(tiny_config(tmp_path / name, "train.max_steps=4", *extra))
        nhwc = trainer.model.decoder.out.weight.is_contiguous(memory_format=torch.channels_last)
        assert nhwc == (name == "nhwc")  # the layout really changed (4-d conv weights, C > 1)
        trainer.fit()
        runs[name] = _final_weights(tmp_path / name)
    for a, b in zip(runs["default"], runs["nhwc"]):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compiled_players_train_checkpoint_and_resume(tmp_path, backend):
    """Two compiled players, the EMA, a checkpoint and a mid-run resume: the same weights as eager
    training, and checkpoints whose keys do not change (loadable by an eager run)."""
    common = ("train.epochs=3", "train.checkpoint_every=3")
    vaegan.build_trainer(tiny_config(tmp_path / "eager", *common, "train.max_steps=6")).fit()

    from vaegan._compat import reset_accelerate_state

    reset_accelerate_state()
    compiled = (*common, f"train.compile={backend}")
    first = vaegan.build_trainer(tiny_config(tmp_path / "compiled", *compiled, "train.max_steps=3"))
    assert first.model._compiled_call_impl is not None and first.train_step.disc_net._compiled_call_impl is not None
    assert getattr(first.train_step.ema.module, "_compiled_call_impl", None) is None  # the EMA copy stays eager
    first.fit()
    reset_accelerate_state()
    resumed = vaegan.build_trainer(tiny_config(tmp_path / "compiled", *compiled, "train.max_steps=6",
                                               "train.resume=latest"))
    resumed.fit()
    assert resumed.state.step == 6
    ckpt = "checkpoints/step_00000006"
    for f in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "eager" / ckpt / f))
        b = load_file(str(tmp_path / "compiled" / ckpt / f))
        assert a.keys() == b.keys(), f  # no '_orig_mod.' prefixes
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{f}:{key}")
