"""Quality benchmark: does vaegan's VAE-GAN give sharper, more faithful digits than a plain VAE, and do
its default sampler and defaults beat those of vaegan 0.2?

Trains, on identical data (the MNIST training digits under --data-dir) with the same number of
images seen and the same seed, and evaluates on the test digits (vaegan.evaluation's protocol):

1. ``plain_vae``       the seed documents' conv VAE: MSE + KL, no discriminator;
2. ``vae_perceptual``  the same VAE plus the SSIM and focal-frequency terms;
3. ``vaegan_0.2``      vaegan 0.2's MNIST defaults (D judges N(0, I) samples only, no sampler), also with a
                       50-component Gaussian mixture fitted after training (a sampler alone);
4. ``vaegan``          the MNIST recipe's current defaults, with the sampler it fits at the end of training
                       (its default) and with N(0, I).

Reference rows (no training): real training digits and 3x3-box-blurred real digits against the test set.
Writes a markdown table and side-by-side sample grids into docs/benchmarks.md (between markers) and the
raw numbers into <work-dir>/results.json, and checks the targets: VAE-GAN FD <= 0.3x the baseline's,
sharpness ratio in [0.85, 1.15], PSNR no more than 1 dB below the baseline's; and against vaegan 0.2's
defaults (issue 15): FD with the default sampler <= 0.5x, sharpness 0.9-1.1, recall not lower, PSNR >=
19.2 dB, 20 epochs in at most 15 minutes.

    python benchmarks/mnist_quality.py --data-dir ../shared/data            # 20 epochs each
    python benchmarks/mnist_quality.py --data-dir ../shared/data --quick    # 2 epochs, 2,000 samples
    python benchmarks/mnist_quality.py --data-dir ../shared/data --only vaegan --set vaegan adversarial.weight=0.3
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import vaegan
from vaegan.config import DataConfig, EvalConfig, ExperimentConfig, apply_overrides
from vaegan.data import build_dataset
from vaegan.evaluation import _Features, evaluate, load_or_train_classifier
from vaegan.metrics import ClassHistogram, HighFrequencyRatio, PrecisionRecall, SharpnessRatio
from vaegan.samplers import (
    default_sampler_name,
    fit_sampler,
    load_sampler,
    sample_latents,
    save_sampler,
    saved_samplers,
)

sys.path.insert(0, str(Path(__file__).parent))
from machine import DEFAULTS_0_2, hardware, write_block  # noqa: E402  (run as a script from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: Dict[str, List[str]] = {
    "plain_vae": ["losses=[{name: mse}, {name: kl}]", "discriminator=null", "adversarial=null", "sampler=null"],
    "vae_perceptual": ["losses=[{name: mse}, {name: kl}, {name: ssim, weight: 0.5}, {name: focal_frequency, weight: 1.0}]",
                       "discriminator=null", "adversarial=null", "sampler=null"],
    "vaegan_0.2": DEFAULTS_0_2,
    "vaegan": [],  # the recipe's defaults
}
POST_HOC = {"vaegan_0.2": ("gmm", {"n_components": 50})}  # a sampler fitted after training, not its default
BEGIN, END = "<!-- mnist_quality:begin -->", "<!-- mnist_quality:end -->"


def _previous_run(name: str, args) -> Optional[Dict[str, object]]:
    """With --reuse: this variant's training record from the work dir's results.json, when its model is there."""
    results = Path(args.work_dir) / "results.json"
    if not args.reuse or not results.is_file() or not (Path(args.work_dir) / name / "final" / "config.json").is_file():
        return None
    return next((r for r in json.loads(results.read_text())["runs"] if r["variant"] == name), None)


def train_variant(name: str, extra: List[str], args) -> List[Dict[str, object]]:
    """Train one variant; one row per way of drawing its latents (N(0, I), then every fitted sampler).

    With ``--reuse``, a variant trained by an earlier run of this script (same work dir) is not trained again:
    its model and training time are read back, the configured sampler is fitted again as training ends (it is
    deterministic), and a row is evaluated again unless its saved result used the same sampler and temperature.
    """
    from vaegan._compat import reset_accelerate_state
    from vaegan.samplers import fit_after_training

    reset_accelerate_state()  # one Accelerator per variant in this process
    out = Path(args.work_dir) / name
    shutil.rmtree(out, ignore_errors=True)  # scratch: a rerun replaces it (a run refuses a folder that holds one)
    cfg = apply_overrides(ExperimentConfig(), [
        f"data.root={args.data_dir}", "data.download=false", f"train.output_dir={out}", f"train.epochs={args.epochs}",
        f"train.seed={args.seed}", "train.checkpoint_every=0", "train.sample_every=0", "train.log_every=100",
        *VARIANTS[name], *extra])
    previous = _previous_run(name, args)
    if previous is None:
        t0 = time.perf_counter()
        trainer = vaegan.build_trainer(cfg)
        final = trainer.fit()
        wall = time.perf_counter() - t0
        trained = {"wall_s": wall, "images_per_s": trainer.state.images_seen / wall, "steps": trainer.state.step,
                   "images_seen": trainer.state.images_seen}
        logging.info("%s: trained %d steps in %.0f s (%.0f images/s)", name, trainer.state.step, wall,
                     trained["images_per_s"])
    else:
        final = out / "final"
        trained = {k: previous[k] for k in ("wall_s", "images_per_s", "steps", "images_seen")}
        logging.info("%s: reusing the model trained in %.0f s", name, trained["wall_s"])
    model = vaegan.VAE.from_pretrained(final)
    if previous is not None and cfg.sampler is not None:
        fit_after_training(model, build_dataset(cfg.data, cfg.model), cfg, final)
    if name in POST_HOC and (previous is None or POST_HOC[name][0] not in saved_samplers(final)):
        sampler_name, options = POST_HOC[name]
        sampler, record = fit_sampler(model, build_dataset(cfg.data, cfg.model), sampler_name, options, seed=args.seed)
        save_sampler(sampler, final, default=False, fitted_on=record)
    default = default_sampler_name(final)
    rows = []
    for sampler_name in ["normal", *saved_samplers(final)]:
        sampler = None if sampler_name == "normal" else load_sampler(final, sampler_name, model.latent_shape)
        label = name if sampler is None else f"{name} + {sampler_name}"
        saved = out / f"eval_{sampler_name}.json"
        source = f"{sampler.name} (temperature {sampler.temperature:g})" if sampler else "normal (the model's prior)"
        metrics = json.loads(saved.read_text()) if previous is not None and saved.is_file() else None
        stale = metrics is None or metrics["protocol"]["sampler"] != source
        if stale or metrics["protocol"]["num_samples"] != args.num_samples:
            t1 = time.perf_counter()
            metrics = evaluate(model, DataConfig(root=args.data_dir, download=False),
                               EvalConfig(split="test", num_samples=args.num_samples, nll_images=args.nll_images,
                                          nll_samples=args.nll_samples), output=saved, sampler=sampler)
            logging.info("%s: evaluated in %.0f s", label, time.perf_counter() - t1)
        rows.append({"name": label, "variant": name, "sampler": sampler_name, "default": sampler_name == default,
                     "temperature": sampler.temperature if sampler else 1.0, "overrides": VARIANTS[name] + extra,
                     **trained, **metrics, "final": str(final)})
    return rows


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
        hist, pr = ClassHistogram(), PrecisionRecall()
        with torch.no_grad():
            for batch in real.split(1000):
                fid.update(batch, real=True), sharp.update(batch, real=True), hf.update(batch, real=True)
                pr.update(clf.features(batch), real=True)
            for batch in images.split(1000):
                fid.update(batch, real=False), sharp.update(batch, real=False), hf.update(batch, real=False)
                hist.update(clf(batch)), pr.update(clf.features(batch), real=False)
        rows.append({"name": name, "fd_classifier": float(fid.compute()), "sharpness_ratio": float(sharp.compute()),
                     "high_frequency_ratio": float(hf.compute()),
                     "classifier_confidence": float(hist.compute()["confidence"]),
                     **{k: float(v) for k, v in pr.compute().items()}})
    return rows


def sample_grid(results: List[Dict[str, object]], path: Path) -> None:
    """64 samples of every row (its own sampler), side by side, the same seed for all."""
    from torchvision.utils import make_grid, save_image

    panels = []
    for r in results:
        model = vaegan.VAE.from_pretrained(r["final"])
        sampler = None if r["sampler"] == "normal" else load_sampler(r["final"], r["sampler"], model.latent_shape)
        z = sample_latents(model, 64, generator=torch.Generator().manual_seed(0), sampler=sampler)
        with torch.no_grad():
            panels.append(make_grid(model.decode(z), nrow=8, padding=2, pad_value=1.0))
    sep = torch.ones(panels[0].shape[0], panels[0].shape[1], 8)
    row = torch.cat([t for p in panels for t in (p, sep)][:-1], dim=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(row, path)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def check_targets(rows: Dict[str, Dict[str, object]]) -> List[str]:
    base = rows.get("plain_vae")
    gan = next((r for r in rows.values() if r["variant"] == "vaegan" and r["default"]), None)
    old = rows.get("vaegan_0.2")
    if not base or not gan:
        return ["targets need both plain_vae and vaegan"]
    targets = [
        f"FD ratio {gan['fd_classifier'] / base['fd_classifier']:.3f} (target <= 0.30): "
        + _verdict(gan["fd_classifier"] <= 0.3 * base["fd_classifier"]),
        f"sharpness ratio {gan['sharpness_ratio']:.3f} (target 0.85-1.15): "
        + _verdict(0.85 <= gan["sharpness_ratio"] <= 1.15),
        f"PSNR {gan['psnr']:.2f} dB vs baseline {base['psnr']:.2f} dB (target >= baseline - 1): "
        + _verdict(gan["psnr"] >= base["psnr"] - 1.0),
    ]
    if old:
        targets += [
            f"FD vs vaegan 0.2's defaults {gan['fd_classifier']:.1f} / {old['fd_classifier']:.1f} = "
            f"{gan['fd_classifier'] / old['fd_classifier']:.3f} (target <= 0.5): "
            + _verdict(gan["fd_classifier"] <= 0.5 * old["fd_classifier"]),
            f"sharpness {gan['sharpness_ratio']:.3f} (target 0.9-1.1): "
            + _verdict(0.9 <= gan["sharpness_ratio"] <= 1.1),
            f"recall {gan['recall']:.3f} vs vaegan 0.2's {old['recall']:.3f} (target not lower): "
            + _verdict(gan["recall"] >= old["recall"]),
            f"PSNR {gan['psnr']:.2f} dB (target >= 19.2): " + _verdict(gan["psnr"] >= 19.2),
            f"20 epochs in {gan['wall_s'] / 60:.1f} min (target <= 15): " + _verdict(gan["wall_s"] <= 900),
        ]
    return targets


def markdown(results, refs, targets, args, command: str) -> str:
    date = datetime.date.today().isoformat()
    lines = [BEGIN, f"## MNIST quality ({date}; {hardware()}, torch {torch.__version__})", "",
             f"Command: `{command}`", "",
             f"{args.epochs} epochs over {results[0]['images_seen'] // max(1, args.epochs) if results else '?'} training "
             f"digits each (batch 64, seed {args.seed}); evaluated on the test digits with {args.num_samples} "
             f"samples (EMA generator; latents from N(0, I) or from the named sampler), NLL on {args.nll_images} "
             f"test digits with K = {args.nll_samples} "
             "(Bernoulli, inputs binarised). FD: Fréchet distance in the penultimate layer of vaegan's digit "
             "classifier trained on the training split (not comparable with Inception FIDs).", "",
             "| run (latents from) | FD (lower) | sharpness ratio (1 = real) | HF ratio | classifier confidence | "
             "PSNR dB | SSIM | NLL nats (bits/dim) | classes covered | precision / recall | wall s | images/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        source = "N(0, I)" if r["sampler"] == "normal" else f"{r['sampler']}, temperature {r['temperature']:g}"
        label = f"{r['variant']} ({source}{', default' if r['default'] and r['sampler'] != 'normal' else ''})"
        lines.append(
            f"| {label} | {r['fd_classifier']:.1f} | {r['sharpness_ratio']:.3f} | {r['high_frequency_ratio']:.3f} "
            f"| {r['classifier_confidence']:.3f} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['nll_nats']:.1f} "
            f"({r['nll_bits_per_dim']:.3f}) | {r['classes_covered']} | {r['precision']:.2f} / {r['recall']:.2f} "
            f"| {r['wall_s']:.0f} | {r['images_per_s']:.0f} |")
    for r in refs:
        lines.append(f"| *{r['name']}* | {r['fd_classifier']:.1f} | {r['sharpness_ratio']:.3f} | "
                     f"{r['high_frequency_ratio']:.3f} | {r['classifier_confidence']:.3f} | | | | | "
                     f"{r['precision']:.2f} / {r['recall']:.2f} | | |")
    lines += ["", "Targets: " + "; ".join(targets), "",
              "Samples (the same seed), left to right: " + ", ".join(r["name"] for r in results) + ".", "",
              "![samples](images/mnist_quality_samples.png)", END]
    return "\n".join(lines)




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
    p.add_argument("--reuse", action="store_true",
                   help="do not retrain variants whose models an earlier run left in --work-dir (re-evaluates)")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.num_samples, args.nll_images = 2, 2000, 200
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    extra = {v[0]: v[1:] for v in args.set}
    results = [row for name in (args.only or VARIANTS) for row in train_variant(name, extra.get(name, []), args)]
    refs = reference_rows(args)
    targets = check_targets({r["name"]: r for r in results})
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.work_dir) / "results.json").write_text(json.dumps({"runs": results, "references": refs,
                                                                  "targets": targets}, indent=2))
    for t in targets:
        logging.info("target: %s", t)
    if not args.no_docs:
        sample_grid(results, Path(args.docs).parent / "images" / "mnist_quality_samples.png")
        write_block(Path(args.docs), markdown(results, refs, targets, args, "python " + " ".join(sys.argv)), BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
