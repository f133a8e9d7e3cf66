"""Throughput benchmark: vaegan's trainer against a bare hand-written PyTorch loop.

Both run the recipe's default model and losses (conv VAE, BCE + KL + non-saturating GAN with the
'simple' discriminator judging prior samples, fused AdamW for both players, gradient clipping, EMA) on
the same in-memory MNIST-sized data: per batch one generator
forward, the discriminator's and the generator's backward at the same weights, then both updates. Each measurement
runs in its own subprocess (so peak memory is its own) and reports images/s after a warm-up, the
peak resident memory (CPU) or peak allocated memory (GPU), and the FLOPs of one step counted by
``torch.utils.flop_counter`` (so achieved TFLOP/s = FLOPs/image x images/s, to set against the
device's peak).

    python benchmarks/throughput.py                       # batch 64 and 256, fp32, CPU
    python benchmarks/throughput.py --precision bf16      # on a GPU (or bf16 autocast on CPU)
    python benchmarks/throughput.py --batch-sizes 64 --steps 60 --json out.json

``--model spatial`` measures the same for a spatial-latent autoencoder: ``autoencoder_kl`` with f = 4
(``--widths``, default 32 64 128, 2 residual blocks per level: the widths of
``benchmarks/spatial_quality.py``) on random RGB images (``--size``, default 32) in memory, with the
``ldm_kl_f4`` recipe's objective minus LPIPS: L1 + KL 1e-6 + the PatchGAN (3 layers, 64 filters,
GroupNorm) with the hinge loss and VQGAN's adaptive weight, on from the first step, the discriminator
judging reconstructions and the generator's adversarial gradient reaching the decoder only (one decoder
pass over ``[z, z.detach()]``); both players, EMA, clipping, fused AdamW, as the trainer runs the recipe.

    python benchmarks/throughput.py --model spatial --batch-sizes 16 --steps 40 --warmup 10   # CPU
    python benchmarks/throughput.py --model spatial --size 64 --batch-sizes 64 --precision bf16  # GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine import DEFAULTS_0_2  # noqa: E402  (run as a script from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]


def _data(n: int, size: int = 28) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 1, size, size, generator=g) > 0.8).to(torch.uint8) * 255  # MNIST-like uint8


def _rgb_data(n: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


SPATIAL_WIDTHS = (32, 64, 128)


def spatial_config(size: int, widths=SPATIAL_WIDTHS, layers: int = 2):
    """The ldm_kl_f4 recipe at ``size`` with ``widths``, without LPIPS, the GAN on from step 0."""
    from vaegan.config import load_config

    return load_config(ROOT / "recipes" / "configs" / "ldm_kl_f4.yaml", [
        f"model.image_size=[{size}, {size}]", f"model.options.block_out_channels={list(widths)}",
        f"model.options.layers_per_block={layers}", "losses=[{name: l1}, {name: kl, weight: 1.0e-6}]",
        "adversarial.weight={value: 0.5}", "data.num_workers=0"])


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_trainer(batch: int, steps: int, warmup: int, precision: str, out_dir: Path, size: int = 28,
                overrides=(), model: str = "mnist", widths=SPATIAL_WIDTHS) -> dict:
    import vaegan
    from vaegan.config import ExperimentConfig, apply_overrides
    from vaegan.data import TensorImages

    log_every = 10
    shutil.rmtree(out_dir, ignore_errors=True)  # scratch: a rerun replaces it (a run refuses a folder that holds one)
    if model == "spatial":
        cfg = apply_overrides(spatial_config(size, widths), [
            f"train.output_dir={out_dir}", f"train.batch_size={batch}", f"train.max_steps={warmup + steps}",
            "train.epochs=1000", f"train.log_every={log_every}", "train.sample_every=0", "train.checkpoint_every=0",
            "train.plot_loss_curves=false", f"train.mixed_precision={precision}", *overrides])
        trainer = vaegan.build_trainer(cfg, dataset=TensorImages(_rgb_data(batch * 40, size), cfg.model.value_range))
        trainer.fit()
        rows = [r for r in trainer.history if r["step"] > warmup]
        ips = sum(r["images_per_sec"] for r in rows) / len(rows)
        return {"images_per_s": ips, "peak_memory_mb": _peak_memory_mb(trainer.accelerator.device)}
    cfg = apply_overrides(ExperimentConfig(), [*DEFAULTS_0_2,  # the step the bare loop below mirrors
        f"train.output_dir={out_dir}", f"train.batch_size={batch}", f"train.max_steps={warmup + steps}",
        "train.epochs=1000", f"train.log_every={log_every}", "train.sample_every=0", "train.checkpoint_every=0",
        "train.plot_loss_curves=false",
        f"train.mixed_precision={precision}", f"model.image_size=[{size}, {size}]", *overrides])
    trainer = vaegan.build_trainer(cfg, dataset=TensorImages(_data(batch * 40, size)))
    trainer.fit()
    rows = [r for r in trainer.history if r["step"] > warmup]
    ips = sum(r["images_per_sec"] for r in rows) / len(rows)
    return {"images_per_s": ips, "peak_memory_mb": _peak_memory_mb(trainer.accelerator.device)}


def run_bare_spatial(batch: int, steps: int, warmup: int, precision: str, size: int = 32,
                     widths=SPATIAL_WIDTHS, after_step=None) -> dict:
    """The spatial model's step written by hand (no Accelerate, no registry, no logging): one generator
    forward decoding ``[z, z.detach()]``, the discriminator's hinge loss on real images and detached
    reconstructions, the generator's L1 + KL + adaptive-weighted hinge term (discriminator frozen), both
    clipped, both fused AdamW steps, EMA. ``after_step()`` is called after each step (a profiler's hook)."""
    import torch.nn.functional as F
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from torch.utils.data import DataLoader
    from vaegan_plugins.autoencoder_kl import AutoencoderKL
    from vaegan_plugins.patchgan import PatchGAN

    from vaegan.data import TensorImages

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    cfg = spatial_config(size, widths)
    mo, do, opt_g, opt_d = cfg.model.options, cfg.discriminator.options, cfg.optim_g, cfg.optim_d
    kl_weight, adv_weight = cfg.losses[1].weight.value, cfg.adversarial.weight.value
    torch.manual_seed(0)
    vae = AutoencoderKL((3, size, size), "symmetric", **dict(mo)).to(device)
    disc = PatchGAN((3, size, size), **dict(do)).to(device)
    g_opt = torch.optim.AdamW(vae.parameters(), lr=opt_g.lr, betas=opt_g.betas, weight_decay=0.0, fused=True)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=opt_d.lr, betas=opt_d.betas, weight_decay=0.0, fused=True)
    ema = AveragedModel(vae, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
    loader = DataLoader(TensorImages(_rgb_data(batch * 40, size), (-1.0, 1.0)), batch_size=batch, shuffle=True,
                        drop_last=True)
    last = vae.decoder.conv_out.weight

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def grad_norm(loss: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(loss, last, retain_graph=True)
        return torch.linalg.vector_norm(g.float())

    def one_step(x: torch.Tensor, step: int) -> None:
        with autocast():
            out = vae(x, decoder_only=True)
            real, fake = disc(x).logits.float(), disc(out.recon.detach()).logits.float()
            d_loss = F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
        d_loss.backward()
        disc.requires_grad_(False)
        with autocast():
            l1 = F.l1_loss(out.recon.float(), x.float())
            kl = out.posterior.kl()  # (B, c, h, w): per channel, mean over batch and positions, summed
            kl = kl.mean(dim=(0, 2, 3)).sum() * kl[0, 0].numel() / x[0].numel()
            rec = l1 + kl_weight * kl
            adv = -disc(out.recon_decoder_only).logits.float().mean()
            ratio = grad_norm(rec) / (grad_norm(adv) + 1e-4)
            w = torch.where(torch.isfinite(ratio), ratio.clamp(0.0, 1e4), torch.zeros_like(ratio)).detach()
            g_loss = rec + adv_weight * w * adv
        g_loss.backward()
        disc.requires_grad_(True)
        for net, opt, clip in ((disc, d_opt, opt_d.grad_clip), (vae, g_opt, opt_g.grad_clip)):
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        ema.update_parameters(vae)

    return _time_loop(one_step, loader, device, batch, steps, warmup, after_step)


def _time_loop(one_step, loader, device: torch.device, batch: int, steps: int, warmup: int, after_step=None) -> dict:
    """Run ``warmup + steps`` steps, time the last ``steps``, then count one step's FLOPs (not timed)."""
    step, t0 = 0, None
    while step < warmup + steps:
        for x in loader:
            one_step(x.to(device, non_blocking=True), step)
            if after_step is not None:
                after_step()
            step += 1
            if step == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            if step >= warmup + steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    ips = steps * batch / (time.perf_counter() - t0)
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        one_step(next(iter(loader)).to(device), step)
    flops_per_image = counter.get_total_flops() / batch
    return {"images_per_s": ips, "peak_memory_mb": _peak_memory_mb(device), "flops_per_image": flops_per_image,
            "achieved_tflops": flops_per_image * ips / 1e12}


def run_bare(batch: int, steps: int, warmup: int, precision: str, size: int = 28, after_step=None) -> dict:
    """The same work, written by hand: no Accelerate, no registry, no logging (``after_step()`` is called
    after each step: a profiler's hook)."""
    import torch.nn.functional as F
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from torch.utils.data import DataLoader

    from vaegan import ModelConfig, build_generator
    from vaegan.data import TensorImages
    from vaegan.discriminators import SimpleDiscriminator

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    torch.manual_seed(0)
    vae = build_generator(ModelConfig(image_size=(size, size))).to(device)
    disc = SimpleDiscriminator((1, size, size)).to(device)
    g_opt = torch.optim.AdamW(vae.parameters(), lr=2e-4, betas=(0.5, 0.9), weight_decay=0.0, fused=True)
    d_opt = torch.optim.AdamW(disc.parameters(), lr=2e-4, betas=(0.5, 0.9), weight_decay=0.0, fused=True)
    ema = AveragedModel(vae, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    loader = DataLoader(TensorImages(_data(batch * 40, size)), batch_size=batch, shuffle=True, drop_last=True)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def one_step(x: torch.Tensor, step: int) -> None:
        with autocast():
            out = vae(x, num_prior=x.shape[0])
            real, fake = disc(x).logits.float(), disc(out.prior_samples.detach()).logits.float()
            d_loss = F.softplus(-real).mean() + F.softplus(fake).mean()
        d_loss.backward()
        disc.requires_grad_(False)
        with autocast():
            bce = F.binary_cross_entropy_with_logits(out.recon_logits.float(), x.float())
            kl = out.posterior.kl().mean(0).sum() / x[0].numel()
            adv = F.softplus(-disc(out.prior_samples).logits.float()).mean()
            g_loss = bce + min(1.0, step / 1000) * kl + 0.05 * adv
        g_loss.backward()
        disc.requires_grad_(True)
        for net, opt in ((disc, d_opt), (vae, g_opt)):
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        ema.update_parameters(vae)

    return _time_loop(one_step, loader, device, batch, steps, warmup, after_step)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["mnist", "spatial"], default="mnist",
                   help="mnist: the recipe's conv VAE-GAN (default); spatial: autoencoder_kl f4 with the PatchGAN")
    p.add_argument("--widths", type=int, nargs="+", default=list(SPATIAL_WIDTHS),
                   help="--model spatial: block_out_channels (default 32 64 128; 3 levels: f = 4)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="default 64 256 (mnist), 16 64 (spatial)")
    p.add_argument("--steps", type=int, default=100, help="measured steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--repeats", type=int, default=3, help="alternate trainer/bare this many times; report medians")
    p.add_argument("--json", type=Path)
    p.add_argument("--size", type=int, default=None, help="image side (default 28; 32 with --model spatial)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides of the trainer")
    p.add_argument("--worker", choices=["trainer", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", type=Path, default=Path("outputs/throughput"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    spatial = args.model == "spatial"
    if args.size is None:
        args.size = 32 if spatial else 28
    if args.batch_sizes is None:
        args.batch_sizes = [16, 64] if spatial else [64, 256]
    if args.worker:  # one measurement in this process
        if args.worker == "trainer":
            r = run_trainer(args.batch, args.steps, args.warmup, args.precision, args.out_dir, args.size, args.set,
                            args.model, args.widths)
        elif spatial:
            r = run_bare_spatial(args.batch, args.steps, args.warmup, args.precision, args.size, args.widths)
        else:
            r = run_bare(args.batch, args.steps, args.warmup, args.precision, args.size)
        sys.stdout.write(json.dumps(r) + "\n")
        return 0
    results = []
    for batch in args.batch_sizes:
        runs = {"trainer": [], "bare": []}
        for _ in range(args.repeats):
            for kind in ("bare", "trainer"):  # alternate, so drift in machine load hits both alike
                cmd = [sys.executable, __file__, "--worker", kind, "--batch", str(batch), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--precision", args.precision, "--size", str(args.size),
                       "--out-dir", str(args.out_dir / f"b{batch}")]
                if spatial:
                    cmd += ["--model", "spatial", "--widths", *map(str, args.widths)]
                if kind == "trainer" and args.set:  # the bare loop is the default recipe only
                    cmd += ["--set", *args.set]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
                runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {k: sorted(r["images_per_s"] for r in v)[len(v) // 2] for k, v in runs.items()}
        mem = {k: max(r["peak_memory_mb"] for r in v) for k, v in runs.items()}
        bare_flops = runs["bare"][0]["flops_per_image"]
        row = {"batch": batch, "size": args.size, "precision": args.precision, "set": args.set,
               "gflops_per_image": bare_flops / 1e9, "trainer_achieved_tflops": bare_flops * med["trainer"] / 1e12,
               "trainer_images_per_s": med["trainer"], "bare_images_per_s": med["bare"], "overhead_pct": 100 * (med["bare"] / med["trainer"] - 1),
               "trainer_peak_mb": mem["trainer"], "bare_peak_mb": mem["bare"], "repeats": args.repeats}
        if spatial:
            row = {"model": "spatial autoencoder_kl f4", "widths": args.widths, **row,
                   "trainer_runs_images_per_s": [r["images_per_s"] for r in runs["trainer"]],
                   "bare_runs_images_per_s": [r["images_per_s"] for r in runs["bare"]]}
        results.append(row)
        sys.stdout.write(json.dumps(row) + "\n")
        if spatial:
            sys.stdout.write(f"spatial f4 {args.size}x{args.size}, batch {batch}, {args.precision}: trainer "
                             f"{med['trainer']:.1f} vs bare loop {med['bare']:.1f} images/s (median of {args.repeats}), "
                             f"trainer overhead {row['overhead_pct']:.1f}%, peak memory {mem['trainer']:.0f} / "
                             f"{mem['bare']:.0f} MB\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
