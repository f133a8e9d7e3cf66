"""Run by tests/test_latent_stats.py under `torchrun --nproc_per_node 2` with ACCELERATE_USE_CPU=true.

Every rank builds the same tiny autoencoder_kl and the same 7 images, computes the latent statistics
with Accelerate's MULTI_CPU (gloo) all-reduce, and writes them with the images it encoded itself.
"""

import json
import sys
from pathlib import Path

import torch

from vaegan.data import TensorImages

N_IMAGES = 7  # not a multiple of the world size: every image still counted once


def tiny_model():
    """The same seeded model on every process: 4 latent channels, f = 2."""
    from vaegan_plugins.autoencoder_kl import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL((3, 16, 16), "symmetric", block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
                         norm_num_groups=4).eval()


class RecordingImages(TensorImages):
    """Seeded random images that remember which items this process read."""

    def __init__(self, n: int = N_IMAGES + 3) -> None:
        g = torch.Generator().manual_seed(1)
        super().__init__(torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8), (-1.0, 1.0))
        self.read = []

    def __getitem__(self, index):
        self.read.append(int(index))
        return super().__getitem__(index)

    def __getitems__(self, indices):
        self.read += [int(i) for i in indices]
        return super().__getitems__(indices)


def main(out: Path) -> None:
    from accelerate import Accelerator

    from vaegan.cli import shutdown_distributed
    from vaegan.latent_stats import compute_latent_stats

    acc = Accelerator()
    data = RecordingImages()
    stats = compute_latent_stats(tiny_model(), data, N_IMAGES, batch_size=1, accelerator=acc)
    report = {"world_size": acc.num_processes, "distributed_type": str(acc.distributed_type), "read": data.read,
              "stats": stats.to_dict()}
    (out / f"rank{acc.process_index}.json").write_text(json.dumps(report))
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
