"""The ``vaegan`` command and the flags shared by it and the recipes.

    vaegan plugins                     list installed plugins with distribution and status
    vaegan train CONFIG.yaml [k=v ...] train from a config file with dotted overrides

Errors a user can fix print one paragraph (no traceback) and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from . import registry
from .config import ExperimentConfig, apply_overrides, load_config
from .errors import VaeganError

__all__ = ["main", "add_train_flags", "config_from_flags", "run_recipe"]

# flag -> config keys it sets (one flag may set several, e.g. --lr sets both players' rates)
_FLAGS = {
    "data_dir": ("data.root",),
    "output_dir": ("train.output_dir",),
    "epochs": ("train.epochs",),
    "max_steps": ("train.max_steps",),
    "batch_size": ("train.batch_size",),
    "lr": ("optim_g.lr", "optim_d.lr"),
    "seed": ("train.seed",),
    "checkpoint_every": ("train.checkpoint_every",),
    "sample_every": ("train.sample_every",),
    "resume": ("train.resume",),
    "report_to": ("train.report_to",),
    "mixed_precision": ("train.mixed_precision",),
}


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """The recipe flags; each overrides the matching config key (see ``_FLAGS``)."""
    parser.add_argument("--config", type=Path, help="YAML config file; flags override it")
    parser.add_argument("--data-dir", help="dataset root (MNIST is downloaded here when missing)")
    parser.add_argument("--output-dir", help="where checkpoints, samples and final/ go")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer updates")
    parser.add_argument("--batch-size", type=int, help="per process")
    parser.add_argument("--lr", type=float, help="learning rate of both players")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: off)")
    parser.add_argument("--sample-every", type=int, help="steps between PNG grids (0: off)")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder")
    parser.add_argument("--report-to", choices=["none", "wandb", "tensorboard"])
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"],
                        help="default: as set by `accelerate launch` / `accelerate config`")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. model.latent_dim=32 losses.1.weight.value=0.5")


def config_from_flags(args: argparse.Namespace, default_config: Optional[Path] = None) -> ExperimentConfig:
    """Config file (or ``default_config``, or the built-in defaults), then flags, then KEY=VALUE."""
    overrides: List[str] = []
    for flag, keys in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides += [f"{key}={value}" for key in keys]
    overrides += list(args.overrides or [])
    path = args.config or default_config
    return load_config(path, overrides)


def _guard(fn: Callable[[], int]) -> int:
    try:
        return fn()
    except VaeganError as exc:
        sys.stderr.write(f"vaegan: error: {exc}\n")
        return 2


def run_recipe(argv: Optional[Sequence[str]] = None, default_config: Optional[Path] = None, description: str = "") -> int:
    """Parse recipe flags and train; used by ``recipes/*.py`` and ``vaegan train``."""
    from .factory import train

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise

    def go() -> int:
        final = train(config_from_flags(args, default_config))
        logging.getLogger("vaegan").info("Final model written to %s", final)
        return 0

    return _guard(go)


def _plugins(args: argparse.Namespace) -> int:
    rows = registry.describe([args.group] if args.group else None, check=not args.no_check)
    header = ("name", "group", "distribution", "status")
    table = [header] + [(r.name, r.group, r.distribution, r.status) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``vaegan`` console script."""
    parser = argparse.ArgumentParser(prog="vaegan", description="Hybrid VAE-GAN training with plugin losses.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list installed plugins",
                       description="List every plugin in vaegan's entry-point groups with its distribution and "
                                   "whether it loads.\n\nExample: vaegan plugins --group vaegan.losses",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", choices=registry.GROUPS, help="only this group")
    p.add_argument("--no-check", action="store_true", help="read metadata only; import nothing")
    t = sub.add_parser("train", help="train from a YAML config",
                       description="Train from a config file; flags and KEY=VALUE override it.\n\n"
                                   "Example: vaegan train recipes/configs/vaegan_mnist.yaml train.epochs=5",
                       formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    t.add_argument("config_file", type=Path)
    args, rest = parser.parse_known_args(argv)
    if args.command == "plugins":
        return _guard(lambda: _plugins(args))
    return run_recipe(["--config", str(args.config_file), *rest])


if __name__ == "__main__":
    sys.exit(main())
