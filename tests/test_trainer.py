"""The two-player trainer: gradient routing, accumulation, precision, resume, errors.

Each test runs the real trainer (real Accelerate, real torch) on real digits from tests/fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_resume_is_exact
from safetensors.torch import load_file

import vaegan
from vaegan.api import TermInputs
from vaegan.errors import CheckpointError, ConfigError, DataError, PluginError


def _params(module):
    return [p for p in module.parameters()]


def _batch(trainer, n=16):
    from vaegan.data import first_batch

    return first_batch(trainer.loader.dataset, n).to(trainer.accelerator.device)


def test_each_player_gradient_comes_only_from_its_own_loss(tiny):
    """pythae's VAEGAN sums three backward passes, so the decoder's gradient gets -(grad of L_disc)
    and the sign of the adversarial term flips. Here: D's gradient is exactly grad(L_D) on the detached
    fakes, G's is exactly sum_k w_k grad(term_k) with the frozen D, and neither touches the other."""
    cfg = tiny("losses=[{name: bce}, {name: kl, weight: 0.5}, {name: smoothness, weight: 0.3}]",
               "adversarial.weight=0.7")
    trainer = vaegan.build_trainer(cfg)
    gen, disc = trainer.train_step.generator.module, trainer.train_step.discriminator.module
    x = _batch(trainer)

    torch.manual_seed(1)
    out = gen(x, **trainer.train_step.objective.forward_kwargs(x.shape[0]))
    d_state0 = {k: v.clone() for k, v in trainer.train_step.disc_net.state_dict().items()}
    trainer.train_step.discriminator_backward(x, out, 0)
    assert all(p.grad is None for p in _params(gen)), "the D step left gradients in the generator"
    d_grads = [p.grad.clone() for p in _params(disc)]
    assert all(torch.isfinite(g).all() for g in d_grads) and any(g.abs().sum() > 0 for g in d_grads)
    for p in _params(disc):
        p.grad = None

    # Spectral norm's power iteration updates D's buffers at every train-mode forward: snapshot them
    # so the analytic recomputation below sees the very same discriminator.
    d_state = {k: v.clone() for k, v in trainer.train_step.disc_net.state_dict().items()}
    trainer.train_step.generator_backward(x, out, 0)
    assert all(p.grad is None for p in _params(disc)), "the G step left gradients in the discriminator"
    assert all(p.requires_grad for p in _params(disc)), "D must be trainable again after the G step"
    g_grads = {n: p.grad.clone() for n, p in gen.named_parameters() if p.grad is not None}

    # The analytic combination, term by term, on an identical forward (same noise).
    torch.manual_seed(1)
    out2 = gen(x, **trainer.train_step.objective.forward_kwargs(x.shape[0]))
    net = trainer.train_step.disc_net.requires_grad_(False)
    net.load_state_dict(d_state)
    inputs = TermInputs(real=x, output=out2, step=0, value_range=(0.0, 1.0),
                        fake=trainer.train_step.objective.fakes(out2, for_discriminator=False), discriminator=net)
    named = dict(gen.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in named.items()}
    for key, term in trainer.train_step.objective.generator_terms.items():
        w = trainer.train_step.objective.weight(key, 0)
        grads = torch.autograd.grad(term(inputs), list(named.values()), retain_graph=True, allow_unused=True)
        for (n, _), g in zip(named.items(), grads):
            if g is not None:
                expected[n] += w * g
    net.requires_grad_(True)
    assert set(g_grads) == set(named), "every generator parameter gets a gradient"
    for n, g in g_grads.items():
        torch.testing.assert_close(g, expected[n], rtol=1e-4, atol=1e-6, msg=f"generator gradient of {n}")

    # And D's gradient is the gradient of its own loss only, on the detached reconstruction.
    net.load_state_dict(d_state0)
    d_in = TermInputs(real=x, output=out2, step=0, value_range=(0.0, 1.0),
                      fake=trainer.train_step.objective.fakes(out2, for_discriminator=True), discriminator=disc)
    d_loss, _ = trainer.train_step.objective.discriminator_loss(d_in)
    for g, e in zip(d_grads, torch.autograd.grad(d_loss, _params(disc), allow_unused=True)):
        torch.testing.assert_close(g, e if e is not None else torch.zeros_like(g), rtol=1e-4, atol=1e-6)


def test_adversarial_term_pushes_discriminator_logits_up(tiny):
    """The generator's adversarial gradient must raise D(fake) (the sign pythae gets wrong)."""
    cfg = tiny("losses=[{name: mse, weight: 0.0}]", "adversarial.weight=1.0", "optim_g.lr=1e-3")
    trainer = vaegan.build_trainer(cfg)
    x = _batch(trainer)
    net = trainer.train_step.disc_net
    before = net(trainer.model(x).recon).logits.mean().item()
    for _ in range(5):
        out = trainer.train_step.generator.module(x, **trainer.train_step.objective.forward_kwargs(x.shape[0]))
        trainer.train_step.generator_backward(x, out, 0)
        trainer.train_step.generator.optimizer.step()
        trainer.train_step.generator.optimizer.zero_grad()
    with torch.no_grad():
        torch.manual_seed(0)
        after = net(trainer.model(x).recon).logits.mean().item()
    assert after > before


@pytest.mark.parametrize("train_encoder", [False, True])
def test_gan_gradient_reaches_the_encoder_only_when_configured(tiny, train_encoder):
    """Larsen et al.: the adversarial loss trains the decoder, not the encoder (unless asked)."""
    trainer = vaegan.build_trainer(tiny("losses=[{name: mse, weight: 0.0}]", "adversarial.weight=1.0",
                                        "adversarial.fake=both",  # reconstructions are what reach the encoder
                                        f"adversarial.train_encoder={str(train_encoder).lower()}"))
    x = _batch(trainer)
    step = trainer.train_step
    step.generator_backward(x, step.generator.module(x, **step.objective.forward_kwargs(x.shape[0])), 0)
    enc = [p.grad for p in trainer.model.encoder.parameters()]
    dec = [p.grad for p in trainer.model.decoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in dec)
    reached = any(g is not None and g.abs().sum() > 0 for g in enc)
    assert reached == train_encoder


@pytest.mark.parametrize("fake", ["reconstruction", "prior", "both", "aggregate"])
def test_fake_sources(tiny, fake):
    trainer = vaegan.build_trainer(tiny(f"adversarial.fake={fake}", "train.max_steps=2"))
    x = _batch(trainer)
    out = trainer.train_step.generator.module(x, **trainer.train_step.objective.forward_kwargs(x.shape[0]))
    d_fake = trainer.train_step.objective.fakes(out, for_discriminator=True)
    assert d_fake.shape[0] == (2 * x.shape[0] if fake == "both" else x.shape[0]) and not d_fake.requires_grad
    assert trainer.train_step.objective.fakes(out, for_discriminator=False).requires_grad
    trainer.fit()
    assert trainer.history and all(torch.isfinite(torch.tensor(v)) for v in trainer.history[-1].values())


def test_aggregate_fakes_decode_a_kernel_density_of_the_batchs_posterior_means(tiny):
    """adversarial.fake: aggregate: latents near the batch's posterior means (where a fitted sampler draws),
    spread by the bandwidth, with no gradient to the encoder."""
    trainer = vaegan.build_trainer(tiny("adversarial.fake=aggregate", "adversarial.bandwidth=0.0",
                                        "losses=[{name: mse, weight: 0.0}]", "adversarial.weight=1.0"))
    x = _batch(trainer)
    model = trainer.model
    out = model(x, num_aggregate=5, bandwidth=0.0)
    with torch.no_grad():
        means = model.encode(x).mean
        decoded = model.decode(means)  # every bandwidth-0 draw is exactly one of the batch's posterior means
    for image in out.aggregate_samples.detach():
        assert min(float((image - d).abs().max()) for d in decoded) < 1e-5
    wide = model(x, num_aggregate=400, bandwidth=1.0).aggregate_samples
    assert wide.shape == (400, *x.shape[1:])
    step = trainer.train_step
    step.generator_backward(x, step.generator.module(x, **step.objective.forward_kwargs(x.shape[0])), 0)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


def test_adaptive_weight_is_logged_finite_and_matches_the_gradient_ratio(tiny):
    from vaegan.objective import adaptive_weight

    trainer = vaegan.build_trainer(tiny("adversarial.adaptive=true", "adversarial.weight=0.5", "train.max_steps=2"))
    trainer.fit()
    assert all(0 <= row["g/adaptive_weight"] < 1e4 for row in trainer.history)
    # known answer: gradients (2, 2, 2) and (1, 1, 1) at a (3,) leaf -> 2 sqrt(3) / (sqrt(3) + eps)
    w = torch.ones(3, requires_grad=True)
    root3 = 3 ** 0.5
    assert float(adaptive_weight((2 * w).sum(), w.sum(), w, eps=1e-4)) == pytest.approx(2 * root3 / (root3 + 1e-4))
    # zero adversarial gradient: finite, clamped
    assert float(adaptive_weight((2 * w).sum(), (0 * w).sum(), w, eps=1e-4, max_weight=100.0)) == 100.0
    assert float(adaptive_weight(w.sum() * float("nan"), w.sum(), w)) == 0.0  # non-finite -> skip


def test_accumulate_is_entered_once_per_micro_batch(tiny):
    # 64 images / 16 = 4 micro-batches per epoch; with grad_accum=2 that is 2 updates of *each* player.
    trainer = vaegan.build_trainer(tiny("train.grad_accum=2", "train.epochs=1"))
    trainer.fit()
    assert trainer.state.step == 2
    for opt in (trainer.train_step.generator.optimizer, trainer.train_step.discriminator.optimizer):
        steps = {int(s["step"]) for s in opt.optimizer.state.values()}
        assert steps == {2}, f"optimizer stepped {steps} times"


def test_loss_term_parameters_are_trained_and_checkpointed(tiny):
    cfg = tiny("losses=[{name: gaussian_nll, options: {init_logvar: 0.0}}, {name: kl}]", "train.max_steps=4")
    trainer = vaegan.build_trainer(cfg)
    logvar = trainer.train_step.objective.generator_terms["gaussian_nll"].logvar
    assert any(logvar is p for g in trainer.train_step.generator.optimizer.param_groups for p in g["params"]), "not in the optimizer"
    trainer.fit()
    assert logvar.item() != 0.0, "the learned log-variance never moved"
    ckpt = sorted((Path(cfg.train.output_dir) / "checkpoints").iterdir())[-1]
    saved = load_file(str(ckpt / "model.safetensors"))
    assert torch.equal(saved["terms.gaussian_nll.logvar"], logvar.detach().cpu())


def test_discriminator_trains_before_the_adversarial_term_starts(tiny):
    """taming/LDM never train D before disc_start; here D may start first, and until the adversarial
    weight is on, the generator never calls D (no wasted forward/backward through it)."""
    cfg = tiny("adversarial.weight={value: 0.1, start: 3}", "adversarial.disc_start=1", "train.max_steps=3")
    trainer = vaegan.build_trainer(cfg)
    assert not trainer.train_step.objective.discriminator_active(0) and trainer.train_step.objective.discriminator_active(1)
    assert not trainer.train_step.objective.generator_uses_discriminator(2)
    assert trainer.train_step.objective.generator_uses_discriminator(3)
    d0 = [p.detach().clone() for p in trainer.train_step.disc_net.parameters()]
    trainer.fit()
    assert any(not torch.equal(a, b) for a, b in zip(d0, trainer.train_step.disc_net.parameters()))
    history = [json.loads(l) for l in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert "g/adversarial" not in history[0], "the adversarial term ran before its start"


@pytest.mark.parametrize("overrides", [
    ("discriminator=null", "adversarial=null"),  # the plain VAE baseline
    ("model.name=mlp", "model.options={hidden: [32], latent_dim: 4}"),
    ("model.name=tiny_spatial",),  # a spatial latent (B, c, h, w): tests/spatial_generator.py
    ("model.output_range=symmetric",),
])
def test_variants_train(tiny, overrides):
    cfg = tiny("train.max_steps=3", *overrides)
    final = vaegan.build_trainer(cfg).fit()
    model = vaegan.VAE.from_pretrained(final)
    assert torch.isfinite(model.sample(4)).all()


def test_bf16_keeps_fp32_master_weights(tiny):
    """diffusers casts trainable weights to half after prepare ("Attempting to unscale FP16
    gradients"); here autocast does the low precision and the weights stay fp32."""
    trainer = vaegan.build_trainer(tiny("train.mixed_precision=bf16", "train.max_steps=3"))
    trainer.fit()
    assert trainer.accelerator.mixed_precision == "bf16"
    for module in (trainer.train_step.generator.module, trainer.train_step.discriminator.module):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    last = trainer.history[-1]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in last.items() if "/" in k)


def test_outputs_of_a_run(tiny):
    cfg = tiny("train.max_steps=4", "train.sample_every=2", "train.checkpoint_every=2",
               "train.checkpoints_total_limit=1")
    final = vaegan.build_trainer(cfg).fit()
    out = Path(cfg.train.output_dir)
    assert (out / "samples" / "step_00000002_reconstructions.png").is_file()
    assert (out / "samples" / "final_samples.png").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000004"]  # rotation kept 1
    assert vaegan.load_config(out / "config.yaml") == cfg  # the resolved config, reloadable
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"g/bce", "g/kl", "g/adversarial", "d/discriminator", "grad_norm/g", "grad_norm/d", "lr/g",
            "weight/kl", "images_per_sec", "d/logits_real", "d/logits_fake"} <= set(rows[-1])
    ema, raw = vaegan.VAE.from_pretrained(final), vaegan.VAE.from_pretrained(final / "raw")
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), raw.parameters()))


def test_resume_mid_epoch_equals_uninterrupted(tmp_path):
    """Stop at step 6 (mid-epoch: 4 batches per epoch), resume with --resume latest, and end with
    exactly the weights of an uninterrupted run (both players, the EMA)."""
    assert_resume_is_exact(tmp_path, ("train.epochs=3", "train.checkpoint_every=3"), stop_at=6)


def test_bad_input_is_refused_before_training(tiny, tmp_path):
    with pytest.raises(DataError, match="expects"):
        vaegan.build_trainer(tiny("model.image_size=[32, 32]"))
    with pytest.raises(DataError, match="batch"):
        vaegan.build_trainer(tiny("train.batch_size=128"))
    with pytest.raises(PluginError, match="mse"):  # the message lists what is installed
        vaegan.build_trainer(tiny("losses=[{name: msee}]"))
    with pytest.raises(ConfigError, match="option"):
        vaegan.build_trainer(tiny("losses=[{name: kl, options: {free_bitz: 1}}]"))
    with pytest.raises(ConfigError, match="at least"):
        vaegan.build_trainer(tiny("discriminator.options={channels: [8, 8, 8, 8, 8]}"))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        vaegan.build_trainer(tiny("train.resume=latest")).fit()
    assert not (tmp_path / "run" / "final").exists()


# ---- the step, the loop's hooks, injected components --------------------------------------------------


def test_the_step_returns_device_metrics_at_the_accumulation_boundary_only(tiny):
    trainer = vaegan.build_trainer(tiny("train.grad_accum=2"))
    step = trainer.train_step
    x = _batch(trainer)
    assert step(x, 0) is None  # mid-accumulation: gradients add up, nothing is updated
    out = step(x, 0)
    assert isinstance(out, vaegan.StepOutput) and out.found_inf.ndim == 0 and float(out.found_inf) == 0.0
    assert {"g/total", "g/bce", "d/total", "grad_norm/g", "grad_norm/d", "d/logits_real"} <= set(out.metrics)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and v.device == x.device for v in out.metrics.values())
    for player in (step.generator, step.discriminator):
        assert {int(s["step"]) for s in player.optimizer.optimizer.state.values()} == {1}


def test_callbacks_see_every_point_of_the_loop_and_can_stop_it(tiny):
    class Recorder(vaegan.Callback):
        def __init__(self):
            self.calls = []

        def on_train_start(self, trainer):
            self.calls.append(("start", trainer.state.step))

        def on_batch_start(self, trainer, batch):
            self.calls.append(("batch", tuple(batch.shape)))

        def on_batch_end(self, trainer, output):
            self.calls.append(("batch_end", output is None))

        def on_step_end(self, trainer, output):
            self.calls.append(("step", trainer.state.step))
            if trainer.state.step == 3:
                trainer.stop()

        def on_log(self, trainer, metrics):
            self.calls.append(("log", trainer.state.step, "g/total" in metrics))

        def on_train_end(self, trainer, final_dir):
            self.calls.append(("end", final_dir.name))

    recorder = Recorder()
    trainer = vaegan.build_trainer(tiny("train.max_steps=8", "train.log_every=2", "train.grad_accum=2"),
                                   callbacks=[recorder])
    final = trainer.fit()
    assert trainer.state.step == 3 and (final / "model.safetensors").is_file()  # stop() ends like max_steps
    assert recorder.calls[0] == ("start", 0) and recorder.calls[-1] == ("end", "final")
    assert [c for c in recorder.calls if c[0] == "batch"] == [("batch", (16, 1, 28, 28))] * 6  # 2 per step
    assert [c[1] for c in recorder.calls if c[0] == "batch_end"] == [True, False] * 3
    assert [c for c in recorder.calls if c[0] in ("step", "log")] == [
        ("step", 1), ("log", 2, True), ("step", 2), ("step", 3), ("log", 3, True)]  # the tail is logged too
    with pytest.raises(TypeError, match="Callback"):
        vaegan.build_trainer(tiny("train.overwrite=true"), callbacks=[object()])


def test_every_component_can_be_built_apart_and_injected(tiny):
    """The factory's pieces, assembled by hand with a dataset that is not a plugin: the trainer is the loop."""
    from vaegan.data import TensorImages
    from vaegan.factory import build_accelerator, build_components

    cfg = tiny("train.max_steps=2")
    images = TensorImages(torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8))
    accelerator = build_accelerator(cfg.train)
    parts = build_components(cfg, vaegan.build_generator(cfg.model), vaegan.Objective.from_config(cfg), images,
                             vaegan.build_discriminator(cfg), accelerator)
    assert parts.train_step.accelerator is accelerator and parts.loader.dataset is images
    trainer = vaegan.Trainer(cfg, parts.train_step, parts.loader, parts.total_steps)
    assert trainer.total_steps == 2 and trainer.fit().is_dir()


@pytest.mark.parametrize("env, local, setting, expected", [
    ({"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}, 1, None, "cores"),  # accelerate's default: replaced
    ({"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}, 2, None, "half"),  # shared by the node's processes
    ({"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "3"}, 1, None, None),  # a choice: respected
    ({"OMP_NUM_THREADS": "1"}, 2, None, None),  # torchrun's default or the user's: respected
    ({}, 1, None, None),  # plain python: torch's own default
    ({"ACCELERATE_DYNAMO_BACKEND": "NO", "OMP_NUM_THREADS": "1"}, 1, 1, 1),  # train.cpu_threads wins
])
def test_cpu_threads_replace_only_accelerates_default(env, local, setting, expected):
    from vaegan.config import TrainConfig
    from vaegan.factory import cpu_threads, usable_cores

    cores = usable_cores()
    want = {"cores": cores, "half": max(1, cores // 2)}.get(expected, expected)
    assert cpu_threads(TrainConfig(cpu_threads=setting), local, env) == want
