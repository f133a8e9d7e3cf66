"""Profile the recipe's training step with torch.profiler: where does a step's time go?

Runs the default MNIST VAE-GAN trainer (both players, guards, EMA) on in-memory MNIST-sized data,
profiles ``--steps`` steps after a warm-up, and prints the operators with the most self time (CPU, and
CUDA when there is a GPU). ``--trace`` also writes a Chrome trace (open it in chrome://tracing or
Perfetto). ``--model spatial`` profiles the spatial autoencoder of ``throughput.py --model spatial``;
``--loop bare`` profiles that script's hand-written loop of the same work instead of the trainer, so
the two tables can be set side by side (same operators, same call counts: the trainer adds no kernel).

    python benchmarks/profile_step.py                          # CPU, batch 64
    python benchmarks/profile_step.py --batch 256 --precision bf16 --trace step.json
    python benchmarks/profile_step.py --set train.compile=inductor
    python benchmarks/profile_step.py --model spatial --batch 16 --steps 8 --warmup 6 [--loop bare]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).parent))
from machine import DEFAULTS_0_2  # noqa: E402
from throughput import _data, _rgb_data, run_bare, run_bare_spatial, spatial_config  # noqa: E402  (the same work)

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
    p.add_argument("--model", choices=["mnist", "spatial"], default="mnist")
    p.add_argument("--loop", choices=["trainer", "bare"], default="trainer",
                   help="profile vaegan's trainer (default) or throughput.py's bare loop of the same work")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="profiled steps")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--trace", type=Path, help="write a Chrome trace here")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    args = p.parse_args(argv)
    spatial = args.model == "spatial"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, schedule=schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1),
                 record_shapes=False) as prof:
        if args.loop == "bare":  # the FLOP-counting step at the end is outside the profiled steps
            bare = run_bare_spatial if spatial else run_bare
            bare(args.batch, args.steps + 2, args.warmup, args.precision, after_step=prof.step)
        else:
            with tempfile.TemporaryDirectory() as out:
                base = spatial_config(32) if spatial else apply_overrides(ExperimentConfig(), DEFAULTS_0_2)
                cfg = apply_overrides(base, [
                    f"train.output_dir={out}", f"train.batch_size={args.batch}", "train.epochs=1000",
                    f"train.max_steps={args.warmup + args.steps + 2}", "train.log_every=50", "train.sample_every=0",
                    "train.checkpoint_every=0", "train.plot_loss_curves=false",
                    f"train.mixed_precision={args.precision}", *args.set])
                data = TensorImages(_rgb_data(args.batch * 40, 32), cfg.model.value_range) if spatial \
                    else TensorImages(_data(args.batch * 40))
                vaegan.build_trainer(cfg, callbacks=[_StepProfiler(prof)], dataset=data).fit()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    sys.stdout.write(prof.key_averages().table(sort_by=sort, row_limit=args.rows) + "\n")
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
