"""Anomaly detection on MNIST, one class out: which per-image score of `vaegan score` separates best?

For each digit k: train on the training digits that are not k (``data.options.classes``), score the
first ``--test-limit`` test digits with :func:`vaegan.scoring.score`, and measure the AUROC of "digit
k" against "any other digit" for every score (higher = more anomalous; for the discriminator's logit,
a lower logit is more anomalous). Two models per digit, same data, epochs and seed:

1. ``plain_vae``  the seed documents' conv VAE: BCE + KL, no discriminator;
2. ``vaegan``     the MNIST recipe's VAE-GAN (its defaults).

Writes a markdown table into docs/benchmarks.md (between markers) and the raw numbers into
<work-dir>/results.json.

    python benchmarks/anomaly.py --data-dir ../shared/data                 # 10 digits x 2 models, ~15 min on 2 cores
    python benchmarks/anomaly.py --data-dir ../shared/data --digits 0 7 --epochs 1 --no-docs   # a quick look
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
from typing import Dict, List

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

import vaegan
from vaegan.config import DataConfig, ExperimentConfig, ModelConfig, apply_overrides
from vaegan.data import build_dataset
from vaegan.export import load_discriminator
from vaegan.scoring import score

sys.path.insert(0, str(Path(__file__).parent))
from machine import hardware, write_block  # noqa: E402  (run as a script from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: Dict[str, List[str]] = {
    "plain_vae": ["discriminator=null", "adversarial=null", "sampler=null"],
    "vaegan": ["sampler=null"],  # the recipe's defaults; no sampler is needed to score
}
# score -> sign that makes "higher = more anomalous"
SCORES = {"neg_elbo_nats": 1.0, "nll_nats": 1.0, "recon_mse": 1.0, "kl_nats": 1.0, "disc_logit": -1.0}
BEGIN, END = "<!-- anomaly:begin -->", "<!-- anomaly:end -->"


def run_digit(k: int, variant: str, args) -> Dict[str, object]:
    from vaegan._compat import reset_accelerate_state

    reset_accelerate_state()
    out = Path(args.work_dir) / f"{variant}_without_{k}"
    shutil.rmtree(out, ignore_errors=True)  # scratch: a rerun replaces it (a run refuses a folder that holds one)
    keep = [d for d in range(10) if d != k]
    cfg = apply_overrides(ExperimentConfig(), [
        f"data.root={args.data_dir}", "data.download=false", f"data.options={{classes: {keep}}}",
        f"train.output_dir={out}", f"train.epochs={args.epochs}", f"train.seed={args.seed}", "train.checkpoint_every=0",
        "train.sample_every=0", "train.log_every=100", "train.plot_loss_curves=false", *VARIANTS[variant]])
    t0 = time.perf_counter()
    final = vaegan.build_trainer(cfg).fit()
    wall = time.perf_counter() - t0
    model = vaegan.VAE.from_pretrained(final)
    test = build_dataset(DataConfig(root=args.data_dir, split="test", download=False, limit=args.test_limit),
                         ModelConfig())
    t1 = time.perf_counter()
    scores = score(model, test, num_samples=args.nll_samples, seed=args.seed, batch_size=500,
                   discriminator=load_discriminator(final))
    is_k = scores["label"] == k
    aurocs = {name: float(roc_auc_score(is_k, sign * scores[name])) for name, sign in SCORES.items() if name in scores}
    logging.info("digit %d, %s: trained in %.0f s, scored in %.0f s: %s", k, variant, wall,
                 time.perf_counter() - t1, {n: round(a, 3) for n, a in aurocs.items()})
    return {"digit": k, "variant": variant, "train_s": wall, "test_images": int(len(is_k)),
            "anomalies": int(is_k.sum()), "auroc": aurocs}


def markdown(results: List[Dict[str, object]], args, command: str) -> str:
    date = datetime.date.today().isoformat()
    digits = sorted({r["digit"] for r in results})
    lines = [BEGIN, f"## Anomaly detection, MNIST one class out ({date}; {hardware()}, torch {torch.__version__})", "",
             f"Command: `{command}`", "",
             f"Per digit k: train {args.epochs} epochs on the training digits other than k (seed {args.seed}), score "
             f"the first {results[0]['test_images']} test digits with `vaegan.scoring.score` (K = {args.nll_samples} "
             "importance samples), AUROC of digit k against the rest (0.5 = chance; the discriminator's logit counts "
             "lower as more anomalous). Mean over the digits in the last column.", ""]
    for variant in VARIANTS:
        rows = [r for r in results if r["variant"] == variant]
        if not rows:
            continue
        names = [n for n in SCORES if n in rows[0]["auroc"]]
        lines += [f"**{variant}**", "", "| score | " + " | ".join(str(d) for d in digits) + " | mean |",
                  "| --- |" + " ---: |" * (len(digits) + 1)]
        for n in names:
            values = [next(r["auroc"][n] for r in rows if r["digit"] == d) for d in digits]
            lines.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in values) + f" | **{np.mean(values):.3f}** |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)




def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder holding MNIST/raw")
    p.add_argument("--work-dir", default="outputs/anomaly")
    p.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-limit", type=int, default=2000, help="score the first N test digits")
    p.add_argument("--nll-samples", type=int, default=10, help="K importance samples per image")
    p.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--no-docs", action="store_true", help="do not touch docs/")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    results = [run_digit(k, variant, args) for k in args.digits for variant in VARIANTS]
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.work_dir) / "results.json").write_text(json.dumps(results, indent=2))
    if not args.no_docs:
        write_block(Path(args.docs), markdown(results, args, "python " + " ".join(sys.argv)), BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
