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
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _data(n: int, size: int = 28) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 1, size, size, generator=g) > 0.8).to(torch.uint8) * 255  # MNIST-like uint8


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_trainer(batch: int, steps: int, warmup: int, precision: str, out_dir: Path, size: int = 28,
                overrides=()) -> dict:
    import vaegan
    from vaegan.config import ExperimentConfig, apply_overrides
    from vaegan.data import TensorImages

    log_every = 10
    cfg = apply_overrides(ExperimentConfig(), [
        f"train.output_dir={out_dir}", f"train.batch_size={batch}", f"train.max_steps={warmup + steps}",
        "train.epochs=1000", f"train.log_every={log_every}", "train.sample_every=0", "train.checkpoint_every=0",
        "train.plot_loss_curves=false",
        f"train.mixed_precision={precision}", f"model.image_size=[{size}, {size}]", *overrides])
    trainer = vaegan.build_trainer(cfg, dataset=TensorImages(_data(batch * 40, size)))
    trainer.fit()
    rows = [r for r in trainer.history if r["step"] > warmup]
    ips = sum(r["images_per_sec"] for r in rows) / len(rows)
    return {"images_per_s": ips, "peak_memory_mb": _peak_memory_mb(trainer.accelerator.device)}


def run_bare(batch: int, steps: int, warmup: int, precision: str, size: int = 28) -> dict:
    """The same work, written by hand: no Accelerate, no registry, no logging."""
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

    step, t0 = 0, None
    while step < warmup + steps:
        for x in loader:
            one_step(x.to(device, non_blocking=True), step)
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
    # FLOPs of one step (both players, forward and backward), counted by torch, outside the timing.
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        one_step(next(iter(loader)).to(device), step)
    flops_per_image = counter.get_total_flops() / batch
    return {"images_per_s": ips, "peak_memory_mb": _peak_memory_mb(device), "flops_per_image": flops_per_image,
            "achieved_tflops": flops_per_image * ips / 1e12}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--steps", type=int, default=100, help="measured steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--repeats", type=int, default=3, help="alternate trainer/bare this many times; report medians")
    p.add_argument("--json", type=Path)
    p.add_argument("--size", type=int, default=28, help="image side (default 28)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides of the trainer")
    p.add_argument("--worker", choices=["trainer", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out-dir", type=Path, default=Path("outputs/throughput"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # one measurement in this process
        if args.worker == "trainer":
            r = run_trainer(args.batch, args.steps, args.warmup, args.precision, args.out_dir, args.size, args.set)
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
        results.append(row)
        sys.stdout.write(json.dumps(row) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
