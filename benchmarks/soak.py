"""Soak test: train through repeated ``kill -9``s and check that nothing is lost.

1. A reference run of the MNIST recipe, uninterrupted, keeping every checkpoint.
2. The same run again, killed with SIGKILL at random moments (every third kill lands inside a
   checkpoint save: right after its temporary folder appears), each time restarted with
   ``--resume latest``, until it finishes on its own.
3. After every kill, each complete checkpoint not yet seen is restored into a trainer (every file
   verified, then loaded) and its weights (both players and the EMA) are compared bit for bit with the
   reference's checkpoint of the same step; at the end the final checkpoint and ``final/`` model too,
   and no temporary or half-deleted folder may be left.

Reports steps run (optimizer steps executed, including those redone after a kill), kills survived,
checkpoints verified, and whether every verified state equals the reference's.

    OMP_NUM_THREADS=1 python benchmarks/soak.py --data-dir ../shared/data
    OMP_NUM_THREADS=1 python benchmarks/soak.py --data-dir ../shared/data --epochs 20 --max-kills 50 --json soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Set

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from machine import DEFAULTS_0_2  # noqa: E402  (run as a script from benchmarks/)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "vaegan_mnist.py"
WEIGHT_FILES = ("model.safetensors", "model_1.safetensors", "ema.safetensors")
# The recipe's VAE-GAN at half width: the soak is about faults, not image quality, and more steps fit.
SMALL = ["model.options.channels=[16, 32]", "discriminator.options={channels: [16, 32]}"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder holding MNIST/raw")
    p.add_argument("--limit", type=int, default=2000, help="training images (data.limit)")
    p.add_argument("--epochs", type=int, default=8, help="short epochs: limit / batch-size steps each")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--checkpoint-every", type=int, default=5, help="steps between checkpoints")
    p.add_argument("--max-kills", type=int, default=12, help="then the run may finish")
    p.add_argument("--kill-after", type=float, nargs=2, default=(0.5, 6.0), metavar=("MIN", "MAX"),
                   help="seconds of training (after the first new step of a process) before a random kill")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule (training uses train.seed)")
    p.add_argument("--work-dir", type=Path, help="default: a temporary folder, deleted afterwards")
    p.add_argument("--json", type=Path, help="write the report here too")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", default=SMALL,
                   help=f"config overrides for both runs (default: a small model, {' '.join(SMALL)})")
    return p.parse_args(argv)


def recipe_command(args: argparse.Namespace, out: Path, keep: int) -> List[str]:
    return [sys.executable, str(RECIPE), "--data-dir", args.data_dir, "--output-dir", str(out),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "data.download=false",
            f"data.limit={args.limit}", f"train.checkpoint_every={args.checkpoint_every}",
            f"train.checkpoints_total_limit={keep}", "train.log_every=1", "train.sample_every=0",
            "train.num_samples=16", *DEFAULTS_0_2, *args.overrides]


def names(out: Path) -> List[str]:
    try:
        return os.listdir(out / "checkpoints")
    except FileNotFoundError:
        return []


def logged_steps(out: Path) -> int:
    """Rows of metrics.jsonl: with log_every=1, one per optimizer step executed (redone ones included)."""
    try:
        return sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


class Verifier:
    """Restores checkpoints into one trainer and compares them with the reference run's."""

    def __init__(self, args: argparse.Namespace, reference: Path, chaos: Path) -> None:
        import vaegan
        from vaegan.checkpointing import list_checkpoints

        self.list_checkpoints = list_checkpoints
        cmd = recipe_command(args, chaos, keep=3)
        overrides = [a for a in cmd if "=" in a and not a.startswith("-")]
        cfg = vaegan.apply_overrides(vaegan.ExperimentConfig(), [*DEFAULTS_0_2,
            f"data.root={args.data_dir}", f"train.output_dir={tempfile.mkdtemp()}", f"train.epochs={args.epochs}",
            f"train.batch_size={args.batch_size}", *overrides])
        self.trainer = vaegan.build_trainer(cfg)
        self.reference = reference
        self.seen: Set[str] = set()
        self.mismatches: List[str] = []

    def check_new(self, root: Path) -> int:
        """Verify, load and compare every complete checkpoint under ``root`` not seen before."""
        from vaegan.checkpointing import MARKER
        from vaegan.errors import VaeganError

        count = 0
        for ckpt in self.list_checkpoints(root):
            step = json.loads((ckpt / MARKER).read_text())["step"]
            if ckpt.name in self.seen:
                continue
            try:
                self.trainer.load_checkpoint(ckpt)  # every file verified, then restored
            except VaeganError as exc:
                self.mismatches.append(f"{ckpt} cannot be restored: {exc}")
                continue
            if self.trainer.state.step != step:
                self.mismatches.append(f"{ckpt}: trainer_state step {self.trainer.state.step} != marker {step}")
            ref = self.reference / "checkpoints" / ckpt.name
            for file in WEIGHT_FILES:
                a, b = load_file(str(ckpt / file)), load_file(str(ref / file))
                if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
                    self.mismatches.append(f"{ckpt / file} differs from the reference")
            self.seen.add(ckpt.name)
            count += 1
        return count


def run_reference(args: argparse.Namespace, out: Path, env: Dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(recipe_command(args, out, keep=100000), env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"reference run failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def run_chaos(args: argparse.Namespace, out: Path, env: Dict[str, str], verifier: Verifier) -> Dict[str, object]:
    rng = random.Random(args.seed)
    kills, kills_in_save, verified, restarts = 0, 0, 0, 0
    t0 = time.perf_counter()
    while True:
        resume = ["--resume", "latest"] if restarts else []
        cmd = recipe_command(args, out, keep=3) + resume
        log = out.parent / f"chaos-{restarts:03d}.log"  # a file: a full pipe would block the process
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=fh)
        restarts += 1
        if kills < args.max_kills:
            before, tmp_before = logged_steps(out), set(n for n in names(out) if n.startswith(".tmp"))
            in_save = kills % 3 == 2
            while proc.poll() is None and logged_steps(out) <= before:  # wait for training to be under way
                time.sleep(0.02)
            deadline = time.perf_counter() + rng.uniform(*args.kill_after)
            while proc.poll() is None:
                if in_save and any(n.startswith(".tmp") and n not in tmp_before for n in names(out)):
                    break
                if not in_save and time.perf_counter() >= deadline:
                    break
                time.sleep(0.002 if in_save else 0.02)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                kills += 1
                kills_in_save += any(n.startswith(".tmp") for n in names(out))
                verified += verifier.check_new(out / "checkpoints")
                continue
        proc.wait()
        if proc.returncode != 0:
            sys.exit(f"chaos run failed with status {proc.returncode}:\n{log.read_text()[-3000:]}")
        break
    return {"seconds": time.perf_counter() - t0, "kills": kills, "kills_during_save": kills_in_save,
            "processes": restarts, "verified_during": verified}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="vaegan-soak-"))
    reference, chaos = work / "reference", work / "chaos"
    for d in (reference, chaos):
        shutil.rmtree(d, ignore_errors=True)
    print(f"reference run -> {reference}", flush=True)
    ref_seconds = run_reference(args, reference, env)
    total_steps = logged_steps(reference)
    print(f"  {total_steps} steps in {ref_seconds:.0f} s; chaos run -> {chaos}", flush=True)
    torch.set_num_threads(1)
    verifier = Verifier(args, reference, chaos)
    report = run_chaos(args, chaos, env, verifier)
    verified_end = verifier.check_new(chaos / "checkpoints")
    leftovers = [n for n in names(chaos) if n.startswith(".tmp") or not (chaos / "checkpoints" / n / "vaegan_checkpoint.json").exists()]
    import vaegan

    final_equal = all(torch.equal(a, b) for a, b in zip(
        vaegan.VAE.from_pretrained(chaos / "final").state_dict().values(),
        vaegan.VAE.from_pretrained(reference / "final").state_dict().values()))
    last = f"step_{total_steps:08d}"
    report.update({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "command": "OMP_NUM_THREADS=1 python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "epochs": args.epochs, "images": args.limit, "checkpoint_every": args.checkpoint_every,
        "steps_per_run": total_steps, "reference_seconds": round(ref_seconds, 1),
        "steps_run": logged_steps(chaos),
        "checkpoints_written": sum(f.read_text().count("Saved checkpoint") for f in work.glob("chaos-*.log")),
        "checkpoints_verified": report.pop("verified_during") + verified_end,
        "final_checkpoint_verified": last in verifier.seen, "final_model_equal": final_equal,
        "mismatches": verifier.mismatches, "leftover_folders": leftovers,
    })
    report["seconds"] = round(report["seconds"], 1)
    ok = not verifier.mismatches and not leftovers and final_equal and report["final_checkpoint_verified"]
    report["nothing_lost"] = ok
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
