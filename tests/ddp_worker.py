"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` with ACCELERATE_USE_CPU=true.

Trains the tiny MNIST VAE-GAN for a few steps in Accelerate's MULTI_CPU mode (gloo DDP), then writes,
per rank, the world size and a fingerprint of every trainable tensor of both players, so the test can
check that the ranks really were two and ended with identical parameters.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

import vaegan  # noqa: E402
from vaegan.cli import shutdown_distributed  # noqa: E402


def fingerprint(module: torch.nn.Module) -> dict:
    return {n: [float(p.detach().double().sum()), float(p.detach().double().pow(2).sum())]
            for n, p in module.named_parameters()}


def main(out: Path, *overrides: str) -> None:
    train_and_report(out, *overrides)
    # As the recipe does, once the run's objects are unreferenced: never leave gloo to static destructors at exit.
    shutdown_distributed()


def train_and_report(out: Path, *overrides: str) -> None:
    cfg = tiny_config(out, "train.max_steps=4", "train.checkpoint_every=2", *overrides)
    trainer = vaegan.build_trainer(cfg)
    acc = trainer.accelerator
    first = next(iter(trainer.loader))
    trainer.fit()
    gathered = acc.gather(first[:1].reshape(1, -1))  # what each rank's first batch started with
    report = {
        "world_size": acc.num_processes,
        "rank": acc.process_index,
        "distributed_type": str(acc.distributed_type),
        "gen": fingerprint(trainer.train_step.generator.module),
        "disc": fingerprint(trainer.train_step.discriminator.module),
        "ranks_saw_different_data": bool(not torch.equal(gathered[0], gathered[1])) if acc.num_processes > 1 else False,
        "history": trainer.history,
    }
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
