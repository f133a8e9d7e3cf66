"""The phase-1 spatial autoencoder's training speed in fp32, bf16 autocast, bf16 + channels_last and
torch.compile, through the trainer, at 32 and 64 px; and whether bf16 keeps its held-out PSNR.

The model and objective are ``decoder_finetune.py``'s phase 1 (``autoencoder_kl`` f4, widths 16/32/64,
4 latent channels, L1 + ST-LPIPS(alex) 0.25 + KL 1e-6, no GAN; batch 16) on the photo patches of
``rgb_patches.py``. Each measurement is its own process (so a compiled graph or a bf16 kernel choice never
leaks into the next one), trains a few warm-up steps (compilation happens there), then times steps until
``--seconds`` have passed; the settings alternate, round after round, and the table gives the median of
``--rounds`` rounds, so a busy moment of the machine lands in one round of every setting rather than in
all rounds of one.

``--quality-steps N`` also trains fp32 and bf16 for the same N steps from the same seed and compares their
held-out PSNR (test patches from photographs never trained on; EMA weights, posterior mean).

    python benchmarks/rgb_patches.py --out data/rgb_patches           # once: the patches
    python benchmarks/precision_speed.py                              # 32 and 64 px, 3 rounds (about 15 min)
    python benchmarks/precision_speed.py --sizes 32 --quality-steps 100
    python benchmarks/precision_speed.py --sizes 64 --rounds 1        # on a GPU (Accelerate picks it)

Writes ``outputs/precision_speed/results.json`` and a table between ``<!-- precision_speed:begin -->`` and
``<!-- precision_speed:end -->`` in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decoder_finetune import COMMON, PHASE1, RECIPES  # noqa: E402  (run as a script from benchmarks/)
from machine import hardware, write_block  # noqa: E402
from patch_eval import load_split, reconstruction_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- precision_speed:begin -->", "<!-- precision_speed:end -->"
SETTINGS: Dict[str, List[str]] = {
    "fp32": ["train.mixed_precision=no"],
    "bf16": ["train.mixed_precision=bf16"],
    "bf16_cl": ["train.mixed_precision=bf16", "train.channels_last=true"],
    "compiled": ["train.mixed_precision=no", "train.compile=inductor"],
}
LABELS = {"fp32": "fp32", "bf16": "bf16 autocast", "bf16_cl": "bf16 + channels_last",
          "compiled": "fp32, torch.compile (inductor)"}
log = logging.getLogger("precision_speed")


def config(size: int, out: Path, steps: int, setting: str, extra: Sequence[str] = ()):
    from vaegan.config import load_config

    return load_config(RECIPES / "ldm_kl_f4.yaml", [
        f"model.image_size=[{size}, {size}]", *PHASE1, *COMMON, f"train.output_dir={out}", "train.epochs=100000",
        f"train.max_steps={steps}", "train.checkpoint_every=0", "train.plot_loss_curves=false",
        *SETTINGS[setting], *extra])


def measure(args) -> Dict[str, float]:
    """One process, one setting: images/s over the steps after ``--warmup``, until ``--seconds`` passed."""
    import vaegan
    from vaegan.data import TensorImages

    train_u8 = load_split(Path(args.data_dir) / str(args.size), "train", args.size)
    out = Path(args.work_dir) / f"{args.worker}_{args.size}"
    shutil.rmtree(out, ignore_errors=True)  # scratch: a rerun replaces it (a run refuses a folder that holds one)
    cfg = config(args.size, out, 10**9, args.worker, args.set)

    class Clock(vaegan.Callback):
        t0 = images0 = None
        steps = 0
        elapsed = 0.0

        def on_step_end(self, trainer, output) -> None:
            if trainer.accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            if trainer.state.step == args.warmup:
                self.t0, self.images0 = time.perf_counter(), trainer.state.images_seen
            elif self.t0 is not None:
                self.elapsed, self.steps = time.perf_counter() - self.t0, trainer.state.step - args.warmup
                self.images = trainer.state.images_seen - self.images0
                if self.elapsed >= args.seconds and self.steps >= args.min_steps:
                    trainer.stop()

    clock = Clock()
    t0 = time.perf_counter()
    trainer = vaegan.build_trainer(cfg, callbacks=[clock], dataset=TensorImages(train_u8, (-1.0, 1.0)))
    trainer.fit()
    return {"images_per_s": clock.images / clock.elapsed, "measured_steps": clock.steps,
            "warmup_s": clock.t0 - t0, "precision": trainer.accelerator.mixed_precision}


def equal_steps_psnr(args, size: int) -> Dict[str, Dict[str, float]]:
    """fp32 and bf16 trained for ``--quality-steps`` from the same seed; their held-out metrics."""
    import vaegan
    from vaegan._compat import reset_accelerate_state
    from vaegan.data import TensorImages

    root = Path(args.data_dir) / str(size)
    train_u8, test_u8 = load_split(root, "train", size), load_split(root, "test", size)
    res = {}
    for setting in ("fp32", "bf16"):
        reset_accelerate_state()
        out = Path(args.work_dir) / f"quality_{setting}"
        shutil.rmtree(out, ignore_errors=True)  # scratch: a rerun replaces it (a run refuses a folder that holds one)
        cfg = config(size, out, args.quality_steps, setting, args.set)
        t0 = time.perf_counter()
        final = vaegan.build_trainer(cfg, dataset=TensorImages(train_u8, (-1.0, 1.0))).fit()
        model = vaegan.VAE.from_pretrained(str(final)).eval()
        m = reconstruction_metrics(model.reconstruct, test_u8, model.value_range, None)
        res[setting] = {"psnr": m["psnr"], "ssim": m["ssim"], "wall_s": time.perf_counter() - t0}
        log.info("%s after %d steps: %.3f dB", setting, args.quality_steps, m["psnr"])
    return res


def markdown(res: Dict[str, object]) -> str:
    lines = [BEGIN, f"## The phase-1 spatial model: fp32, bf16, channels_last, compiled ({res['date']}; "
             f"{res['hardware']}, torch {res['torch']})", "",
             f"`{res['command']}`: the trainer on `decoder_finetune.py`'s phase-1 model and objective "
             "(`autoencoder_kl` f4, widths 16/32/64, 4 latent channels, L1 + ST-LPIPS(alex) 0.25 + KL, batch 16) on "
             f"the photo patches; each cell is the median of {res['rounds']} alternating rounds (one process each, "
             f"timed for at least {res['seconds']:g} s and {res['min_steps']} steps after {res['warmup']} warm-up steps, "
             "2 more when compiled), the rounds in brackets"
             + (f"; {', '.join(LABELS[s] for s in res['once'])}: one round" if res.get("once") else "") + ".", "",
             "| setting | " + " | ".join(f"{s} px images/s | vs fp32" for s in res["sizes"]) + " |",
             "| --- | " + " | ".join("---: | ---:" for _ in res["sizes"]) + " |"]
    for setting in res["settings"]:
        cells = []
        for size in res["sizes"]:
            runs = res["speed"][str(size)][setting]
            med, base = runs["median"], res["speed"][str(size)]["fp32"]["median"]
            rounds = " / ".join(f"{v:.1f}" for v in runs["rounds"])
            cells.append(f"{med:.1f} ({rounds}) | {med / base:.2f}x")
        lines.append(f"| {LABELS[setting]} | " + " | ".join(cells) + " |")
    quality = res.get("quality")
    if quality:
        d = quality["bf16"]["psnr"] - quality["fp32"]["psnr"]
        lines += ["", f"Held-out PSNR after {res['quality_steps']} steps from the same seed ({res['quality_size']} px): "
                  f"fp32 {quality['fp32']['psnr']:.3f} dB, bf16 {quality['bf16']['psnr']:.3f} dB ({d:+.3f} dB; "
                  f"target within 0.1 dB: {'PASS' if abs(d) <= 0.1 else 'FAIL'})."]
    lines.append(END)
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--once", nargs="*", choices=list(SETTINGS), default=[],
                   help="settings measured in the first round only (compiled: minutes of compilation per process)")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement (after the warm-up)")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation happens there)")
    p.add_argument("--min-steps", type=int, default=3, help="timed steps at least, however long they take")
    p.add_argument("--quality-steps", type=int, default=0, help="also compare fp32 and bf16 PSNR after N steps")
    p.add_argument("--data-dir", default="data/rgb_patches", help="rgb_patches.py's --out")
    p.add_argument("--work-dir", default="outputs/precision_speed")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides of every run")
    p.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--worker", choices=list(SETTINGS), help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.worker:
        logging.getLogger().setLevel(logging.WARNING)
        sys.stdout.write(json.dumps(measure(args)) + "\n")
        return 0

    speed: Dict[str, Dict[str, Dict[str, object]]] = {str(s): {k: {"rounds": []} for k in args.settings}
                                                      for s in args.sizes}
    for r in range(args.rounds):
        for size in args.sizes:
            for setting in args.settings:
                if r > 0 and setting in args.once:
                    continue
                # compilation happens in the first steps (and a recompile may follow): two more untimed steps
                warmup = args.warmup + 2 if setting == "compiled" else args.warmup
                cmd = [sys.executable, __file__, "--worker", setting, "--size", str(size), "--seconds", str(args.seconds),
                       "--warmup", str(warmup), "--min-steps", str(args.min_steps),
                       "--data-dir", args.data_dir, "--work-dir", args.work_dir, "--set", *args.set]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{setting} at {size} px failed:\n{done.stderr[-3000:]}")
                m = json.loads(done.stdout.strip().splitlines()[-1])
                speed[str(size)][setting]["rounds"].append(m["images_per_s"])
                log.info("round %d, %d px, %s: %.1f images/s (%d steps timed, %.0f s before)", r + 1, size, setting,
                         m["images_per_s"], m["measured_steps"], m["warmup_s"])
    for per_size in speed.values():
        for runs in per_size.values():
            runs["median"] = statistics.median(runs["rounds"])
    if "fp32" not in args.settings:
        raise SystemExit("--settings must include fp32 (the baseline of the table)")
    res: Dict[str, object] = {
        "date": datetime.date.today().isoformat(), "hardware": hardware(), "torch": torch.__version__,
        "command": "python " + " ".join(["benchmarks/precision_speed.py", *sys.argv[1:]]), "sizes": args.sizes,
        "settings": args.settings, "rounds": args.rounds, "seconds": args.seconds, "warmup": args.warmup,
        "min_steps": args.min_steps, "once": args.once,
        "speed": speed}
    if args.quality_steps:
        res.update(quality=equal_steps_psnr(args, args.sizes[0]), quality_steps=args.quality_steps,
                   quality_size=args.sizes[0])
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.work_dir) / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    block = markdown(res)
    sys.stdout.write("\n" + block + "\n")
    if not args.no_docs:
        write_block(Path(args.docs), block, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
