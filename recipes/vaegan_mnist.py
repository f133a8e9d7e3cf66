"""Train the MNIST VAE-GAN.

    accelerate launch recipes/vaegan_mnist.py                        # downloads MNIST into ./data
    python recipes/vaegan_mnist.py --data-dir ../shared/data --epochs 5
    accelerate launch --multi_gpu --num_processes 4 recipes/vaegan_mnist.py --mixed-precision bf16
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 recipes/vaegan_mnist.py   # 2 CPU processes

The defaults are vaegan's built-in configuration (the same as recipes/configs/vaegan_mnist.yaml);
``--config FILE.yaml`` replaces them and flags override either. Outputs go to --output-dir:
checkpoints/, samples/, metrics.jsonl, config.yaml and final/ (the EMA model, loadable with
``vaegan.VAE.from_pretrained``).
"""

import sys

from vaegan.cli import run_recipe

if __name__ == "__main__":
    sys.exit(run_recipe(description=__doc__))
