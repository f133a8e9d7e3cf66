"""Run by tests/test_evaluation.py under torchrun: evaluate one saved model on the fixture test split."""

import sys
from pathlib import Path

from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))
from conftest import MNIST_ROOT  # noqa: E402

from vaegan import VAE  # noqa: E402
from vaegan.cli import shutdown_distributed  # noqa: E402
from vaegan.config import DataConfig, EvalConfig  # noqa: E402
from vaegan.evaluation import evaluate  # noqa: E402

if __name__ == "__main__":
    acc = Accelerator()
    evaluate(VAE.from_pretrained(sys.argv[1]), DataConfig(root=str(MNIST_ROOT), download=False),
             EvalConfig(num_samples=64, nll_images=16, nll_samples=4, batch_size=16), accelerator=acc,
             output=Path(sys.argv[2]))
    shutdown_distributed()
