"""Profile the recipe's training step with torch.profiler: where does a step's time go?

Runs the default MNIST VAE-GAN trainer (both players, guards, EMA) on in-memory MNIST-sized data,
profiles ``--steps`` steps after a warm-up, and prints the operators with the most self time (CPU, and
CUDA when there is a GPU). ``--trace`` also writes a Chrome trace (open it in chrome://tracing or
Perfetto).

    python benchmarks/profile_step.py                          # CPU, batch 64
    python benchmarks/profile_step.py --batch 256 --precision bf16 --trace step.json
    python benchmarks/profile_step.py --set train.compile=inductor
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).parent))
from throughput import _data  # noqa: E402  (the same synthetic MNIST-sized data)

import vaegan  # noqa: E402
from vaegan.config import ExperimentConfig, apply_overrides  # noqa: E402
from vaegan.data import TensorImages  # noqa: E402


class _StepProfiler(vaegan.Callback):
    """Steps the profiler after every optimizer step (TrainStep.update is the range "vaegan/update")."""

    def __init__(self, profiler) -> None:
        self.profiler = profiler

    def on_step_end(self, trainer, output) -> None:
        self.profiler.step()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="profiled steps")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--trace", type=Path, help="write a Chrome trace here")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        cfg = apply_overrides(ExperimentConfig(), [
            f"train.output_dir={out}", f"train.batch_size={args.batch}", "train.epochs=1000",
            f"train.max_steps={args.warmup + args.steps + 2}", "train.log_every=50", "train.sample_every=0",
            "train.checkpoint_every=0", "train.plot_loss_curves=false", f"train.mixed_precision={args.precision}",
            *args.set])
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities, schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1),
                     record_shapes=False) as prof:
            vaegan.build_trainer(cfg, callbacks=[_StepProfiler(prof)], dataset=TensorImages(_data(args.batch * 40))).fit()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    sys.stdout.write(prof.key_averages().table(sort_by=sort, row_limit=args.rows) + "\n")
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
