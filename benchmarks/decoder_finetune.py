"""The Stable-Diffusion-style workflow end to end on photo patches: train a spatial KL autoencoder, then
fine-tune its decoder three ways at equal wall-clock, and measure each on photographs it never saw.

Phase 1 (trained once): ``autoencoder_kl`` f = 4 with 4 latent channels (``recipes/configs/ldm_kl_f4.yaml``
with the widths a 2-core CPU can train, :data:`PHASE1`), L1 + ST-LPIPS(alex) 0.25 + KL 1e-6, no GAN;
exported by the trainer to ``final/diffusers``.

Phase 2, from that folder with ``recipes/configs/sd_vae_finetune.yaml`` (decoder only: the encoder and its
quant conv stay bit for bit, checked), three arms at equal wall-clock:

(i)   ``l1``         L1 only;
(ii)  ``l1_st``      L1 + ST-LPIPS(alex) (the recipe's perceptual weight, 1.0);
(iii) ``l1_st_gan``  L1 + ST-LPIPS + the recipe's PatchGAN (hinge, adaptive weight, and what keeps the
                     discriminator from winning: docs/training.md, "Keeping the GAN in the game").

Equal wall-clock, measured once rather than trusted to the clock: before phase 2 each arm trains
``--calibrate`` steps (after a warm-up) and its images/s gives its number of steps for ``--minutes``;
the steps are then fixed (``--steps ARM=N`` to reuse them), so a busy machine makes a run slower but
never changes its result. The phase-1 length is given in steps (``--phase1-steps``) for the same reason.

Held-out evaluation (``patch_eval.py``; EMA weights, posterior mean): PSNR, SSIM, ST-LPIPS(alex),
sharpness and high-frequency ratios against the real test patches, and a Fréchet distance in the VGG-ST
network's pooled features (``fd_vgg_st``), plus a bicubic reference row (4x area-downscale, bicubic up).
ST-LPIPS(alex) is also the training loss of (ii)/(iii) and phase 1, so they are optimised for it; the
VGG-ST distance is the independent check.

Targets: phase 1 above the bicubic reference in PSNR; (iii) sharpness ratio 0.9-1.1, ST-LPIPS at most
0.8x of (i)'s, PSNR within 1.5 dB of (i); the encoder bit-equal to phase 1 in every arm.

    python benchmarks/rgb_patches.py --out data/rgb_patches --sizes 32       # once: the patches
    python benchmarks/decoder_finetune.py --phase1-steps 8000 --minutes 15   # about 2 h on 2 CPU cores
    python benchmarks/decoder_finetune.py --only l1_st_gan --steps l1_st_gan=2100 --set l1_st_gan optim_d.lr=5e-5
    python benchmarks/decoder_finetune.py --quick                             # smoke run (minutes), no docs

Writes ``<work-dir>/results.json``, ``docs/images/decoder_finetune.png`` (rows: real, phase 1, (i), (ii),
(iii)) and a table between ``<!-- decoder_finetune:begin -->`` and ``<!-- decoder_finetune:end -->`` in
docs/benchmarks.md. ``--only`` re-runs some arms and keeps the others' results; phase 1 is reused when
its ``final/`` exists (``--retrain`` to train it again).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import load_file

import vaegan
from vaegan.config import ExperimentConfig, load_config
from vaegan.data import TensorImages

sys.path.insert(0, str(Path(__file__).parent))
from machine import hardware, write_block  # noqa: E402  (run as a script from benchmarks/)
from patch_eval import (  # noqa: E402
    bicubic_reference,
    compose_rows,
    grid_indices,
    load_split,
    perceptual_nets,
    reconstruction_metrics,
    to_u8,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "configs"
BEGIN, END = "<!-- decoder_finetune:begin -->", "<!-- decoder_finetune:end -->"
ARMS = ("l1", "l1_st", "l1_st_gan")
LABELS = {"phase1": "phase 1: L1 + ST-LPIPS 0.25 + KL, whole model", "l1": "(i) decoder: L1",
          "l1_st": "(ii) decoder: L1 + ST-LPIPS", "l1_st_gan": "(iii) decoder: L1 + ST-LPIPS + PatchGAN"}
SHORT = {"phase1": "phase 1", "l1": "(i) L1", "l1_st": "(ii) +ST-LPIPS", "l1_st_gan": "(iii) +GAN"}
ST = "{name: lpips, weight: %s, options: {net: alex_st}}"

# Phase 1: ldm_kl_f4.yaml at the widths two CPU cores train (16/32/64, 2 blocks a level: 0.9M parameters,
# 3x the images/s of 32/64/128 and ahead of it at equal time in 300 s probes), 8 channels per GroupNorm
# group as SD (not instance normalisation), and an optimiser for a from-scratch autoencoder without a GAN
# (Adam(0.9, 0.99), 1e-3 with warm-up and a cosine to 0: the recipe's GAN-style Adam(0.5, 0.9) at 1e-4 was
# 2.5 dB behind after 300 s). The reasons and probes: docs/training.md ("Spatial latents").
PHASE1 = ["model.options.block_out_channels=[16, 32, 64]", "model.options.layers_per_block=2",
          "model.options.latent_channels=4", "model.options.norm_num_groups=8",
          f"losses=[{{name: l1}}, {ST % 0.25}, {{name: kl, weight: 1.0e-6}}]", "discriminator=null", "adversarial=null",
          "optim_g.lr=1.0e-3", "optim_g.betas=[0.9, 0.99]", "optim_g.warmup_steps=200", "optim_g.decay=cosine"]
# Phase 2: sd_vae_finetune.yaml as it is, but for 32 px patches in memory: batch 16 without accumulation
# (the recipe's 4 x 4 is for 256 px).
PHASE2 = ["train.batch_size=16", "train.grad_accum=1"]
ARM_LOSSES = {"l1": ["losses=[{name: l1}]", "discriminator=null", "adversarial=null"],
              "l1_st": [f"losses=[{{name: l1}}, {ST % 1.0}]", "discriminator=null", "adversarial=null"],
              # the recipe's discriminator and GAN settings, with ST-LPIPS in place of its LPIPS(vgg) (no weights here)
              "l1_st_gan": [f"losses=[{{name: l1}}, {ST % 1.0}]"]}
COMMON = ["data.num_workers=0", "train.report_to=none", "eval.every=0", "train.sample_every=0", "train.log_every=25"]
log = logging.getLogger("decoder_finetune")


class _Timer(vaegan.Callback):
    """images/s over the steps after the first ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.images, self.elapsed = warmup, None, 0, 0.0

    def on_step_end(self, trainer, output) -> None:
        if trainer.state.step == self.warmup:
            self.t0, self.images = time.perf_counter(), trainer.state.images_seen
        elif self.t0 is not None:
            self.elapsed = time.perf_counter() - self.t0
            self.seen = trainer.state.images_seen - self.images

    @property
    def images_per_s(self) -> float:
        return getattr(self, "seen", 0) / self.elapsed if self.elapsed else float("nan")


def phase1_config(args, out: Path) -> ExperimentConfig:
    size = args.size
    return load_config(RECIPES / "ldm_kl_f4.yaml", [
        f"model.image_size=[{size}, {size}]", *PHASE1, *COMMON, f"train.output_dir={out}", "train.epochs=100000",
        f"train.max_steps={args.phase1_steps}", f"train.seed={args.seed}", "train.checkpoint_every=2000",
        *args.set_all, *args.extra.get("phase1", [])])


def arm_config(arm: str, args, pretrained: Path, out: Path, steps: int) -> ExperimentConfig:
    size = args.size
    return load_config(RECIPES / "sd_vae_finetune.yaml", [
        f"model.image_size=[{size}, {size}]", f"model.options.pretrained={pretrained}", *PHASE2, *ARM_LOSSES[arm],
        *COMMON, f"train.output_dir={out}", "train.epochs=100000", f"train.max_steps={steps}",
        f"train.seed={args.seed}", "train.checkpoint_every=0", *args.set_all, *args.extra.get(arm, [])])


def train(cfg: ExperimentConfig, data: TensorImages, warmup: int = 5) -> Dict[str, object]:
    """One training run; what it did and how fast."""
    from vaegan._compat import reset_accelerate_state

    reset_accelerate_state()  # one Accelerator per run in this process
    out = Path(cfg.train.output_dir)
    if out.exists():
        shutil.rmtree(out)  # no stale checkpoint or metrics.jsonl from an earlier run
    timer = _Timer(warmup)
    t0 = time.perf_counter()
    trainer = vaegan.build_trainer(cfg, callbacks=[timer], dataset=data)
    final = trainer.fit()
    wall = time.perf_counter() - t0
    model, disc = trainer.model, trainer.train_step.disc_net
    return {"final": str(final), "steps": trainer.state.step, "images_seen": trainer.state.images_seen,
            "epochs": trainer.state.images_seen / len(data), "wall_s": wall, "images_per_s": timer.images_per_s,
            "batch_size": cfg.train.batch_size, "lr_g": cfg.optim_g.lr, "precision": trainer.accelerator.mixed_precision,
            "generator_params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "discriminator_params": sum(p.numel() for p in disc.parameters()) if disc is not None else 0,
            "latent_shape": list(model.latent_shape), "losses": [t.key for t in cfg.losses]
            + ([f"{cfg.adversarial.name} GAN"] if cfg.adversarial is not None else []),
            "skipped_steps": trainer.state.skipped_steps}


def calibrate(arm: str, args, pretrained: Path, data: TensorImages) -> float:
    """The images/s of ``arm`` over ``args.calibrate`` steps after 5 warm-up steps (its own scratch folder)."""
    out = Path(args.work_dir) / "calibrate" / arm
    r = train(arm_config(arm, args, pretrained, out, 5 + args.calibrate), data)
    shutil.rmtree(out, ignore_errors=True)
    log.info("calibration %s: %.1f images/s", arm, r["images_per_s"])
    return float(r["images_per_s"])


def encoder_state(final: Path) -> Dict[str, torch.Tensor]:
    """The encoder half (encoder.*, quant_conv.*) of a final model's weights."""
    state = load_file(str(final / "model.safetensors"))
    return {k: v for k, v in state.items() if k.startswith(("encoder.", "quant_conv."))}


def gan_balance(run_dir: Path) -> Dict[str, object]:
    """What the discriminator and the adaptive weight did, from the run's metrics.jsonl (last quarter)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "d/acc_real" in r]
    if not rows:
        return {}
    tail = rows[-max(1, len(rows) // 4):]

    def mean(key: str) -> Optional[float]:
        vals = [r[key] for r in tail if key in r]
        return sum(vals) / len(vals) if vals else None

    return {k: mean(k) for k in ("d/acc_real", "d/acc_fake", "d/logits_real", "d/logits_fake", "g/adaptive_weight",
                                 "g/adversarial", "d/discriminator", "d/lecam")}


def evaluate_run(final: Path, test_u8: torch.Tensor, nets, idx: torch.Tensor) -> Dict[str, object]:
    model = vaegan.VAE.from_pretrained(str(final)).eval()
    metrics = reconstruction_metrics(model.reconstruct, test_u8, model.value_range, nets["lpips"][0],
                                     st_lpips=nets["st_lpips"][0], fd_net=nets["vgg_st"][0])
    low, high = model.value_range
    with torch.no_grad():
        x = test_u8[idx].float().div(255).mul(high - low).add(low)
        torch.save(to_u8(model.reconstruct(x), model.value_range), final.parent / "grid.pt")
    return metrics


def check_targets(res: Dict[str, object]) -> List[str]:
    runs, ref = res["runs"], res["reference"]
    out = []
    p1 = runs.get("phase1", {}).get("metrics")
    if p1:
        d = p1["psnr"] - ref["psnr"]
        out.append(f"phase 1 PSNR {p1['psnr']:.2f} dB vs bicubic {ref['psnr']:.2f} dB ({d:+.2f}; target > 0): "
                   + ("PASS" if d > 0 else "FAIL"))
    i, iii = (runs.get(k, {}).get("metrics") for k in ("l1", "l1_st_gan"))
    if iii:
        s = iii["sharpness_ratio"]
        out.append(f"(iii) sharpness ratio {s:.3f} (target 0.9-1.1): " + ("PASS" if 0.9 <= s <= 1.1 else "FAIL"))
    if i and iii and "st_lpips" in i:
        r = iii["st_lpips"] / i["st_lpips"]
        out.append(f"(iii) ST-LPIPS {r:.2f}x of (i)'s (target <= 0.8): " + ("PASS" if r <= 0.8 else "FAIL"))
        d = iii["psnr"] - i["psnr"]
        out.append(f"(iii) PSNR {d:+.2f} dB vs (i) (target >= -1.5): " + ("PASS" if d >= -1.5 else "FAIL"))
    eq = [runs[a].get("encoder_bit_equal") for a in ARMS if a in runs]
    if eq:
        out.append("encoder bit-equal to phase 1 in " + f"{sum(bool(e) for e in eq)}/{len(eq)} arms: "
                   + ("PASS" if all(eq) else "FAIL"))
    return out


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(res: Dict[str, object], image: Optional[str]) -> str:
    runs, ref, size = res["runs"], res["reference"], res["size"]
    dates = sorted({r["date"] for r in runs.values()})
    lines = [BEGIN, f"## Decoder fine-tune end to end: phase 1, then three decoder-only arms at equal wall-clock "
             f"({', '.join(dates)}; {res['hardware']}, torch {res['torch']})", "",
             "`benchmarks/decoder_finetune.py`: phase 1 trains `autoencoder_kl` (f4, 4 latent channels) with L1 + "
             "ST-LPIPS(alex) 0.25 + KL 1e-6 and exports `final/diffusers`; phase 2 starts three runs of "
             "`sd_vae_finetune.yaml` (decoder only) from that folder, at equal wall-clock (each arm's step count from "
             "its measured images/s). Held out: test patches from photographs never trained on, EMA weights, "
             "posterior mean, clamped to [-1, 1]. ST-LPIPS is the shift-tolerant LPIPS (not comparable with LPIPS "
             "numbers) and the training loss of phase 1, (ii) and (iii); FD VGG-ST is a Fréchet distance in the "
             "VGG-ST network's pooled features (not an FID), lower is better.", "",
             "Commands: " + "; ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in runs.values())), "",
             f"Data: {res['data']['train']} train patches (+ mirror images) from {', '.join(res['data']['train_photos'])}; "
             f"{res['data']['test']} test patches ({size}x{size}) from {', '.join(res['data']['test_photos'])}.", "",
             "| run | trained (params) | steps (epochs) | images/s | wall | PSNR dB | SSIM | ST-LPIPS | sharpness | HF ratio "
             "| FD VGG-ST |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ("phase1", *ARMS):
        r = runs.get(name)
        if r is None:
            continue
        m = r["metrics"]
        params = f"{r['trainable_params'] / 1e6:.2f}M of {r['generator_params'] / 1e6:.2f}M"
        if r["discriminator_params"]:
            params += f" + D {r['discriminator_params'] / 1e6:.2f}M"
        lines.append(f"| {LABELS[name]} | {params} | {r['steps']} ({r['epochs']:.1f}) | {r['images_per_s']:.1f} "
                     f"| {r['wall_s'] / 60:.0f} min | {m['psnr']:.2f} | {m['ssim']:.3f} | {_fmt(m.get('st_lpips'), '.4f')} "
                     f"| {m['sharpness_ratio']:.3f} | {m['high_frequency_ratio']:.3f} | {_fmt(m.get('fd_vgg_st'), '.3f')} |")
    lines.append(f"| *no learning: area 4x down, bicubic up (3x{size // 4}x{size // 4})* | | | | | {ref['psnr']:.2f} "
                 f"| {ref['ssim']:.3f} | {_fmt(ref.get('st_lpips'), '.4f')} | {ref['sharpness_ratio']:.3f} "
                 f"| {ref['high_frequency_ratio']:.3f} | {_fmt(ref.get('fd_vgg_st'), '.3f')} |")
    gan = runs.get("l1_st_gan", {}).get("gan_balance")
    if gan:
        lines += ["", "(iii)'s game over its last quarter (means of the logged values): D accuracy on reals "
                  f"{_fmt(gan.get('d/acc_real'), '.2f')}, on fakes {_fmt(gan.get('d/acc_fake'), '.2f')}; mean logits "
                  f"{_fmt(gan.get('d/logits_real'), '.2f')} / {_fmt(gan.get('d/logits_fake'), '.2f')}; adaptive weight "
                  f"{_fmt(gan.get('g/adaptive_weight'), '.3g')}."]
    lines += ["", "Targets: " + "; ".join(res["targets"]), ""]
    if image:
        lines += [f"Test patches, top to bottom: real, phase 1, (i), (ii), (iii) ({size}x{size} shown at 2x).", "",
                  f"![real | phase 1 | (i) | (ii) | (iii)]({image})"]
    lines.append(END)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--data-dir", default="data/rgb_patches", help="rgb_patches.py's --out")
    p.add_argument("--work-dir", default=None, help="default outputs/decoder_finetune (_quick with --quick)")
    p.add_argument("--phase1-steps", type=int, default=8000, help="phase 1 optimizer steps (default 8000)")
    p.add_argument("--retrain", action="store_true", help="train phase 1 again even if its final/ exists")
    p.add_argument("--phase1-dir", type=Path, default=None,
                   help="an existing phase-1 run to fine-tune (default <work-dir>/phase1; for probes of the arms)")
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget of each phase-2 arm")
    p.add_argument("--calibrate", type=int, default=20, help="timed steps per arm to set its step count")
    p.add_argument("--steps", nargs="+", default=[], metavar="ARM=N", help="fixed steps for arms (no calibration)")
    p.add_argument("--only", nargs="+", choices=("phase1", *ARMS), help="run only these (others' results kept)")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar=("RUN", "KEY=VALUE"),
                   help="config overrides of one run (phase1 or an arm), repeatable")
    p.add_argument("--set-all", nargs="+", default=[], metavar="KEY=VALUE", help="overrides of every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 30 + 3 x 10 steps, 64 test patches, no docs")
    p.add_argument("--docs", default=None, help="markdown file for the table (default docs/benchmarks.md)")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    args.extra = {v[0]: v[1:] for v in args.set}
    unknown = set(args.extra) - {"phase1", *ARMS}
    if unknown:
        raise SystemExit(f"--set names unknown runs {sorted(unknown)}; use phase1, {', '.join(ARMS)}")
    fixed = {k: int(v) for k, v in (s.split("=", 1) for s in args.steps)}
    if args.quick:
        args.phase1_steps = min(args.phase1_steps, 30)
        fixed = {a: fixed.get(a, 10) for a in ARMS}
    work = Path(args.work_dir or ("outputs/decoder_finetune_quick" if args.quick else "outputs/decoder_finetune"))
    args.work_dir = work
    write = not args.no_docs and (args.docs is not None or not args.quick)
    docs = Path(args.docs) if args.docs else ROOT / "docs" / "benchmarks.md"

    root = Path(args.data_dir) / str(args.size)
    train_u8, test_u8 = load_split(root, "train", args.size), load_split(root, "test", args.size)
    if args.quick:
        test_u8 = test_u8[grid_indices(len(test_u8)).unique()] if len(test_u8) <= 64 else test_u8[:64]
    manifest = json.loads((root / "manifest.json").read_text()) if (root / "manifest.json").is_file() else {}
    data_info = {"root": str(root), "train": len(train_u8), "test": len(test_u8),
                 "train_photos": sorted(manifest.get("train", {}).get("photos", {})) or ["?"],
                 "test_photos": sorted(manifest.get("test", {}).get("photos", {})) or ["?"]}
    data = TensorImages(torch.cat([train_u8, train_u8.flip(-1)]), (-1.0, 1.0))  # + mirror images, in memory
    nets = perceptual_nets()
    for key, (net, problem) in nets.items():
        log.info("%s: %s", key, "available" if net is not None else f"NOT available ({problem})")
    if nets["st_lpips"][0] is None:
        raise SystemExit("This benchmark trains with ST-LPIPS: pip install 'vaegan[stlpips]'.")

    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "results.json"
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    runs: Dict[str, Dict[str, object]] = dict(previous.get("runs", {}))
    command = "python " + " ".join(["benchmarks/decoder_finetune.py", *sys.argv[1:]])
    idx = grid_indices(len(test_u8))
    torch.save(test_u8[idx].clone(), work / "grid_real.pt")
    stamp = {"date": datetime.date.today().isoformat(), "command": command}
    todo = args.only or ["phase1", *ARMS]

    p1_dir = args.phase1_dir or work / "phase1"
    if "phase1" in todo and (args.retrain or not (p1_dir / "final" / "model.safetensors").is_file()):
        r = train(phase1_config(args, p1_dir), data)
        r.update(stamp, label=LABELS["phase1"], metrics=evaluate_run(Path(r["final"]), test_u8, nets, idx))
        runs["phase1"] = r
        log.info("phase 1: %s", r["metrics"])
    elif "phase1" in todo and "phase1" in runs:
        log.info("phase 1 reused from %s (--retrain to train it again)", p1_dir)
    pretrained = p1_dir / "final" / "diffusers"
    if not pretrained.is_dir():
        raise SystemExit(f"{pretrained} does not exist: train phase 1 first (it needs diffusers installed).")
    p1_encoder = encoder_state(p1_dir / "final")

    arms = [a for a in ARMS if a in todo]
    speeds = {a: calibrate(a, args, pretrained, data) for a in arms if a not in fixed}
    for arm in arms:
        steps = fixed.get(arm) or max(1, round(args.minutes * 60 * speeds[arm] / 16))
        r = train(arm_config(arm, args, pretrained, work / arm, steps), data)
        final = Path(r["final"])
        enc = encoder_state(final)
        r.update(stamp, label=LABELS[arm], calibrated_images_per_s=speeds.get(arm), budget_minutes=args.minutes,
                 encoder_bit_equal=enc.keys() == p1_encoder.keys() and all(torch.equal(enc[k], p1_encoder[k]) for k in enc),
                 metrics=evaluate_run(final, test_u8, nets, idx), gan_balance=gan_balance(work / arm))
        runs[arm] = r
        log.info("%s: %d steps, %s", arm, r["steps"], r["metrics"])

    reference = reconstruction_metrics(bicubic_reference, test_u8, (-1.0, 1.0), nets["lpips"][0],
                                       st_lpips=nets["st_lpips"][0], fd_net=nets["vgg_st"][0])
    res = {"size": args.size, "hardware": hardware(), "torch": torch.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads(), "data": data_info, "runs": runs, "reference": reference}
    res["targets"] = check_targets(res)
    results_path.write_text(json.dumps(res, indent=2, default=str) + "\n")
    rel = None
    if write:
        image = docs.parent / "images" / "decoder_finetune.png"
        rows = [("real", torch.load(work / "grid_real.pt", weights_only=True))]
        rows += [(SHORT[k], torch.load(work / k / "grid.pt", weights_only=True)) for k in ("phase1", *ARMS)
                 if (work / k / "grid.pt").is_file()]
        compose_rows(rows, image, show=2 * args.size)
        rel = image.relative_to(docs.parent).as_posix()
    block = markdown(res, rel)
    sys.stdout.write("\n" + block + "\n")
    if write:
        write_block(docs, block, BEGIN, END)
        log.info("wrote %s", docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
