"""Quality benchmark: does vaegan's VAE-GAN give sharper, more faithful digits than a plain VAE?

Trains, on identical data (the MNIST training digits under --data-dir) with the same number of
images seen and the same seed, and evaluates on the test digits (vaegan.evaluation's protocol):

1. ``plain_vae``       the seed documents' conv VAE: MSE + KL, no discriminator;
2. ``vae_perceptual``  the same VAE plus the SSIM and focal-frequency terms;
3. ``vaegan``          the MNIST VAE-GAN recipe's default configuration.

Reference rows (no training): real training digits and 3x3-box-blurred real digits against the test set.
Writes a markdown table and side-by-side sample grids into docs/benchmarks.md (between markers) and the
raw numbers into <work-dir>/results.json, and checks the targets: VAE-GAN FD <= 0.3x the baseline's,
sharpness ratio in [0.85, 1.15], PSNR no more than 1 dB below the baseline's.

    python benchmarks/mnist_quality.py --data-dir ../shared/data            # 20 epochs each
    python benchmarks/mnist_quality.py --data-dir ../shared/data --quick    # 2 epochs, 2,000 samples
    python benchmarks/mnist_quality.py --data-dir ../shared/data --only vaegan --set vaegan adversarial.weight=0.3
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

import vaegan
from vaegan.config import DataConfig, EvalConfig, ExperimentConfig, apply_overrides
from vaegan.data import build_dataset
from vaegan.evaluation import _Features, evaluate, load_or_train_classifier
from vaegan.metrics import HighFrequencyRatio, SharpnessRatio

sys.path.insert(0, str(Path(__file__).parent))
from machine import hardware  # noqa: E402  (run as a script from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: Dict[str, List[str]] = {
    "plain_vae": ["losses=[{name: mse}, {name: kl}]", "discriminator=null", "adversarial=null"],
    "vae_perceptual": ["losses=[{name: mse}, {name: kl}, {name: ssim, weight: 0.5}, {name: focal_frequency, weight: 1.0}]",
                       "discriminator=null", "adversarial=null"],
    "vaegan": [],  # the recipe's defaults
}
BEGIN, END = "<!-- mnist_quality:begin -->", "<!-- mnist_quality:end -->"


def train_variant(name: str, extra: List[str], args) -> Dict[str, object]:
    from vaegan._compat import reset_accelerate_state

    reset_accelerate_state()  # one Accelerator per variant in this process
    out = Path(args.work_dir) / name
    cfg = apply_overrides(ExperimentConfig(), [
        f"data.root={args.data_dir}", "data.download=false", f"train.output_dir={out}", f"train.epochs={args.epochs}",
        f"train.seed={args.seed}", "train.checkpoint_every=0", "train.sample_every=0", "train.log_every=100",
        *VARIANTS[name], *extra])
    t0 = time.perf_counter()
    trainer = vaegan.build_trainer(cfg)
    final = trainer.fit()
    wall = time.perf_counter() - t0
    ips = trainer.state.images_seen / wall
    logging.info("%s: trained %d steps in %.0f s (%.0f images/s)", name, trainer.state.step, wall, ips)
    model = vaegan.VAE.from_pretrained(final)
    t1 = time.perf_counter()
    metrics = evaluate(model, DataConfig(root=args.data_dir, download=False),
                       EvalConfig(split="test", num_samples=args.num_samples, nll_images=args.nll_images,
                                  nll_samples=args.nll_samples), output=out / "eval.json")
    logging.info("%s: evaluated in %.0f s", name, time.perf_counter() - t1)
    return {"name": name, "overrides": VARIANTS[name] + extra, "wall_s": wall, "images_per_s": ips,
            "steps": trainer.state.step, "images_seen": trainer.state.images_seen, **metrics, "final": str(final)}


@torch.no_grad()
def reference_rows(args) -> List[Dict[str, object]]:
    """FD/sharpness of real training digits and of box-blurred ones, against the test digits."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    model_cfg = ExperimentConfig().model
    test = build_dataset(DataConfig(root=args.data_dir, split="test", download=False), model_cfg)
    train = build_dataset(DataConfig(root=args.data_dir, split="train", download=False), model_cfg)
    clf = load_or_train_classifier(DataConfig(root=args.data_dir), model_cfg)
    real = test[torch.arange(len(test))]
    fake_real = train[torch.arange(min(args.num_samples, len(train)))]
    rows = []
    for name, images in (("real train digits", fake_real),
                         ("3x3 box-blurred train digits", F.avg_pool2d(F.pad(fake_real, (1, 1, 1, 1), mode="replicate"), 3, 1))):
        fid, sharp, hf = FrechetInceptionDistance(feature=_Features(clf)), SharpnessRatio(), HighFrequencyRatio()
        for batch in real.split(1000):
            fid.update(batch, real=True), sharp.update(batch, real=True), hf.update(batch, real=True)
        for batch in images.split(1000):
            fid.update(batch, real=False), sharp.update(batch, real=False), hf.update(batch, real=False)
        rows.append({"name": name, "fd_classifier": float(fid.compute()), "sharpness_ratio": float(sharp.compute()),
                     "high_frequency_ratio": float(hf.compute())})
    return rows


def sample_grid(results: List[Dict[str, object]], path: Path) -> None:
    from torchvision.utils import make_grid, save_image

    panels = []
    for r in results:
        model = vaegan.VAE.from_pretrained(r["final"])
        samples = model.sample(64, generator=torch.Generator().manual_seed(0))
        panels.append(make_grid(samples, nrow=8, padding=2, pad_value=1.0))
    sep = torch.ones(panels[0].shape[0], panels[0].shape[1], 8)
    row = torch.cat([t for p in panels for t in (p, sep)][:-1], dim=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(row, path)


def check_targets(rows: Dict[str, Dict[str, object]]) -> List[str]:
    base, gan = rows.get("plain_vae"), rows.get("vaegan")
    if not base or not gan:
        return ["targets need both plain_vae and vaegan"]
    return [
        f"FD ratio {gan['fd_classifier'] / base['fd_classifier']:.3f} (target <= 0.30): "
        + ("PASS" if gan["fd_classifier"] <= 0.3 * base["fd_classifier"] else "FAIL"),
        f"sharpness ratio {gan['sharpness_ratio']:.3f} (target 0.85-1.15): "
        + ("PASS" if 0.85 <= gan["sharpness_ratio"] <= 1.15 else "FAIL"),
        f"PSNR {gan['psnr']:.2f} dB vs baseline {base['psnr']:.2f} dB (target >= baseline - 1): "
        + ("PASS" if gan["psnr"] >= base["psnr"] - 1.0 else "FAIL"),
    ]


def markdown(results, refs, targets, args, command: str) -> str:
    date = datetime.date.today().isoformat()
    lines = [BEGIN, f"## MNIST quality ({date}; {hardware()}, torch {torch.__version__})", "",
             f"Command: `{command}`", "",
             f"{args.epochs} epochs over {results[0]['images_seen'] // max(1, args.epochs) if results else '?'} training "
             f"digits each (batch 64, seed {args.seed}); evaluated on the test digits with {args.num_samples} prior "
             f"samples (EMA generator), NLL on {args.nll_images} test digits with K = {args.nll_samples} "
             "(Bernoulli, inputs binarised). FD: Fréchet distance in the penultimate layer of vaegan's digit "
             "classifier trained on the training split (not comparable with Inception FIDs).", "",
             "| run | FD (lower) | sharpness ratio (1 = real) | HF ratio | PSNR dB | SSIM | NLL nats (bits/dim) | "
             "classes covered | precision / recall | wall s | images/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['fd_classifier']:.1f} | {r['sharpness_ratio']:.3f} | {r['high_frequency_ratio']:.3f} "
            f"| {r['psnr']:.2f} | {r['ssim']:.3f} | {r['nll_nats']:.1f} ({r['nll_bits_per_dim']:.3f}) "
            f"| {r['classes_covered']} | {r['precision']:.2f} / {r['recall']:.2f} | {r['wall_s']:.0f} | {r['images_per_s']:.0f} |")
    for r in refs:
        lines.append(f"| *{r['name']}* | {r['fd_classifier']:.1f} | {r['sharpness_ratio']:.3f} | "
                     f"{r['high_frequency_ratio']:.3f} | | | | | | | |")
    lines += ["", "Targets: " + "; ".join(targets), "",
              "Prior samples, left to right: " + ", ".join(r["name"] for r in results) + ".", "",
              "![samples](images/mnist_quality_samples.png)", END]
    return "\n".join(lines)


def write_docs(block: str, path: Path) -> None:
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder holding MNIST/raw")
    p.add_argument("--work-dir", default="outputs/mnist_quality")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=10000)
    p.add_argument("--nll-images", type=int, default=1000)
    p.add_argument("--nll-samples", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="2 epochs, 2,000 samples, NLL on 200 images")
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="train only these variants")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar=("VARIANT", "KEY=VALUE"),
                   help="extra overrides for one variant (repeatable)")
    p.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.num_samples, args.nll_images = 2, 2000, 200
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    extra = {v[0]: v[1:] for v in args.set}
    results = [train_variant(name, extra.get(name, []), args) for name in (args.only or VARIANTS)]
    refs = reference_rows(args)
    targets = check_targets({r["name"]: r for r in results})
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.work_dir) / "results.json").write_text(json.dumps({"runs": results, "references": refs,
                                                                  "targets": targets}, indent=2))
    for t in targets:
        logging.info("target: %s", t)
    if not args.no_docs:
        sample_grid(results, Path(args.docs).parent / "images" / "mnist_quality_samples.png")
        write_docs(markdown(results, refs, targets, args, "python " + " ".join(sys.argv)), Path(args.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
