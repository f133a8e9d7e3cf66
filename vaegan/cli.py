"""The ``vaegan`` command and the flags shared by it and the recipes.

    vaegan train CONFIG.yaml [k=v ...]              train from a config file with dotted overrides
    vaegan sample --model DIR --num N --out FILE    prior samples (.png grid or .npz uint8 array)
    vaegan reconstruct --model DIR --data-dir D --out FILE   reconstructions of a dataset split
    vaegan interpolate --model DIR --out FILE       interpolation strips
    vaegan encode --model DIR --data-dir D --out Z.safetensors   latents of a dataset split (mean or --sample)
    vaegan decode --model DIR --latents Z.safetensors --out FILE  images from a latents file
    vaegan eval --model DIR --data-dir D [--out F]  every metric of vaegan.evaluation, as a table and JSON
    vaegan fit-sampler --model DIR --sampler NAME   fit a latent sampler to the training images, save it with the model
    vaegan score --model DIR --data-dir D --out F   per-image ELBO, NLL bound, reconstruction error, KL, D logit
    vaegan plugins                                  list installed plugins with distribution and status

Errors a user can fix print one paragraph (no traceback) and exit with status 2. This module parses
the command line; each command's handler is in :mod:`vaegan.cli_handlers`, the work of ``sample``,
``reconstruct`` and ``interpolate`` in :mod:`vaegan.commands`, that of ``encode`` and ``decode`` in
:mod:`vaegan.codec`, of ``fit-sampler`` in :mod:`vaegan.samplers` and of ``score`` in :mod:`vaegan.scoring`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from . import registry
from .launcher import shutdown_distributed  # public here too: the recipes' scripts end with it
from .config import ExperimentConfig, load_config
from .errors import ConfigError, VaeganError

__all__ = ["main", "add_train_flags", "config_from_flags", "run_recipe", "shutdown_distributed"]

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
    "overwrite": ("train.overwrite",),
    "max_time": ("train.max_time",),
    "requeue": ("train.requeue",),
    "report_to": ("train.report_to",),
    "mixed_precision": ("train.mixed_precision",),
    "compile": ("train.compile",),
}


def add_train_flags(parser: argparse.ArgumentParser, config_flag: bool = True) -> None:
    """The recipe flags; each overrides the matching config key (see ``_FLAGS``). ``config_flag=False`` keeps
    ``--config`` out of the help, for ``vaegan train`` whose config is its positional argument."""
    parser.add_argument("--config", type=Path,
                        help="YAML config file; flags override it" if config_flag else argparse.SUPPRESS)
    parser.add_argument("--data-dir", help="dataset root (MNIST is downloaded here when missing)")
    parser.add_argument("--output-dir", help="where checkpoints, samples and final/ go")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer updates")
    parser.add_argument("--batch-size", type=int, help="per process")
    parser.add_argument("--lr", type=float, help="learning rate of both players")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: off)")
    parser.add_argument("--sample-every", type=int, help="steps between PNG grids (0: off)")
    parser.add_argument("--overwrite", action="store_const", const="true",
                        help="start afresh in an output folder that holds a run: its files move to previous/<time>/ "
                             "(train.overwrite)")
    parser.add_argument("--resume", help="'auto' (the latest checkpoint if there is one, else from scratch), "
                        "'latest' or a checkpoint folder")
    parser.add_argument("--max-time", help="stop with a checkpoint before this much wall-clock time: seconds or "
                        "[D-]HH:MM:SS, e.g. 23:30:00 (train.max_time)")
    parser.add_argument("--requeue", action="store_const", const="true",
                        help="under SLURM, requeue the job after a warning-signal or --max-time stop (train.requeue)")
    parser.add_argument("--report-to", choices=["none", "wandb", "tensorboard"])
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16", "auto"],
                        help="default: as set by `accelerate launch` / `accelerate config`; auto: bf16 where the "
                             "GPU or CPU has bf16 units (AMX-BF16, AVX512-BF16), else fp32")
    parser.add_argument("--compile", action="store_const", const="inductor", dest="compile",
                        help="torch.compile both players (train.compile=inductor); the first steps are slower")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. model.options.latent_dim=32 losses.1.weight.value=0.5")


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


def show_deprecations() -> None:
    """Show vaegan's own deprecation warnings (a plugin on an old import path, a 0.1 config key) once each:
    Python hides DeprecationWarning outside ``__main__``, so a plugin's author would otherwise never see them
    from the command line, though the contract tests fail on them."""
    warnings.filterwarnings("default", message=r".*is deprecated; (use|import it from)", category=DeprecationWarning)
    warnings.filterwarnings("default", message=r".*vaegan 0\.1's keys", category=DeprecationWarning)


def run_recipe(argv: Optional[Sequence[str]] = None, default_config: Optional[Path] = None, description: str = "",
               prog: Optional[str] = None, config_flag: bool = True) -> int:
    """Parse recipe flags and train; used by ``recipes/*.py`` and ``vaegan train`` (``config_flag=False``: the
    config is a positional argument, see :func:`add_train_flags`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_flags(parser, config_flag)
    args = parser.parse_intermixed_args(argv)  # KEY=VALUE overrides may sit before and after flags
    show_deprecations()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise

    def go() -> int:
        from .factory import train  # torch and the rest: not needed for --help or a config error

        try:
            final = train(config_from_flags(args, default_config))
        finally:
            shutdown_distributed()
        logging.getLogger("vaegan").info("Final model written to %s", final)
        return 0

    return _guard(go)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


_positive_int.__name__ = "positive integer"  # argparse names the type in "invalid ... value" errors
_non_negative_float.__name__ = "non-negative number"


def _command(sub, name: str, summary: str, description: str, example: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=summary, description=f"{textwrap.fill(description, 96)}\n\nExample:\n  {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def _model_flags(p: argparse.ArgumentParser, out_help: str, out_required: bool = True, out_metavar: str = "FILE") -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a training run's output directory (uses its final/) or a saved model folder")
    p.add_argument("--out", required=out_required, metavar=out_metavar, help=out_help)
    p.add_argument("--raw", action="store_true", help="use the raw weights (final/raw) instead of the EMA ones")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")


def _data_flags(p: argparse.ArgumentParser, trained_root: bool, split: str = "test") -> None:
    datasets = registry.available("vaegan.datasets")
    p.add_argument("--data-dir", required=False, metavar="D",
                   help="dataset root, as data.root in a config" + (
                       " (default: the data.root the model was trained with)" if trained_root else ""))
    p.add_argument("--dataset", choices=datasets, metavar="NAME",
                   help=f"dataset plugin ({', '.join(datasets)}; default: the one the model was trained on)")
    p.add_argument("--split", choices=["train", "test"], default=split, help=f"default: {split}")
    p.add_argument("--limit", type=_positive_int, help="use only the first N images")
    p.add_argument("--download", action="store_true", help="download the dataset when missing (needs a network)")


def _sampler_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--sampler", metavar="NAME",
                   help=f"where {what} latents come from: 'normal' for N(0, I), or a sampler fitted with `vaegan "
                        "fit-sampler` (default: the model folder's default sampler, else normal)")


def _likelihood_flags(p: argparse.ArgumentParser, default_k: int) -> None:
    p.add_argument("--nll-samples", type=_positive_int, default=default_k,
                   help=f"importance samples per image, K of the IWAE bound (default {default_k})")
    p.add_argument("--likelihood", choices=["bernoulli", "gaussian"], default="bernoulli",
                   help="bernoulli on binarised pixels (default) or the decoder's Gaussian with --logvar")
    p.add_argument("--logvar", type=float, help="per-pixel log-variance of the Gaussian likelihood (default 0)")


def _tile_flags(p: argparse.ArgumentParser, image_size: bool) -> None:
    """--tile, --overlap (and --image-size): vaegan.tiling's bounded-memory path for images of any size."""
    p.add_argument("--tile", type=_positive_int, metavar="PIXELS",
                   help="work in overlapping PIXELS x PIXELS tiles (a multiple of the model's downsampling factor), "
                        "blended with linear ramps: the network's memory is one tile's, whatever the image size")
    p.add_argument("--overlap", type=int, metavar="PIXELS",
                   help="pixels neighbouring tiles share, a multiple of the downsampling factor (default: a quarter "
                        "of --tile)")
    if image_size:
        p.add_argument("--image-size", type=_positive_int, nargs="+", metavar="N",
                       help="H [W]: resize and crop the images to H x W (H x H) instead of the model's training size, "
                            "e.g. 1024 for large photos (with --tile: bounded memory)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaegan", description="Hybrid VAE-GAN training with plugin losses.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = _command(sub, "train", "train from a YAML config",
                 "Train from a config file; flags and KEY=VALUE override it. `vaegan train CONFIG.yaml "
                 "--help` lists the flags.",
                 "vaegan train recipes/configs/vaegan_mnist.yaml --data-dir data train.epochs=5",
                 add_help=False)  # --help goes to the recipe's parser, which knows every flag
    t.add_argument("config_file", type=Path, nargs="?", metavar="CONFIG.yaml")

    s = _command(sub, "sample", "draw images from a trained model (its default sampler, or N(0, I))",
                 "Decode N latents with a trained generator (the EMA weights by default): from the model folder's "
                 "default sampler (one fitted with `vaegan fit-sampler` or at the end of training), else from "
                 "N(0, I). .png writes one grid; .npz writes the array 'images', uint8 (N, C, H, W).",
                 "vaegan sample --model outputs/vaegan_mnist --num 64 --out samples.png --seed 1")
    _model_flags(s, ".png (a grid) or .npz (array 'images', uint8 (N, C, H, W))")
    s.add_argument("--num", type=_positive_int, default=64, help="number of images (default 64)")
    s.add_argument("--seed", type=int, default=0, help="seed of the latents (default 0)")
    s.add_argument("--batch-size", type=_positive_int, default=256, help="images decoded at once (default 256)")
    s.add_argument("--temperature", type=_non_negative_float,
                   help="scale of the latents' spread (default: the sampler's own, saved with it; 1.0 for N(0, I); "
                        "lower: safer, less varied)")
    _sampler_flag(s, "the")

    r = _command(sub, "reconstruct", "reconstruct a dataset split with a trained model",
                 "Encode every image of a dataset split (in dataset order) to its posterior mean and decode "
                 "it. .npz writes 'images' (the reconstructions) and 'inputs', both uint8 (N, C, H, W); .png "
                 "writes a grid of input | reconstruction pairs of the first 64 images (--limit N for more). Any "
                 "dataset plugin works (see `vaegan plugins`); the model's training data options are kept.",
                 "vaegan reconstruct --model outputs/vaegan_mnist --data-dir data --split test --out recon.npz")
    _model_flags(r, ".npz (arrays 'images' and 'inputs') or .png (a grid of pairs)")
    _data_flags(r, trained_root=True)
    _tile_flags(r, image_size=True)
    r.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward (default 256)")

    i = _command(sub, "interpolate", "decode interpolations between latents",
                 "Decode evenly spaced points on the line between two latents, for several pairs: random "
                 "latents from the model's sampler, or (with --data-dir) the posterior means of dataset images, chosen "
                 "at random or with --indices. .png writes one strip per row (real images at both ends when "
                 "there are any); .npz writes 'images', uint8 (pairs, steps, C, H, W).",
                 "vaegan interpolate --model outputs/vaegan_mnist --out strips.png --num-pairs 8 --steps 10")
    _model_flags(i, ".png (one strip per row) or .npz (array 'images', uint8 (pairs, steps, C, H, W))")
    i.add_argument("--num-pairs", type=_positive_int, default=4, help="number of strips (default 4)")
    i.add_argument("--steps", type=_positive_int, default=8, help="images per strip (default 8)")
    i.add_argument("--seed", type=int, default=0, help="seed of the random latents or images (default 0)")
    i.add_argument("--indices", type=int, nargs="+", metavar="I",
                   help="dataset images to interpolate between, in pairs (e.g. 0 7 3 5); needs --data-dir")
    _sampler_flag(i, "the random end points'")
    _data_flags(i, trained_root=False)

    c = _command(sub, "encode", "encode a dataset split to latents (a safetensors file)",
                 "Encode every image of a dataset split (in dataset order) to its posterior mean, or with --sample "
                 "to a draw from the posterior (seeded: the same latents whatever the batch size). Writes a "
                 ".safetensors file: tensors 'latents' and 'logvar', fp32 (N, *latent_shape), and metadata (model, "
                 "generator, latent shape, split, count, scaling). --scaled applies the model's (z - shift_factor) * "
                 "scaling_factor, as diffusion pipelines do. Prints the latents' std and the suggested scaling "
                 "factor 1/std (latent diffusion estimates it on --sample latents). `vaegan decode` turns the "
                 "file back into images.",
                 "vaegan encode --model outputs/vaegan_mnist --data-dir data --split test --out latents.safetensors")
    _model_flags(c, "a .safetensors file (tensors 'latents' and 'logvar', and metadata)", out_metavar="FILE.safetensors")
    _data_flags(c, trained_root=True)
    _tile_flags(c, image_size=True)
    c.add_argument("--sample", action="store_true", help="a draw from the posterior instead of its mean")
    c.add_argument("--seed", type=int, default=0, help="seed of --sample's noise (default 0)")
    c.add_argument("--scaled", action="store_true",
                   help="apply the model's (z - shift_factor) * scaling_factor (the model must have one set)")
    c.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward (default 256)")

    d = _command(sub, "decode", "decode a latents file to images",
                 "Decode the tensor 'latents' (N, *latent_shape) of a safetensors file, e.g. one written by "
                 "`vaegan encode`, with a trained generator. Latents the file's metadata says were scaled are "
                 "unscaled first (--unscale does it for a file without that metadata). .png writes one grid of the "
                 "first 64 (--num N for more); .npz writes the array 'images', uint8 (N, C, H, W), of all of them.",
                 "vaegan decode --model outputs/vaegan_mnist --latents latents.safetensors --out decoded.png")
    _model_flags(d, ".png (a grid) or .npz (array 'images', uint8 (N, C, H, W))")
    d.add_argument("--latents", required=True, metavar="FILE", help="a .safetensors file with a tensor 'latents'")
    _tile_flags(d, image_size=False)
    d.add_argument("--unscale", action="store_true",
                   help="undo the model's scaling first (automatic when the file's metadata says it was scaled)")
    d.add_argument("--batch-size", type=_positive_int, default=256, help="latents decoded at once (default 256)")
    d.add_argument("--num", type=_positive_int,
                   help="decode the first N latents (default: all for .npz, 64 for a .png grid)")

    e = _command(sub, "eval", "evaluate a trained model: fidelity, likelihood, sample quality, detail",
                 "Compute vaegan.evaluation's metrics for a trained generator (the EMA weights by default) on a "
                 "dataset split: MSE, PSNR, SSIM, LPIPS (when the backbone's weights are local) and ST-LPIPS "
                 "(when stlpips-pytorch is installed) of "
                 "reconstructions; negative ELBO and the IWAE NLL in nats and bits/dim; Fréchet distance in a "
                 "cached classifier's features, class histogram and precision/recall (labelled data); "
                 "sharpness and high-frequency ratios of generated images (latents from --sampler). Prints a table; --out "
                 "writes JSON. --limit bounds the evaluated images only: --num-samples sets the generated images, "
                 "--nll-images the likelihood's, and the feature classifier always learns from the whole train split. "
                 "Under `accelerate launch` / torchrun the work is split over the processes and the numbers "
                 "are the same as on one.",
                 "vaegan eval --model outputs/vaegan_mnist --data-dir data --num-samples 10000 --out eval.json")
    _model_flags(e, "also write the results as JSON", out_required=False, out_metavar="FILE.json")
    _data_flags(e, trained_root=True)
    e.add_argument("--num-samples", type=_positive_int, default=10000, help="prior samples (default 10000)")
    e.add_argument("--nll-images", type=_positive_int, default=1000, help="images for the NLL bounds (default 1000)")
    _likelihood_flags(e, 100)
    _sampler_flag(e, "the generated images'")
    e.add_argument("--classifier", choices=["auto", "on", "off"], default="auto",
                   help="classifier metrics (FD, histogram, precision/recall); auto: when the data has labels")
    e.add_argument("--lpips", choices=["auto", "on", "off"], default="auto",
                   help="LPIPS distance; auto: when the backbone's ImageNet weights are available locally")
    e.add_argument("--st-lpips", choices=["auto", "on", "off"], default="auto",
                   help="shift-tolerant LPIPS (a different network: not comparable with LPIPS); auto: when "
                        "stlpips-pytorch is installed (vaegan[stlpips])")
    e.add_argument("--inception", action="store_true",
                   help="also the Inception FID (needs torch-fidelity and its weights in the torch cache; slow on CPUs)")
    e.add_argument("--batch-size", type=_positive_int, default=500, help="images per forward (default 500)")
    e.add_argument("--seed", type=int, default=0, help="seed of the prior latents and importance noise (default 0)")
    e.set_defaults(split="test")

    f = _command(sub, "fit-sampler", "fit a latent sampler to a trained model's training images",
                 "Encode the images of a dataset split (default: the training data the model was trained on) to "
                 "their posterior means, fit the sampler plugin NAME to them (gmm: a Gaussian mixture; two_stage: a "
                 "second-stage VAE; `vaegan plugins --group vaegan.samplers` lists them) and save it in the model "
                 "folder's samplers/NAME/ (safetensors + JSON). It becomes the folder's default sampler, which "
                 "`vaegan sample`, `interpolate` and `eval` use without --sampler.",
                 "vaegan fit-sampler --model outputs/vaegan_mnist --sampler gmm --option n_components=50")
    f.add_argument("--model", required=True, metavar="DIR", help="a training run's output directory or a model folder")
    f.add_argument("--sampler", required=True, metavar="NAME", help="the sampler plugin to fit (gmm, two_stage, ...)")
    f.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a sampler option, YAML-typed (e.g. n_components=10 covariance_type=diag); repeatable")
    f.add_argument("--seed", type=int, default=0, help="seed of the fit (default 0)")
    f.add_argument("--temperature", type=_non_negative_float, default=1.0,
                   help="the spread it draws with by default, saved with it (default 1.0: as fitted)")
    f.add_argument("--no-default", action="store_true", help="save it without making it the folder's default")
    f.add_argument("--overwrite", action="store_true", help="replace a sampler of the same name already fitted there")
    f.add_argument("--raw", action="store_true", help="fit for the raw weights (final/raw) instead of the EMA ones")
    f.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    f.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward (default 256)")
    _data_flags(f, trained_root=True, split="train")

    sc = _command(sub, "score", "per-image scores: ELBO, NLL bound, reconstruction error, KL, discriminator logit",
                  "Score every image of a dataset split, streamed in batches: negative ELBO and the importance-"
                  "weighted NLL bound (nats and bits/dim), the ELBO's reconstruction and KL parts, the MSE of the "
                  "reconstruction, and the discriminator's mean logit when the run saved one. .csv writes one row "
                  "per image; .npz one array per score. The bounds equal `vaegan eval`'s image for image (same "
                  "seed and K); under `accelerate launch` / torchrun the images are split over the processes.",
                  "vaegan score --model outputs/vaegan_mnist --data-dir data --split test --out scores.csv")
    _model_flags(sc, ".csv (one row per image) or .npz (one array per score)")
    _data_flags(sc, trained_root=True)
    _likelihood_flags(sc, 100)
    sc.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward (default 256)")
    sc.add_argument("--seed", type=int, default=0, help="seed of the importance noise (default 0, as vaegan eval)")

    p = _command(sub, "plugins", "list installed plugins",
                 "List every plugin in vaegan's entry-point groups with its distribution and whether it loads.",
                 "vaegan plugins --group vaegan.losses")
    p.add_argument("--group", choices=registry.GROUPS, help="only this group")
    p.add_argument("--no-check", action="store_true", help="read metadata only; import nothing")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``vaegan`` console script."""
    args, rest = _parser().parse_known_args(argv)
    if args.command == "train":  # the recipe's flags: parsed (and --help printed) by run_recipe
        if args.config_file is None and not {"-h", "--help"} & set(rest):
            return _guard(_missing_config)
        config = ["--config", str(args.config_file)] if args.config_file is not None else []
        return run_recipe([*config, *rest], description=_TRAIN_HELP, prog="vaegan train CONFIG.yaml",
                          config_flag=False)
    if rest:
        _parser().parse_args(argv)  # reports the unknown arguments and exits 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vaegan.progress").setLevel(logging.INFO)  # the progress of a long encode, fit or eval
    show_deprecations()
    from .cli_handlers import HANDLERS

    return _guard(lambda: HANDLERS[args.command](args))


_TRAIN_HELP = """Train from a YAML config; flags and KEY=VALUE override it.

Example:
  vaegan train recipes/configs/vaegan_mnist.yaml --data-dir data --epochs 5 model.options.latent_dim=32
  vaegan train recipes/configs/rgb_folder_32.yaml --data-dir path/to/images --report-to wandb
"""


def _missing_config() -> int:
    raise ConfigError("vaegan train needs a config file, e.g. `vaegan train recipes/configs/vaegan_mnist.yaml`; "
                      "`vaegan train --help` lists the flags that override it.")


if __name__ == "__main__":
    sys.exit(main())
