"""The work of each ``vaegan`` command but ``train``: flags in, files and one summary line out.

:mod:`vaegan.cli` parses the command line and calls the handler of :data:`HANDLERS` for the command;
the handlers call :mod:`vaegan.commands` (and :mod:`vaegan.evaluation`), importing them (and torch)
only when they run, so that ``vaegan --help`` stays fast. Errors a user can fix are raised as
:class:`~vaegan.errors.VaeganError`, which the CLI prints as one paragraph with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, Optional

from . import registry
from .errors import ConfigError

__all__ = ["HANDLERS", "plugins_command", "sample_command", "reconstruct_command", "interpolate_command",
           "eval_command", "encode_command", "decode_command", "fit_sampler_command", "score_command"]


def plugins_command(args: argparse.Namespace) -> int:
    rows = registry.describe([args.group] if args.group else None, check=not args.no_check)
    header = ("name", "group", "distribution", "status")
    table = [header] + [(r.name, r.group, r.distribution, r.status) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(3)]
    for row in table:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3] + "\n")
    return 0


def _sampler(args: argparse.Namespace, model):
    """The sampler --sampler names (default: the model folder's default); None for the model's own prior."""
    from . import commands
    from .samplers import default_sampler_name, load_sampler

    model_dir = commands.resolve_model_dir(args.model, args.raw)
    name = args.sampler or default_sampler_name(model_dir)
    if name == "normal":
        return None
    return load_sampler(model_dir, name, model.latent_shape)


def sample_command(args: argparse.Namespace) -> int:
    from . import commands
    from .images import check_output, save_images

    check_output(args.out)
    model = commands.load_model(args.model, raw=args.raw, device=args.device)
    from .previews import sample_caption

    sampler = _sampler(args, model)
    images = commands.sample(model, args.num, seed=args.seed, batch_size=args.batch_size,
                             temperature=args.temperature, sampler=sampler)
    path = save_images(args.out, images, caption=sample_caption(sampler.name if sampler is not None else None))
    source = f"the '{sampler.name}' sampler" if sampler is not None else "N(0, I)"
    sys.stdout.write(f"wrote {images.shape[0]} samples {tuple(images.shape[1:])} (latents from {source}) to {path}\n")
    return 0


def _dataset_name(args: argparse.Namespace) -> str:
    """--dataset, else the dataset plugin the model was trained on, else MNIST."""
    from . import commands

    if args.dataset is not None:
        return args.dataset
    trained = commands.trained_data_config(args.model)
    return trained.name if trained is not None else "mnist"


# A .png of decoded or reconstructed images holds at most this many unless asked (--num / --limit): a grid of
# 10,000 digits is not a picture anyone reads.
GRID_IMAGES = 64


def _data_root(args: argparse.Namespace) -> str:
    """--data-dir, else the data.root the model was trained with (its training_config.yaml), resolved once."""
    from . import commands

    if args.data_dir is None:
        trained = commands.trained_data_config(args.model)
        if trained is None:
            raise ConfigError(f"'{args.model}' does not say which data it was trained on (no training_config.yaml): "
                              "pass --data-dir (and --dataset) to name the images to read.")
        args.data_dir = str(trained.root)
    return args.data_dir


def _dataset(args: argparse.Namespace, model, name: Optional[str] = None, what: Optional[str] = None,
             limit: Optional[int] = None):
    """The images the command reads: the model's training data options when it is the dataset it was trained on
    (an image folder's resize or crop); ``what`` (e.g. "encode") says on stderr which split and how many."""
    from . import commands

    name = name or _dataset_name(args)
    _data_root(args)
    trained = commands.trained_data_config(args.model)
    options = trained.options if trained is not None and trained.name == name else {}
    limit = args.limit if limit is None else limit
    if getattr(args, "image_size", None):  # --image-size (vaegan.tiling): images at another size than the model's
        dataset = _resized_dataset(args, model, name, limit, options)
    else:
        dataset = commands.load_dataset(model, name, args.data_dir, split=args.split, limit=limit,
                                        download=args.download, options=options)
    if what is not None:
        other = "train" if args.split == "test" else "test"
        fewer = "" if args.limit is not None else ", --limit N for fewer"
        sys.stderr.write(f"{what}: {len(dataset)} images of the {args.split} split of '{name}' in {args.data_dir} "
                         f"(--split {other} for the {other} split{fewer})\n")
    return dataset


def _resized_dataset(args: argparse.Namespace, model, name: str, limit: Optional[int], options):
    """The dataset at --image-size H [W] rather than the model's image size."""
    import dataclasses

    from .config import DataConfig, from_dict
    from .data import build_dataset

    size = args.image_size
    if len(size) > 2:
        raise ConfigError(f"--image-size takes H or H W (pixels), got {' '.join(map(str, size))}.")
    data = from_dict(DataConfig, {"name": name, "root": str(args.data_dir), "split": args.split, "limit": limit,
                                  "download": args.download, "options": dict(options or {})}, "data")
    return build_dataset(data, dataclasses.replace(model.config, image_size=(size[0], size[-1])))


def _tiling(args: argparse.Namespace, model):
    """--tile / --overlap / --image-size as a :class:`vaegan.tiling.Tiling`, checked against the model before
    any work; None: the untiled path at the model's own size."""
    from .tiling import Tiling, check_tiling

    if args.tile is None and args.overlap is not None:
        raise ConfigError("--overlap is the overlap of --tile's tiles: pass --tile PIXELS too.")
    if args.tile is None and not getattr(args, "image_size", None):
        return None
    tiling = Tiling(args.tile, args.overlap)  # tile None: one piece of any size (--image-size alone)
    check_tiling(model, tiling)
    return tiling


def reconstruct_command(args: argparse.Namespace) -> int:
    from . import commands
    from .images import check_output, save_reconstructions

    check_output(args.out)
    model = commands.load_model(args.model, raw=args.raw, device=args.device)
    png = Path(args.out).suffix.lower() == ".png"
    limit = GRID_IMAGES if png and args.limit is None else None  # a readable grid unless --limit asks for more
    tiling = _tiling(args, model)
    dataset = _dataset(args, model, what="reconstruct", limit=limit)
    if tiling is not None:
        from .tiling import reconstruct_dataset

        inputs, recons = reconstruct_dataset(model, dataset, tiling, batch_size=args.batch_size)
    else:
        inputs, recons = commands.reconstruct(model, dataset, batch_size=args.batch_size)
    path = save_reconstructions(args.out, inputs, recons)
    note = f" (a .png holds the first {GRID_IMAGES} unless --limit says; .npz takes all)" if limit else ""
    sys.stdout.write(f"wrote {recons.shape[0]} reconstructions of the {args.split} split to {path}{note}\n")
    return 0


def interpolate_command(args: argparse.Namespace) -> int:
    from . import commands
    from .images import check_output, save_interpolations

    check_output(args.out)
    model = commands.load_model(args.model, raw=args.raw, device=args.device)
    dataset = _dataset(args, model) if args.data_dir is not None else None
    if args.indices is not None and dataset is None:
        raise ConfigError("--indices picks images of a dataset: pass --data-dir too (and --dataset, --split).")
    sampler = _sampler(args, model) if dataset is None else None
    strips, ends = commands.interpolate(model, args.num_pairs, args.steps, seed=args.seed, dataset=dataset,
                                        indices=args.indices, sampler=sampler)
    path = save_interpolations(args.out, strips, ends)
    sys.stdout.write(f"wrote {strips.shape[0]} interpolation strips of {strips.shape[1]} steps to {path}\n")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    import json

    import torch

    from . import commands
    from .launcher import launched_accelerator, shutdown_distributed
    from .config import DataConfig, EvalConfig, from_dict
    from .evaluation import evaluate

    if args.out is not None and Path(args.out).suffix.lower() != ".json":
        raise ConfigError(f"--out '{args.out}' must be a .json file (the results are written as JSON).")
    eval_config = from_dict(EvalConfig, {
        "split": args.split, "limit": args.limit, "num_samples": args.num_samples, "nll_images": args.nll_images,
        "nll_samples": args.nll_samples, "likelihood": args.likelihood, "batch_size": args.batch_size,
        "classifier": {"auto": None, "on": True, "off": False}[args.classifier],
        "lpips": {"auto": None, "on": True, "off": False}[args.lpips], "inception": args.inception,
        "st_lpips": {"auto": None, "on": True, "off": False}[args.st_lpips],
        "seed": args.seed}, "eval")
    accelerator = launched_accelerator()
    # Under a launcher, load on the CPU and let evaluate() move the model to this process's device.
    model = commands.load_model(args.model, raw=args.raw, device="cpu" if accelerator is not None else args.device)
    sampler = _sampler(args, model)
    name = _dataset_name(args)
    trained = commands.trained_data_config(args.model)
    options = dict(trained.options) if trained is not None and trained.name == name else {}  # as it was trained
    data = from_dict(DataConfig, {"name": name, "root": _data_root(args), "download": args.download,
                                  "options": options}, "data")
    if accelerator is None or accelerator.is_main_process:
        limit = f"the first {args.limit}" if args.limit else "all"
        sys.stderr.write(f"eval: {limit} images of the {args.split} split of '{name}' in {args.data_dir}, "
                         f"{args.num_samples} generated images\n")
    logvar = None if args.logvar is None else torch.tensor(args.logvar)
    try:
        results = evaluate(model, data, eval_config, logvar=logvar, accelerator=accelerator, output=args.out,
                           sampler=sampler, hint=f"--limit N evaluates fewer images, --num-samples fewer samples, "
                                                 f"--nll-samples K (now {args.nll_samples}) fewer importance samples")
    finally:
        shutdown_distributed()
    if accelerator is None or accelerator.is_main_process:
        undefined = results.get("undefined", {})
        for key, value in results.items():
            if isinstance(value, float):
                sys.stdout.write(f"{key:24s} {value:.6g}\n")
            elif key in undefined:
                sys.stdout.write(f"{key:24s} undefined: {undefined[key]}\n")
        sys.stdout.write(f"protocol {json.dumps(results['protocol'])}\n")
        if args.out is not None:
            sys.stdout.write(f"wrote {args.out}\n")
    return 0


def encode_command(args: argparse.Namespace) -> int:
    import json

    from . import codec, commands

    codec.check_latents_output(args.out)
    model = commands.load_model(args.model, raw=args.raw, device=args.device)
    scaling = codec.scaling_of(model) if args.scaled else None  # refused before any work
    tiling = _tiling(args, model)
    name = _dataset_name(args)
    dataset = _dataset(args, model, name, what="encode")
    latents, logvar = codec.encode(model, dataset, sample=args.sample, seed=args.seed, batch_size=args.batch_size,
                                   scaled=args.scaled, tiling=tiling)
    info = {"model": str(commands.resolve_model_dir(args.model, args.raw).resolve()), "dataset": name,
            "split": args.split, "posterior": "sample" if args.sample else "mean",
            **({"seed": args.seed} if args.sample else {}),
            **({"latent_shape": list(latents.shape[1:]), "tile": tiling.tile, "overlap": tiling.overlap}
               if tiling is not None else {})}
    path = codec.save_latents(args.out, latents, logvar, model=model, scaled=args.scaled, metadata=info)
    stats = codec.latent_stats(latents, scaling)
    kind = "posterior samples" if args.sample else "posterior means"
    scaled = f", scaled by {scaling[0]:g} after shifting by {scaling[1]:g}" if scaling else ""
    sys.stdout.write(f"wrote {latents.shape[0]} latents {tuple(latents.shape[1:])} ({kind}{scaled}) of the "
                     f"{args.split} split to {path}\n")
    sys.stdout.write(f"latents std {stats['std']:.6g}" + (f" (unscaled {stats['unscaled_std']:.6g})" if scaling else "")
                     + f"; suggested scaling factor 1/std{' (unscaled)' if scaling else ''} = "
                     f"{json.dumps(stats['suggested_scaling_factor'])}\n")
    return 0


def decode_command(args: argparse.Namespace) -> int:
    from . import codec, commands
    from .images import check_output, save_images

    check_output(args.out)
    file = codec.load_latents(args.latents)  # a missing, unreadable or latents-less file: before loading a model
    model = commands.load_model(args.model, raw=args.raw, device=args.device)
    scaling = file.scaling
    if scaling is None and args.unscale:
        scaling = codec.scaling_of(model)
    total = file.latents.shape[0]
    num = args.num or (GRID_IMAGES if Path(args.out).suffix.lower() == ".png" else total)
    tiling = _tiling(args, model)
    shape, own = tuple(file.latents.shape[1:]), tuple(model.latent_shape)
    if tiling is None and len(shape) == len(own) == 3 and shape[0] == own[0] and shape != own:
        from .tiling import Tiling

        tiling = Tiling()  # latents of large images (encode --image-size): decoded in one piece unless --tile
    images = codec.decode(model, file.latents[:num], batch_size=args.batch_size, scaling=scaling,
                          source=f"The latents in '{args.latents}'", tiling=tiling)
    path = save_images(args.out, images)
    unscaled = f" (unscaled by {scaling[0]:g}, shift {scaling[1]:g})" if scaling else ""
    count = f"{images.shape[0]} of the {total}" if images.shape[0] < total else f"{images.shape[0]}"
    note = (f"; a .png holds the first {GRID_IMAGES} unless --num says, .npz takes all"
            if images.shape[0] < total and args.num is None else "")
    sys.stdout.write(f"wrote {count} images {tuple(images.shape[1:])} decoded from {args.latents}"
                     f"{unscaled} to {path}{note}\n")
    return 0


def _options(pairs) -> Dict[str, object]:
    from .config import parse_yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option '{pair}' must be KEY=VALUE, e.g. --option n_components=10.")
        options[key] = parse_yaml(value, f"--option '{pair}': the value")
    return options


def fit_sampler_command(args: argparse.Namespace) -> int:
    import dataclasses

    from . import commands
    from .config import DataConfig
    from .data import build_dataset
    from .samplers import build_sampler, check_replace, fit_sampler, save_sampler

    options = _options(args.option)
    model_dir = commands.resolve_model_dir(args.model, args.raw)
    model = commands.load_model(args.model, raw=args.raw, device=args.device)
    build_sampler(args.sampler, model.latent_shape, options)  # a bad name or option: before any encoding
    check_replace(model_dir, args.sampler, args.overwrite)  # a fitted sampler (minutes of work) is never lost unasked
    trained = commands.trained_data_config(args.model)
    if args.data_dir is None and trained is None:
        raise ConfigError(f"'{args.model}' does not say which data it was trained on (no training_config.yaml); pass "
                          "--data-dir (and --dataset) to name the images to fit the sampler to.")
    limit = args.limit
    if limit is None and trained is not None and trained.split == args.split:
        limit = trained.limit  # the images it was trained on, unless told otherwise
    data = dataclasses.replace(trained or DataConfig(), split=args.split, limit=limit, download=args.download,
                               **{k: v for k, v in (("root", args.data_dir), ("name", args.dataset)) if v is not None})
    if args.dataset is not None and trained is not None and args.dataset != trained.name:
        data = dataclasses.replace(data, options={})  # another plugin's options would not fit
    sampler, record = fit_sampler(model, build_dataset(data, model.config), args.sampler, options, seed=args.seed,
                                  batch_size=args.batch_size, temperature=args.temperature,
                                  announce="--limit N fits on fewer images")
    folder = save_sampler(sampler, model_dir, default=not args.no_default,
                          fitted_on={"dataset": data.name, "root": str(data.root), "split": data.split, **record})
    default = "" if args.no_default else "; it is now the folder's default sampler"
    sys.stdout.write(f"fitted the '{args.sampler}' sampler to {record['images']} posterior means of the {data.split} "
                     f"split in {record['seconds']:g} s and saved it to {folder}{default}\n")
    return 0


def score_command(args: argparse.Namespace) -> int:
    import torch

    from . import commands
    from .launcher import launched_accelerator, shutdown_distributed
    from .export import load_discriminator
    from .scoring import check_scores_output, save_scores, score

    check_scores_output(args.out)
    accelerator = launched_accelerator()
    device = "cpu" if accelerator is not None else args.device
    model = commands.load_model(args.model, raw=args.raw, device=device)
    disc = load_discriminator(commands.resolve_model_dir(args.model), map_location=str(model.device))
    dataset = _dataset(args, model, what="score" if accelerator is None or accelerator.is_main_process else None)
    logvar = None if args.logvar is None else torch.tensor(args.logvar)
    try:
        scores = score(model, dataset, num_samples=args.nll_samples, likelihood=args.likelihood, logvar=logvar,
                       seed=args.seed, batch_size=args.batch_size, discriminator=disc, accelerator=accelerator,
                       hint=f"--limit N scores fewer images, --nll-samples K (now {args.nll_samples}) fewer "
                            "importance samples")
    finally:
        shutdown_distributed()
    if accelerator is None or accelerator.is_main_process:
        path = save_scores(args.out, scores)
        means = ", ".join(f"{k} {scores[k].mean():.6g}" for k in ("neg_elbo_nats", "nll_nats", "recon_mse", "kl_nats",
                                                                   "disc_logit") if k in scores)
        sys.stdout.write(f"wrote scores of {len(scores['index'])} images of the {args.split} split to {path}\n"
                         f"means: {means}\n")
    return 0


HANDLERS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "plugins": plugins_command, "sample": sample_command, "reconstruct": reconstruct_command,
    "interpolate": interpolate_command, "eval": eval_command, "encode": encode_command, "decode": decode_command,
    "fit-sampler": fit_sampler_command, "score": score_command}
