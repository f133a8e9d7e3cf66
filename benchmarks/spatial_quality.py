"""Spatial vs vector latents: reconstruction quality of three autoencoders at equal wall-clock on RGB patches.

On the photo patches of ``benchmarks/rgb_patches.py`` (train and test patches come from different
photographs), trains for the same number of seconds each, in one process, fp32 on the CPU:

(a) ``conv_vae``   the vector-latent conv VAE of ``recipes/configs/rgb_folder_{32,64}.yaml`` with its L1 + KL
                   (0.1, warm-up 2000) and no GAN, so the comparison with (b) is about the latent;
(b) ``kl_f4``      ``autoencoder_kl`` with f = 4 (the ``ldm_kl_f4`` recipe's settings), L1 + KL 1e-6 only
                   (no GAN, no LPIPS);
(c) ``ldm_kl_f4``  the ``ldm_kl_f4`` recipe itself: L1 + PatchGAN hinge with the adaptive weight (on after a
                   quarter of the run) + KL 1e-6, with LPIPS(vgg) when the backbone's ImageNet weights are
                   on this machine and without it otherwise (the output says which).

(b) and (c) share the generator; the widths are small enough to train on 2 cores (``--kl-widths``,
default 32 64 128 with 2 blocks per level: 3.5M parameters); (a) keeps its recipe's widths at 32x32
(4.7M parameters) and halves them at 64x64 (5.5M instead of 18.8M), so the parameter counts are
comparable. Each recipe keeps its own batch size, learning rate and loss weights.

Training data: the train patches and their horizontal mirror images, held in memory (no decoding
workers competing with training for the 2 cores). A ``start_fraction`` schedule (the GAN's start in
(c)) is resolved from the number of steps the run is expected to reach in its budget, measured after
the first 10% of it. The EMA generator (``final/``) is evaluated on every test patch: PSNR (of the
mean squared error over the set), SSIM, L1, the sharpness ratio and the high-frequency ratio of the
reconstructions (posterior mean, clamped to the image range) against the real patches, and LPIPS(alex)
when its weights are local. A reference row with no learning: each test patch area-downscaled 4x
and scaled back up bicubically, i.e. as many numbers as the f4 latent with 3 channels.

Targets: (b) above the bicubic reference row in PSNR (the honest floor: as many numbers as its latent,
nothing learned); (c) no more than 1 dB PSNR below (b), with a reconstruction sharpness ratio in 0.9-1.1.
(b) - (a) is reported without a target: the former "+4 dB" came from a probe whose PSNR was a per-image
mean on easier patches, and is retired (docs/benchmarks.md).

Writes ``<work-dir>/results_<size>.json`` (raw numbers; ``--only`` replaces those runs in it and keeps
the others), ``docs/images/spatial_reconstructions.png`` (rows: real, (a), (b), (c), on the same test
patches; one panel per size that has results in the work dir) and a markdown table between
``<!-- spatial_quality:begin -->`` and ``<!-- spatial_quality:end -->`` in docs/benchmarks.md (one
section per size with results in the work dir).

    python benchmarks/rgb_patches.py --out data/rgb_patches                 # once: the patches (seconds)
    python benchmarks/spatial_quality.py --size 32                           # 3 x 600 s of training
    python benchmarks/spatial_quality.py --size 64 --seconds 1200
    python benchmarks/spatial_quality.py --size 32 --quick                   # smoke run: 3 x 10 s, no docs
    python benchmarks/spatial_quality.py --size 32 --only ldm_kl_f4 --set ldm_kl_f4 adversarial.weight.value=0.25
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import vaegan
from vaegan.config import ExperimentConfig, apply_overrides, load_config
from vaegan.data import TensorImages

sys.path.insert(0, str(Path(__file__).parent))
from machine import hardware, write_block  # noqa: E402  (run as a script from benchmarks/)
from patch_eval import (  # noqa: E402
    bicubic_reference,
    compose_rows,
    grid_indices,
    load_split,
    reconstruction_metrics,
    to_u8,
)

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- spatial_quality:begin -->", "<!-- spatial_quality:end -->"
VARIANTS = ("conv_vae", "kl_f4", "ldm_kl_f4")
LABELS = {"conv_vae": "(a) conv VAE, vector latent: L1 + KL", "kl_f4": "(b) autoencoder_kl f4: L1 + KL",
          "ldm_kl_f4": "(c) ldm_kl_f4 recipe: L1 + GAN + KL"}
SHORT = {"conv_vae": "(a) conv", "kl_f4": "(b) f4", "ldm_kl_f4": "(c) f4+GAN"}
# (a)'s widths: rgb_folder_32's own at 32x32; at 64x64 the recipe's [64, 128, 256, 512] (18.8M parameters)
# halved, so its size is comparable to the 3.5M of (b)/(c).
CONV_CHANNELS = {32: None, 64: [32, 64, 128, 256]}
PRECISION = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}
log = logging.getLogger("spatial_quality")


# ---- environment ---------------------------------------------------------------------------------------
def lpips_problem(net: str) -> Optional[str]:
    """None when the lpips plugin can load ``net``'s ImageNet weights without a download; else why not."""
    from vaegan import registry
    from vaegan.errors import PluginError

    try:
        registry.load("vaegan.losses", "lpips")(net=net, download=False)
        return None
    except PluginError as exc:
        return str(exc).split(". ")[0]


# ---- configurations ------------------------------------------------------------------------------------
def variant_config(name: str, size: int, args, lpips_vgg: bool) -> ExperimentConfig:
    """The configuration of one run (before the common training settings)."""
    kl_model = [f"model.image_size=[{size}, {size}]", f"model.options.block_out_channels={list(args.kl_widths)}",
                f"model.options.layers_per_block={args.kl_layers}"]
    no_gan = ["discriminator=null", "adversarial=null"]
    if name == "conv_vae":
        over = list(no_gan)
        if CONV_CHANNELS[size] is not None:
            over.append(f"model.options.channels={CONV_CHANNELS[size]}")
        cfg = load_config(ROOT / "recipes" / "configs" / f"rgb_folder_{size}.yaml", over)
        names = [t.name for t in cfg.losses]
        if names != ["l1", "kl"]:  # the recipe changed under us: say so rather than compare something else
            raise SystemExit(f"rgb_folder_{size}.yaml's losses are {names}; this benchmark expects l1 + kl.")
        return cfg
    if name == "kl_f4":
        return load_config(ROOT / "recipes" / "configs" / "ldm_kl_f4.yaml",
                           kl_model + ["losses=[{name: l1}, {name: kl, weight: 1.0e-6}]"] + no_gan)
    over = list(kl_model)
    if not lpips_vgg:  # the recipe's L1 + LPIPS(vgg) + KL, without the term that cannot be built here
        over.append("losses=[{name: l1}, {name: kl, weight: 1.0e-6}]")
    return load_config(ROOT / "recipes" / "configs" / "ldm_kl_f4.yaml", over)


class _Budget(vaegan.Callback):
    """Stops training after the first step that ends ``seconds`` after the start (``final/`` is written as
    usual) and, at 10% of the budget, resolves ``start_fraction`` schedules against the number of steps
    the run will reach at the speed measured so far (the trainer resolved them against ``train.epochs``,
    which a wall-clock budget never reaches)."""

    def __init__(self, seconds: float, fractions: Dict[str, "vaegan.Schedule"]) -> None:
        self.seconds, self.fractions = seconds, fractions
        self.t0 = self.elapsed = 0.0
        self.resolved: Dict[str, object] = {}

    def on_train_start(self, trainer) -> None:
        self.t0 = time.perf_counter()

    def on_step_end(self, trainer, output) -> None:
        self.elapsed = time.perf_counter() - self.t0
        step = trainer.state.step
        if self.fractions and not self.resolved and (self.elapsed >= 0.1 * self.seconds and step >= 5):
            expected = max(step + 1, int(step * self.seconds / self.elapsed))
            schedules = trainer.train_step.objective.schedules
            for key, schedule in self.fractions.items():
                schedules[key] = schedule.resolve(expected)
            self.resolved = {"at_step": step, "expected_steps": expected,
                             "starts": {k: schedules[k].start for k in self.fractions}}
            log.info("schedules resolved at step %d for %d expected steps: %s", step, expected, self.resolved["starts"])
        if self.elapsed >= self.seconds:
            trainer.stop()


def fraction_schedules(cfg: ExperimentConfig) -> Dict[str, "vaegan.Schedule"]:
    """The objective's schedules that start at a fraction of training, by their objective key."""
    out = {t.key: t.weight for t in cfg.losses if t.weight.start_fraction is not None}
    if cfg.adversarial is not None and cfg.adversarial.weight.start_fraction is not None:
        out["adversarial"] = cfg.adversarial.weight
    return out


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_variant(name: str, size: int, train_u8: torch.Tensor, args, lpips_vgg: bool, extra: Sequence[str]) -> Dict[str, object]:
    from vaegan._compat import reset_accelerate_state

    reset_accelerate_state()  # one Accelerator per run in this process
    out = Path(args.work_dir) / str(size) / name
    if out.exists():
        shutil.rmtree(out)  # no stale checkpoint or metrics.jsonl from an earlier run
    cfg = variant_config(name, size, args, lpips_vgg)
    cfg = apply_overrides(cfg, [
        f"data.root={Path(args.data_dir) / str(size)}", "data.num_workers=0", f"train.output_dir={out}",
        "train.epochs=100000", "train.max_steps=null", f"train.seed={args.seed}", "train.checkpoint_every=0",
        "train.sample_every=0", "train.log_every=25", "train.report_to=none", "eval.every=0",
        *args.set_all, *extra])
    budget = _Budget(args.seconds, fraction_schedules(cfg))
    data = TensorImages(train_u8, cfg.model.value_range)
    t0 = time.perf_counter()
    trainer = vaegan.build_trainer(cfg, callbacks=[budget], dataset=data)
    build_s = time.perf_counter() - t0
    final = trainer.fit()
    wall = time.perf_counter() - t0
    steps, seen = trainer.state.step, trainer.state.images_seen
    ips = seen / max(budget.elapsed, 1e-9)
    last = trainer.history[-1] if trainer.history else {}
    disc = trainer.train_step.disc_net
    model = trainer.model
    latent = tuple(model.latent_shape)
    log.info("%s: %d steps (%d images) in %.0f s of training, %.1f images/s", name, steps, seen, budget.elapsed, ips)
    return {
        "name": name, "label": LABELS[name], "overrides": list(extra), "final": str(final),
        "generator": cfg.model.name, "generator_options": dict(model.config.options) if hasattr(model, "config") else {},
        "generator_params": count(model), "discriminator_params": count(disc) if disc is not None else 0,
        "latent_shape": list(latent), "latent_numbers": math.prod(latent),
        "losses": [f"{t.name}" + (f"({dict(t.options).get('net')})" if t.name == "lpips" else "") for t in cfg.losses]
                  + ([f"{cfg.adversarial.name} GAN" + (" (adaptive)" if cfg.adversarial.adaptive else "")]
                     if cfg.adversarial is not None else []),
        "lpips_in_training": any(t.name == "lpips" for t in cfg.losses),
        "batch_size": cfg.train.batch_size, "lr_g": cfg.optim_g.lr, "precision": trainer.accelerator.mixed_precision,
        "steps": steps, "images_seen": seen, "epochs": seen / len(train_u8), "train_s": budget.elapsed,
        "build_s": build_s, "wall_s": wall, "images_per_s": ips, "resolved_schedules": budget.resolved,
        "final_weights": {k: v for k, v in last.items() if k.startswith("weight/")},
        "final_logged": {k: v for k, v in last.items() if k.startswith(("g/", "d/"))},
        "skipped_steps": trainer.state.skipped_steps,
    }


# ---- targets, markdown, image ----------------------------------------------------------------------------
def check_targets(runs: Dict[str, Dict[str, object]], reference: Optional[Dict[str, float]] = None) -> List[str]:
    a, b, c = (runs.get(k, {}).get("metrics") for k in VARIANTS)
    out = []
    if a and b:
        out.append(f"(b) - (a) PSNR {b['psnr'] - a['psnr']:+.2f} dB (no target; the former +4 dB is retired)")
    if b and reference:
        gain = b["psnr"] - reference["psnr"]
        out.append(f"(b) - bicubic reference PSNR {gain:+.2f} dB (target > 0): " + ("PASS" if gain > 0 else "FAIL"))
    if b and c:
        diff = c["psnr"] - b["psnr"]
        out.append(f"(c) - (b) PSNR {diff:+.2f} dB (target >= -1: at most 1 dB below): " + ("PASS" if diff >= -1.0 else "FAIL"))
        s = c["sharpness_ratio"]
        out.append(f"(c) sharpness ratio {s:.3f} (target 0.9-1.1): " + ("PASS" if 0.9 <= s <= 1.1 else "FAIL"))
    else:
        out.append("(c) vs (b): needs both runs")
    return out


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _losses(r: Dict[str, object]) -> str:
    """The run's terms with the weights they had at its end (the KL warm-up of (a) may not be over)."""
    parts = []
    for term in r["losses"]:
        key = "adversarial" if term.endswith(("GAN", "(adaptive)")) else term.split("(")[0]
        w = r.get("final_weights", {}).get(f"weight/{key}")
        parts.append(term if w is None or key == "l1" else f"{term} {w:.3g}")
    return " + ".join(parts)


def size_section(res: Dict[str, object]) -> List[str]:
    size = res["size"]
    runs = res["runs"]
    dates = sorted({r["date"] for r in runs.values()})
    commands = list(dict.fromkeys(r["command"] for r in runs.values()))
    budgets = sorted({r["budget_s"] for r in runs.values()})
    data = res["data"]
    lines = [f"### {size}x{size} patches ({', '.join(dates)}; {res['hardware']}, torch {res['torch']})", ""]
    lines += [f"Command: `{c}`" for c in commands]
    lines += ["", f"Budget: {', '.join(f'{b:g}' for b in budgets)} s of training per run (equal wall-clock, "
              f"one process, {res['threads']} threads, {', '.join(sorted({PRECISION.get(str(r['precision']), str(r['precision'])) for r in runs.values()}))}). "
              f"Data: {data['train']} train patches (+ their mirror images) from {', '.join(data['train_photos'])}; "
              f"evaluated on {data['test']} test patches from {', '.join(data['test_photos'])} "
              "(`benchmarks/rgb_patches.py`). EMA generators, posterior mean, outputs clamped to [-1, 1].", "",
              "| run | generator (params) | latent (numbers) | losses (weights at the end) | batch | steps (epochs) | images/s | PSNR dB | SSIM | "
              "sharpness ratio | HF ratio | LPIPS |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in VARIANTS:
        r = runs.get(name)
        if r is None:
            continue
        m = r["metrics"]
        params = f"{r['generator_params'] / 1e6:.2f}M" + (f" + D {r['discriminator_params'] / 1e6:.2f}M" if r["discriminator_params"] else "")
        latent = "x".join(str(s) for s in r["latent_shape"]) + f" ({r['latent_numbers']})"
        gan = ""
        if r.get("resolved_schedules"):
            gan = f"; GAN from step {r['resolved_schedules']['starts'].get('adversarial', '?')}"
        lines.append(
            f"| {r['label']}{' [' + ', '.join(r['overrides']) + ']' if r.get('overrides') else ''} | {r['generator']} ({params}) | {latent} | {_losses(r)}{gan} | {r['batch_size']} "
            f"| {r['steps']} ({r['epochs']:.1f}) | {r['images_per_s']:.1f} | {m['psnr']:.2f} | {m['ssim']:.3f} "
            f"| {m['sharpness_ratio']:.3f} | {m['high_frequency_ratio']:.3f} | {_fmt(m.get('lpips'), '.3f') or 'n/a'} |")
    ref = res.get("reference")
    if ref:
        lines.append(f"| *no learning: area 4x down, bicubic up* | | 3x{size // 4}x{size // 4} ({3 * (size // 4) ** 2}) | | | | "
                     f"| {ref['psnr']:.2f} | {ref['ssim']:.3f} | {ref['sharpness_ratio']:.3f} "
                     f"| {ref['high_frequency_ratio']:.3f} | {_fmt(ref.get('lpips'), '.3f') or 'n/a'} |")
    c = runs.get("ldm_kl_f4")
    notes = []
    if c is not None:
        notes.append("(c) trained " + ("WITH LPIPS(vgg)" if c["lpips_in_training"] else
                                       "WITHOUT LPIPS (the vgg backbone's ImageNet weights are not on this machine)") + ".")
    notes.append("LPIPS column: " + ("LPIPS(alex) of reconstructions vs real patches." if res.get("lpips_eval")
                                     else f"n/a ({res.get('lpips_eval_problem') or 'no weights'})."))
    lines += ["", " ".join(notes), "", "Targets: " + "; ".join(check_targets(runs, res.get("reference"))), ""]
    return lines


def markdown(results: List[Dict[str, object]], image: Optional[str]) -> str:
    lines = [BEGIN, "## Spatial latents: reconstructions of unseen photo patches at equal wall-clock", "",
             "`benchmarks/spatial_quality.py` (patches: `benchmarks/rgb_patches.py`; train and test patches come from "
             "different photographs). (a) the vector-latent conv VAE of `rgb_folder_{32,64}.yaml` without its GAN; "
             "(b) `autoencoder_kl` with f = 4, L1 + KL only; (c) the `ldm_kl_f4` recipe (PatchGAN hinge with the "
             "adaptive weight, on after a quarter of the run; LPIPS only where its weights exist). Each recipe keeps its "
             "own batch size, learning rate and loss weights; (b) and (c) share widths small enough for 2 CPU cores. "
             "Targets: (b) above the bicubic reference in PSNR; (c) >= (b) - 1 dB with a sharpness ratio in 0.9-1.1 "
             "(the former (b) >= (a) + 4 dB is retired: it came from a per-image-mean probe on easier patches).", ""]
    for res in results:
        lines += size_section(res)
    if image:
        lines += ["Test patches, top to bottom: real, (a), (b), (c)" + (" (32x32 patches shown at 2x)" if any(r["size"] == 32 for r in results) else "")
                  + ".", "", f"![real and reconstructed test patches]({image})"]
    lines.append(END)
    return "\n".join(lines)




def compose_grid(work_dir: Path, sizes: Sequence[int], path: Path) -> bool:
    """One panel per size (rows: real, (a), (b), (c)), labelled on the left; 32x32 shown at 2x next to 64x64."""
    rows: List[Tuple[Optional[str], Optional[torch.Tensor]]] = []
    for size in sizes:
        panel = [("real", work_dir / str(size) / "grid_real.pt")]
        panel += [(SHORT[v], work_dir / str(size) / v / "grid.pt") for v in VARIANTS]
        panel = [(label, torch.load(p, weights_only=True)) for label, p in panel if p.is_file()]
        if len(panel) < 2:
            continue
        if rows:
            rows.append((None, None))  # a gap between sizes
        rows += [(label if len(sizes) == 1 else f"{label} ({size})", images) for label, images in panel]
    if not rows:
        return False
    compose_rows(rows, path, show=max(64, *sizes))  # 32x32 patches are shown at 2x
    return True


# ---- main ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, choices=[32, 64], default=32)
    p.add_argument("--data-dir", default="data/rgb_patches", help="rgb_patches.py's --out (holds 32/ and 64/)")
    p.add_argument("--work-dir", default=None, help="default outputs/spatial_quality (outputs/spatial_quality_quick with --quick)")
    p.add_argument("--seconds", type=float, default=600.0, help="training seconds per run (default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kl-widths", type=int, nargs="+", default=[32, 64, 128], help="autoencoder_kl block_out_channels")
    p.add_argument("--kl-layers", type=int, default=2, help="autoencoder_kl layers_per_block")
    p.add_argument("--only", nargs="+", choices=VARIANTS, help="train only these runs (the others' results are kept)")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar=("RUN", "KEY=VALUE"),
                   help="config overrides for one run (repeatable), e.g. --set ldm_kl_f4 adversarial.weight.value=0.25")
    p.add_argument("--set-all", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--quick", action="store_true", help="smoke run: 10 s per run, 64 test patches, no docs unless --docs")
    p.add_argument("--docs", default=None, help="markdown file to write the table into (default docs/benchmarks.md)")
    p.add_argument("--no-docs", action="store_true", help="write neither the table nor the image")
    p.add_argument("--json", type=Path, help="also copy the raw results here")
    args = p.parse_args(argv)
    if args.quick and args.seconds == p.get_default("seconds"):
        args.seconds = 10.0
    args.work_dir = Path(args.work_dir or ("outputs/spatial_quality_quick" if args.quick else "outputs/spatial_quality"))
    write = not args.no_docs and (args.docs is not None or not args.quick)
    docs = Path(args.docs) if args.docs else ROOT / "docs" / "benchmarks.md"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    extra = {v[0]: v[1:] for v in args.set}
    unknown = set(extra) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--set names unknown runs {sorted(unknown)}; use {', '.join(VARIANTS)}")

    size = args.size
    root = Path(args.data_dir) / str(size)
    train_u8, test_u8 = load_split(root, "train", size), load_split(root, "test", size)
    if args.quick:
        test_u8 = test_u8[torch.linspace(0, len(test_u8) - 1, min(64, len(test_u8))).round().long().unique()]
    train_u8 = torch.cat([train_u8, train_u8.flip(-1)])  # horizontal mirror images: flip augmentation, once
    manifest = json.loads((root / "manifest.json").read_text()) if (root / "manifest.json").is_file() else {}
    data_info = {"root": str(root), "train": len(train_u8) // 2, "test": len(test_u8),
                 "train_photos": sorted(manifest.get("train", {}).get("photos", {})) or ["?"],
                 "test_photos": sorted(manifest.get("test", {}).get("photos", {})) or ["?"]}
    log.info("data: %d train patches (+ mirrored), %d test patches of %dx%d from %s", data_info["train"], len(test_u8),
             size, size, root)

    lpips_vgg_problem = lpips_problem("vgg")
    lpips_alex_problem = lpips_problem("alex")
    log.info("LPIPS(vgg) for (c)'s training: %s", "available" if lpips_vgg_problem is None else f"NOT available ({lpips_vgg_problem})")
    lpips_eval = None
    if lpips_alex_problem is None:
        from vaegan import registry

        lpips_eval = registry.load("vaegan.losses", "lpips")(net="alex", download=False).eval()

    args.work_dir.mkdir(parents=True, exist_ok=True)
    results_path = args.work_dir / f"results_{size}.json"
    previous = json.loads(results_path.read_text()) if results_path.is_file() and args.only else {}
    if previous and (previous.get("data", {}).get("root"), previous.get("data", {}).get("test")) != (str(root), len(test_u8)):
        log.warning("%s was measured on other test data; its runs are dropped", results_path)
        previous = {}
    runs: Dict[str, Dict[str, object]] = dict(previous.get("runs", {}))
    command = "python " + " ".join([Path(sys.argv[0]).as_posix() if sys.argv else "benchmarks/spatial_quality.py", *sys.argv[1:]])
    idx = grid_indices(len(test_u8))
    grid_dir = args.work_dir / str(size)
    grid_dir.mkdir(parents=True, exist_ok=True)
    torch.save(test_u8[idx].clone(), grid_dir / "grid_real.pt")
    for name in args.only or VARIANTS:
        r = train_variant(name, size, train_u8, args, lpips_vgg_problem is None, extra.get(name, []))
        model = vaegan.VAE.from_pretrained(r["final"]).eval()
        t0 = time.perf_counter()
        r["metrics"] = reconstruction_metrics(model.reconstruct, test_u8, model.value_range, lpips_eval)
        r["eval_s"] = time.perf_counter() - t0
        with torch.no_grad():
            low, high = model.value_range
            x = test_u8[idx].float().div(255).mul(high - low).add(low)
            torch.save(to_u8(model.reconstruct(x), model.value_range), Path(r["final"]).parent / "grid.pt")
        r.update(date=datetime.date.today().isoformat(), command=command, budget_s=args.seconds)
        runs[name] = r
        log.info("%s: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in r["metrics"].items()))
    reference = reconstruction_metrics(bicubic_reference, test_u8, (-1.0, 1.0), lpips_eval)
    results = {"size": size, "hardware": hardware(), "torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "data": data_info, "runs": runs, "reference": reference,
               "lpips_eval": lpips_eval is not None, "lpips_eval_problem": lpips_alex_problem,
               "lpips_train_problem": lpips_vgg_problem}
    results["targets"] = check_targets(runs, reference)
    results_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")

    sys.stdout.write("\n" + "\n".join(size_section({**results, "runs": {k: runs[k] for k in VARIANTS if k in runs}})) + "\n")
    if write:
        sizes = sorted(int(f.stem.split("_")[1]) for f in args.work_dir.glob("results_*.json"))
        all_results = [json.loads((args.work_dir / f"results_{s}.json").read_text()) for s in sizes]
        image = docs.parent / "images" / "spatial_reconstructions.png"
        has_image = compose_grid(args.work_dir, sizes, image)
        rel = Path(image).relative_to(docs.parent).as_posix() if has_image else None
        write_block(docs, markdown(all_results, rel), BEGIN, END)
        log.info("wrote %s%s", docs, f" and {image}" if has_image else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
