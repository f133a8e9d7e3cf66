"""Training speed, memory and numerical health of a Stable-Diffusion-size KL autoencoder in vaegan's trainer.

The generator is ``autoencoder_kl`` in SD's configuration (block_out_channels 128 256 512 512, 2 residual
blocks per level, 4 latent channels, attention in the middle block: f = 8, 83.7M parameters) on 256x256
RGB images; the objective is latent diffusion's first stage without LPIPS: L1 + KL 1e-6 + a PatchGAN
(3 layers, 64 filters, GroupNorm) with the hinge loss and VQGAN's adaptive weight, on from the first step,
the discriminator judging reconstructions. Both players, EMA, gradient clipping and fused AdamW run
through ``vaegan.build_trainer(...).fit()``, the real trainer, on synthetic images held in memory
(smooth random colour fields with detail at three scales and pixel noise, seeded; no files are read).

Each precision runs in its own process (so peak memory is its own, and one failing precision does not
take the others with it) and reports:

- images/s over the steps after ``--warmup`` (from the trainer's log, one host sync per ``log_every``);
- peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the peak resident set size on the CPU;
- numerical health over every step: how many steps the step guard skipped for a non-finite loss or
  gradient (both players' update skipped; with fp16, GradScaler's calibration steps, whose scaled
  gradients overflow, are such skips: they show as non-finite gradient norms with finite losses), whether
  every per-step loss was finite, whether the generator, discriminator and EMA weights are all finite at
  the end, and fp16's final loss scale (the grad scaler Accelerate creates);
- on a GPU, the FLOPs of one step (``torch.utils.flop_counter``, not timed) and so the achieved TFLOP/s.

On a GPU (``--device cuda``, the default where one is present): batch 8, fp32 (TF32 on, the trainer's
default), bf16 and fp16, ``--steps 200``; each precision is also capped at ``--max-seconds`` (default
100 s) of training, so the whole run stays within about 8 minutes. On the CPU: batch 2, fp32, 3 steps
(about 1-3 minutes on 2 cores).

    python benchmarks/sd_vae_speed.py --device cuda --json outputs/sd_vae_speed.json          # GPU
    python benchmarks/sd_vae_speed.py --device cpu                                            # 3 steps, batch 2
    python benchmarks/sd_vae_speed.py --device cpu --size 64 --widths 32 64 64 64 --steps 2    # smoke run

Prints a markdown table and writes ``--json``. Run from anywhere: vaegan is imported from this checkout
when it is not installed (its plugins are then registered from ``setup.cfg``), and scratch output goes
to ``outputs/sd_vae_speed/`` in the repository (deleted after each precision unless ``--keep``).
"""

from __future__ import annotations

import argparse
import configparser
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_model, gpu_name, usable_cores  # noqa: E402  (run as a script from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
SD_WIDTHS = (128, 256, 512, 512)
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


# ---- vaegan, installed or from this checkout -------------------------------------------------------------
def ensure_vaegan() -> str:
    """Import vaegan; when it is not installed, from this checkout, with setup.cfg's plugins registered."""
    try:
        import vaegan  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import vaegan  # noqa: F401
    from vaegan import registry

    if "autoencoder_kl" in registry.available("vaegan.generators") and "l1" in registry.available("vaegan.losses"):
        return "installed"
    import importlib.util

    if "vaegan_plugins" not in sys.modules:  # plugins/ installs as vaegan_plugins
        spec = importlib.util.spec_from_file_location("vaegan_plugins", ROOT / "plugins" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "plugins")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["vaegan_plugins"] = module
        spec.loader.exec_module(module)
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    for group in registry.GROUPS:
        for line in cfg.get("options.entry_points", group, fallback="").splitlines():
            name, sep, value = line.partition("=")
            if sep:
                registry.register(group, name.strip(), value.strip())
    return "from the checkout (not installed)"


# ---- data and config ---------------------------------------------------------------------------------------
def synthetic_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` uint8 RGB images (n, 3, size, size): colour fields with detail at three scales, plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, size, size)
    for res, amp in ((4, 0.8), (16, 0.35), (64, 0.15)):  # shapes, mid-scale detail, texture
        r = min(res, size)
        x += amp * F.interpolate(torch.randn(n, 3, r, r, generator=g), size=(size, size), mode="bicubic",
                                 align_corners=False)
    x = torch.tanh(x + 0.03 * torch.randn(n, 3, size, size, generator=g))
    return x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def build_config(args, precision: str, out_dir: Path):
    from vaegan.config import ExperimentConfig

    return ExperimentConfig.from_dict({
        "model": {"name": "autoencoder_kl", "image_channels": 3, "image_size": [args.size, args.size],
                  "output_range": "symmetric",
                  "options": {"block_out_channels": list(args.widths), "layers_per_block": args.layers,
                              "latent_channels": args.latent_channels, "norm_num_groups": 32,
                              "mid_block_add_attention": True}},
        "losses": [{"name": "l1"}, {"name": "kl", "weight": 1.0e-6}],
        "discriminator": {"name": "patchgan", "options": {"n_layers": 3, "base_width": 64, "norm": "group"}},
        "adversarial": {"name": "hinge", "weight": 0.5, "disc_start": 0, "fake": "reconstruction", "adaptive": True},
        "optim_g": {"lr": 1.0e-4, "betas": [0.5, 0.9], "grad_clip": 1.0},
        "optim_d": {"lr": 1.0e-4, "betas": [0.5, 0.9], "grad_clip": 1.0},
        "train": {"output_dir": str(out_dir), "epochs": 100000, "max_steps": args.steps, "batch_size": args.batch,
                  "mixed_precision": PRECISIONS[precision], "seed": 0, "ema_decay": 0.999, "log_every": args.log_every,
                  "sample_every": 0, "checkpoint_every": 0, "num_samples": 2, "plot_loss_curves": False,
                  "report_to": "none"},
        "eval": {"classifier": False},
    })


# ---- one precision (worker process) ----------------------------------------------------------------------
def run_one(args, precision: str) -> Dict[str, object]:
    how = ensure_vaegan()
    import vaegan
    from vaegan.data import TensorImages
    from vaegan.errors import TrainingDiverged

    out_dir = ROOT / "outputs" / "sd_vae_speed" / precision
    if out_dir.exists():
        shutil.rmtree(out_dir)
    cfg = build_config(args, precision, out_dir)

    class Watch(vaegan.Callback):
        """Per-step flags kept on the device (no host sync), read once at the end; the time cap."""

        def __init__(self) -> None:
            self.skips: List[torch.Tensor] = []
            self.finite: List[torch.Tensor] = []  # every loss term (and D logit statistic) of the step
            self.grads_finite: List[torch.Tensor] = []  # both gradient norms (fp16 overflows show here)
            self.t0 = 0.0

        def on_train_start(self, trainer) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, trainer, output) -> None:
            self.skips.append(output.found_inf.detach().reshape(()))
            losses = [v for k, v in output.metrics.items() if not k.startswith("grad_norm/")]
            grads = [v for k, v in output.metrics.items() if k.startswith("grad_norm/")]
            self.finite.append(torch.stack([torch.isfinite(v).all() for v in losses]).all())
            self.grads_finite.append(torch.stack([torch.isfinite(v).all() for v in grads]).all() if grads
                                     else torch.ones((), dtype=torch.bool, device=output.found_inf.device))
            if args.max_seconds and time.perf_counter() - self.t0 > args.max_seconds:
                trainer.stop()

    watch = Watch()
    data = TensorImages(synthetic_images(max(args.batch * 8, 16), args.size), cfg.model.value_range)
    trainer = vaegan.build_trainer(cfg, callbacks=[watch], dataset=data)
    device = trainer.accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    diverged: Optional[str] = None
    t0 = time.perf_counter()
    try:
        trainer.fit()
    except TrainingDiverged as exc:
        diverged = str(exc).split(". ")[0]
    wall = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        peak_kind = "cuda max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_kind = "peak RSS"
    rows = [r for r in trainer.history if r["step"] > args.warmup]
    measured = sum(r["images_per_sec"] for r in rows) / len(rows) if rows else None
    skipped = torch.stack(watch.skips).cpu() if watch.skips else torch.zeros(0)
    finite_steps = torch.stack(watch.finite).cpu() if watch.finite else torch.zeros(0, dtype=torch.bool)
    grads_finite = torch.stack(watch.grads_finite).cpu() if watch.grads_finite else torch.zeros(0, dtype=torch.bool)
    skipped_at = [int(i) + 1 for i in torch.nonzero(skipped > 0).flatten().tolist()]
    nets = {"generator": trainer.model, "discriminator": trainer.train_step.disc_net, "ema": trainer.ema_model}
    weights_finite = {k: bool(all(torch.isfinite(p).all() for p in m.parameters())) for k, m in nets.items() if m is not None}
    scaler = trainer.accelerator.scaler
    last = trainer.history[-1] if trainer.history else {}
    result: Dict[str, object] = {
        "precision": precision, "accelerate_mixed_precision": trainer.accelerator.mixed_precision,
        "device": str(device), "batch": args.batch, "size": args.size, "widths": list(args.widths),
        "generator_params": sum(p.numel() for p in trainer.model.parameters()),
        "discriminator_params": sum(p.numel() for p in trainer.train_step.disc_net.parameters()),
        "steps": trainer.state.step, "steps_asked": args.steps, "warmup": args.warmup,
        "images_per_s": measured, "peak_memory_mb": peak, "peak_memory_kind": peak_kind, "wall_s": wall,
        "skipped_steps": len(skipped_at), "skipped_at": skipped_at[:20],
        "losses_finite_every_step": bool(finite_steps.all()) if len(finite_steps) else None,
        "steps_with_nonfinite_loss": int((~finite_steps).sum()) if len(finite_steps) else None,
        "steps_with_nonfinite_grad_norm": int((~grads_finite).sum()) if len(grads_finite) else None,
        "weights_finite": weights_finite, "diverged": diverged,
        "loss_scale": float(scaler.get_scale()) if scaler is not None else None,
        "last_logged": {k: v for k, v in last.items() if k.startswith(("g/", "d/", "grad_norm/"))},
        "vaegan": how,
    }
    if device.type == "cuda" or args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        x = next(iter(trainer.loader))
        x = x[0] if isinstance(x, (list, tuple)) else x
        counter = FlopCounterMode(display=False)
        with counter:  # one more step of both players, after the measurement
            trainer.train_step(x, trainer.state.step)
        flops = counter.get_total_flops() / x.shape[0]
        result["gflops_per_image"] = flops / 1e9
        result["achieved_tflops"] = flops * measured / 1e12 if measured else None
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return result


# ---- the driver --------------------------------------------------------------------------------------------
def hardware(device: str) -> str:
    return gpu_name() if device == "cuda" and torch.cuda.is_available() else f"{usable_cores()} CPU cores ({cpu_model()})"


def markdown(rows: List[Dict[str, object]], header: str) -> str:
    lines = [header, "",
             "| precision | batch | steps | images/s | peak memory MB | skipped steps (first at) | losses finite | "
             "non-finite grad norms | weights finite | fp16 loss scale | GFLOP/image (TFLOP/s) | wall s |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['precision']} | | | | | | | | | | | error: {r['error']} |")
            continue
        ips = f"{r['images_per_s']:.2f}" if r.get("images_per_s") else "n/a"
        skipped = f"{r['skipped_steps']}" + (f" ({r['skipped_at'][0]})" if r["skipped_at"] else "")
        if r.get("diverged"):
            skipped += f"; diverged: {r['diverged']}"
        weights = "yes" if all(r["weights_finite"].values()) else "NO: " + ", ".join(k for k, v in r["weights_finite"].items() if not v)
        losses = {True: "yes", False: f"NO ({r['steps_with_nonfinite_loss']} steps)", None: "n/a"}[r["losses_finite_every_step"]]
        scale = f"{r['loss_scale']:.0f}" if r.get("loss_scale") is not None else ""
        flops = ""
        if r.get("gflops_per_image") is not None:
            flops = f"{r['gflops_per_image']:.0f}" + (f" ({r['achieved_tflops']:.1f})" if r.get("achieved_tflops") else "")
        label = r["precision"] + (" (TF32)" if r["precision"] == "fp32" and r["device"].startswith("cuda") else "")
        lines.append(f"| {label} | {r['batch']} | {r['steps']}/{r['steps_asked']} | {ips} | {r['peak_memory_mb']:.0f} "
                     f"| {skipped} | {losses} | {r['steps_with_nonfinite_grad_norm']} | {weights} | {scale} | {flops} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=None,
                   help="default: fp32 bf16 fp16 on cuda, fp32 on cpu")
    p.add_argument("--batch", type=int, default=None, help="default 8 on cuda, 2 on cpu")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per precision (default 200 on cuda, 3 on cpu)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of images/s (default 20 on cuda, 1 on cpu)")
    p.add_argument("--log-every", type=int, default=None, help="trainer log interval (default 10 on cuda, 1 on cpu)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="cap on each precision's training time (default 100 on cuda, none on cpu)")
    p.add_argument("--size", type=int, default=256, help="image side (default 256; a multiple of 2^(levels-1))")
    p.add_argument("--widths", type=int, nargs="+", default=list(SD_WIDTHS), help="block_out_channels (default SD's)")
    p.add_argument("--layers", type=int, default=2, help="layers_per_block (default 2)")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--flops", action="store_true", help="count one step's FLOPs on the CPU too (one more step)")
    p.add_argument("--keep", action="store_true", help="keep outputs/sd_vae_speed/<precision> (checkpoint, final/)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--worker", choices=list(PRECISIONS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU here; use --device cpu")
    defaults = {"precisions": ["fp32", "bf16", "fp16"] if cuda else ["fp32"], "batch": 8 if cuda else 2,
                "steps": 200 if cuda else 3, "warmup": 20 if cuda else 1, "log_every": 10 if cuda else 1,
                "max_seconds": 100.0 if cuda else 0.0}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup >= args.steps:
        raise SystemExit(f"--warmup ({args.warmup}) must be below --steps ({args.steps})")

    if args.worker:  # one precision in this process
        sys.stdout.write(json.dumps(run_one(args, args.worker)) + "\n")
        return 0

    env = dict(os.environ)
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"  # Accelerate would pick a GPU where one exists
    forwarded = ["--device", args.device, "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
                 str(args.warmup), "--log-every", str(args.log_every), "--max-seconds", str(args.max_seconds),
                 "--size", str(args.size), "--widths", *map(str, args.widths), "--layers", str(args.layers),
                 "--latent-channels", str(args.latent_channels), *(["--flops"] if args.flops else []),
                 *(["--keep"] if args.keep else [])]
    rows: List[Dict[str, object]] = []
    t_all = time.perf_counter()
    for precision in args.precisions:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", precision, *forwarded]
        sys.stderr.write(f"[sd_vae_speed] {precision}: {' '.join(cmd[1:])}\n")
        timeout = (args.max_seconds or 3600) + 240  # start-up, the final checkpoint and the FLOP count on top
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            rows.append({"precision": precision, "error": f"timed out after {timeout:.0f} s"})
            continue
        lines = [line for line in out.stdout.strip().splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
            sys.stderr.write(out.stderr[-4000:])
            rows.append({"precision": precision, "error": f"exit {out.returncode}: {tail[0][:200]}"})
            continue
        rows.append(json.loads(lines[-1]))
        r = rows[-1]
        sys.stderr.write(f"[sd_vae_speed] {precision}: {r['images_per_s'] or float('nan'):.2f} images/s, "
                         f"peak {r['peak_memory_mb']:.0f} MB, {r['skipped_steps']} skipped steps, {r['wall_s']:.0f} s\n")
    first = next((r for r in rows if "error" not in r), {})
    sd = tuple(args.widths) == SD_WIDTHS and args.layers == 2 and args.latent_channels == 4 and args.size == 256
    header = (f"{'SD-size ' if sd else ''}autoencoder_kl ({'/'.join(map(str, args.widths))}, {args.layers} blocks per level, "
              f"c = {args.latent_channels}, f = {2 ** (len(args.widths) - 1)}; "
              f"{first.get('generator_params', 0) / 1e6:.1f}M parameters + PatchGAN "
              f"{first.get('discriminator_params', 0) / 1e6:.1f}M) on {args.size}x{args.size} synthetic RGB, "
              f"L1 + KL + hinge GAN (adaptive weight), EMA, clipping, fused AdamW, vaegan's trainer; "
              f"{hardware(args.device)}, torch {torch.__version__}, {datetime.date.today().isoformat()}; "
              f"images/s after {args.warmup} warm-up steps; peak memory: "
              f"{first.get('peak_memory_kind', 'n/a')}; total {time.perf_counter() - t_all:.0f} s.\n\n"
              f"Command: `python {' '.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}`")
    table = markdown(rows, header)
    sys.stdout.write(table + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"header": header, "rows": rows, "torch": torch.__version__,
                                         "hardware": hardware(args.device)}, indent=2) + "\n")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
