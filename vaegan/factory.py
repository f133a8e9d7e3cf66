"""Factories: turn an :class:`~vaegan.config.ExperimentConfig` into components, then a trainer.

Everything the training loop uses is built here, in this order, before any training starts: the
plugins (objective, generator, discriminator, dataset; every name and option is checked), the
Accelerator, a check of the data against the model, the data loader, both players with their
optimizers and schedules, ``accelerator.prepare``, the EMA, compilation, and the evaluation data. Each
piece has its own function, so a test or a benchmark can build some parts itself and inject them.

Example:
    >>> cfg = load_config("recipes/configs/vaegan_mnist.yaml", ["train.max_steps=10"])  # doctest: +SKIP
    >>> build_trainer(cfg).fit()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset

from . import api, registry
from ._deprecation import warn_deprecated
from .callbacks import Callback
from .config import ExperimentConfig, TrainConfig
from .data import TensorImages, build_dataset, describe_dataset, image_of, is_stream, prepare_stream
from .errors import ConfigError, DataError, OutputError
from .faults import check_output, output_estimate
from .generator import build_generator
from .guards import StepGuard
from .objective import Objective
from .optim import WarmupEMA, build_optimizer, default_precision
from .preemption import WorkerSignals, stop_signals
from .run_folder import RunFolder
from .samplers import build_sampler
from .step import PlayerModule, Trainable, TrainStep
from .trainer import Trainer

if TYPE_CHECKING:  # evaluation pulls in torchmetrics (~2 s): imported only when a run evaluates
    from .evaluation import EvalResources

__all__ = ["build_generator", "build_discriminator", "build_accelerator", "build_loader", "check_dataset",
           "Components", "build_components", "build_trainer", "train", "build_model", "check_sampler"]

logger = logging.getLogger(__name__)


def build_discriminator(config: ExperimentConfig) -> Optional[nn.Module]:
    """The discriminator plugin named in ``config.discriminator`` (None for a plain VAE).

    Raises:
        PluginError: unknown or broken plugin, or one that is not a :class:`~vaegan.api.Discriminator`.
        ConfigError: options it does not accept (e.g. too deep for the image size).
    """
    dc = config.discriminator
    if dc is None:
        return None
    return registry.build_plugin("vaegan.discriminators", dc.name, dict(dc.options), image_shape=config.model.image_shape)


def build_model(config: ExperimentConfig) -> api.VAE:
    """Deprecated: ``build_generator(config.model)``."""
    warn_deprecated("vaegan.build_model(config) is deprecated; use vaegan.build_generator(config.model).")
    return build_generator(config.model)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, as a scheduler's cgroup or taskset sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_threads(train: TrainConfig, local_processes: int, env: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """The intra-op threads each process of a CPU run should use, or None to leave torch's setting alone.

    ``train.cpu_threads`` when set. Otherwise only ``accelerate launch``'s default is overridden: without an
    accelerate config it sets ``OMP_NUM_THREADS=1``, which halves the speed of a one-process run on a
    2-core machine; the cores this process may use are then shared among the node's processes. An
    ``OMP_NUM_THREADS`` set any other way (torchrun's default, the user's) is respected.
    """
    env = os.environ if env is None else env
    if train.cpu_threads is not None:
        return train.cpu_threads
    launched_by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in env  # set by `accelerate launch` for its processes
    if launched_by_accelerate and env.get("OMP_NUM_THREADS") == "1":
        return max(1, usable_cores() // max(1, local_processes))
    return None


def build_accelerator(train: TrainConfig) -> Accelerator:
    """The run's Accelerator: precision, gradient accumulation, trackers, seeded data order (and TF32, and on a
    CPU the threads per process: :func:`cpu_threads`)."""
    if train.tf32 and torch.cuda.is_available():  # fp32 matmuls and convs on tensor cores (Ampere+)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accelerator = Accelerator(
        mixed_precision=default_precision(train.mixed_precision),
        gradient_accumulation_steps=train.grad_accum,
        log_with=None if train.report_to == "none" else train.report_to,
        project_dir=train.output_dir,
        step_scheduler_with_optimizer=False,  # schedules count optimizer updates, stepped by the step
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
    )
    if accelerator.device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        threads = cpu_threads(train, local)
        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
    return accelerator


def check_dataset(model: api.VAE, dataset: Dataset, global_batch: int) -> None:
    """Refuse data that would fail later: empty, smaller than one step, or images the model cannot take.

    Raises:
        DataError: saying what is wrong and what to change.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("The dataset is empty; point the data section at a folder or split with images.")
    if n < global_batch:
        raise DataError(
            f"The dataset has {n} images but one step needs {global_batch} (batch_size x processes). "
            "Lower train.batch_size or add data."
        )
    # 64 images spread over the whole dataset, not only its first batch: a bad file in the middle is
    # refused now rather than found at step 40,000.
    spread = torch.linspace(0, n - 1, min(n, 64)).round().long().unique().tolist()
    if not getattr(dataset, "random_access", True):  # a stream read in order (a hub dataset): its first images
        spread = range(min(n, 64))
    items = [dataset[i] for i in spread]
    model.check_images(torch.stack([image_of(it) for it in items]), "the dataset")


def build_loader(dataset: Dataset, config: ExperimentConfig, accelerator: Accelerator) -> DataLoader:
    """The (unprepared) training loader: shuffled with a private seeded generator, full batches only.

    MNIST-size in-memory data moves to the GPU once (batches are then cut there); streamed data gets
    worker processes, pinned memory and prefetching.
    """
    tc, workers = config.train, config.data.num_workers
    on_gpu = accelerator.device.type == "cuda"
    if isinstance(dataset, TensorImages) and on_gpu and workers == 0:
        dataset = dataset.to(accelerator.device)
    streamed = not isinstance(dataset, TensorImages)  # decoded per item
    shuffle = not is_stream(dataset)  # a stream shuffles its shards and samples itself (seeded by the generator)
    # A private generator: DataLoader.__iter__ otherwise draws a seed from the global RNG, which would
    # shift the reparameterisation noise after a mid-epoch resume.
    # Workers leave stop signals (a whole process group's SIGTERM, SLURM's warning) to the main process.
    stops = stop_signals(tc)
    return DataLoader(dataset, batch_size=tc.batch_size, shuffle=shuffle, drop_last=True, num_workers=workers,
                      generator=torch.Generator().manual_seed(tc.seed), pin_memory=on_gpu and streamed,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                      worker_init_fn=WorkerSignals(stops) if workers > 0 else None)


@dataclass
class Components:
    """What :class:`~vaegan.trainer.Trainer` is built from (see :func:`build_components`)."""

    train_step: TrainStep
    loader: Any  # the prepared DataLoader
    total_steps: int
    evaluation: Optional[EvalResources]


def build_components(config: ExperimentConfig, model: api.VAE, objective: Objective, dataset: Dataset,
                     discriminator: Optional[nn.Module] = None, accelerator: Optional[Accelerator] = None) -> Components:
    """Assemble given plugins into a prepared step and loader: checks, optimizers, ``prepare``, EMA, compile.

    Args:
        config: The run's configuration.
        model: The generator. objective: Both players' loss terms. dataset: Training images.
        discriminator: Required when the objective has adversarial terms.
        accelerator: Default: :func:`build_accelerator` of ``config.train``.

    Raises:
        DataError: the data does not fit the model, or there is too little of it.
        ConfigError: inconsistent components.
    """
    tc = config.train
    accelerator = accelerator or build_accelerator(tc)
    if objective.needs_discriminator and discriminator is None:
        raise ConfigError("The objective has adversarial terms but no discriminator was given.")
    check_dataset(model, dataset, tc.batch_size * accelerator.num_processes)
    set_seed(tc.seed)
    loader = build_loader(dataset, config, accelerator)
    to_prepare: tuple = (loader,)
    if is_stream(dataset):  # it splits itself across ranks and workers: Accelerate must not shard it again
        loader, to_prepare = prepare_stream(loader, accelerator), ()
    batches = len(dataset) // (tc.batch_size * accelerator.num_processes)  # full micro-batches per epoch
    per_epoch = math.ceil(batches / tc.grad_accum)
    total_steps = min(tc.max_steps or per_epoch * tc.epochs, per_epoch * tc.epochs)
    objective.resolve(total_steps)  # schedules given as a fraction of training

    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
        if discriminator is not None:
            discriminator = discriminator.to(memory_format=torch.channels_last)
    gen = PlayerModule(model, objective.generator_terms)
    g_opt, g_sched = build_optimizer(gen.parameters(), config.optim_g, total_steps)
    if discriminator is None:
        gen, g_opt, g_sched, *prepared = accelerator.prepare(gen, g_opt, g_sched, *to_prepare)
        d_player = None
    else:
        if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
            # BatchNorm statistics would otherwise differ per rank (SyncBatchNorm needs a GPU).
            discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
        disc = PlayerModule(discriminator, objective.discriminator_terms)
        d_opt, d_sched = build_optimizer(disc.parameters(), config.optim_d, total_steps)
        gen, disc, g_opt, d_opt, g_sched, d_sched, *prepared = accelerator.prepare(
            gen, disc, g_opt, d_opt, g_sched, d_sched, *to_prepare)  # generator first: the checkpoint's file order
        d_player = Trainable(disc, d_opt, d_sched, config.optim_d)
    loader = prepared[0] if prepared else loader
    raw = accelerator.unwrap_model(gen).net
    ema = None
    if tc.ema_decay is not None:
        ema = AveragedModel(raw, multi_avg_fn=WarmupEMA(tc.ema_decay), use_buffers=True)
        ema.multi_avg_fn.averaged = ema.module  # frozen parameters are kept as they are
    if tc.compile:  # in place, after the EMA copy: state_dict keys and checkpoints stay as they are
        raw.compile(backend=tc.compile)
        if d_player is not None:
            accelerator.unwrap_model(d_player.module).net.compile(backend=tc.compile)
    guard = StepGuard(tc.max_nonfinite_steps, accelerator, fp16_scaler=accelerator.scaler is not None)
    step = TrainStep(accelerator, objective, Trainable(gen, g_opt, g_sched, config.optim_g), d_player, guard, ema,
                     channels_last=tc.channels_last)
    evaluation = None
    if config.eval.every:  # load the split (and classifier) now: missing data fails before training
        from .evaluation import prepare_evaluation

        evaluation = prepare_evaluation(config.data, model.config, config.eval, accelerator=accelerator)
    return Components(step, loader, total_steps, evaluation)


def build_trainer(config: ExperimentConfig, accelerator: Optional[Accelerator] = None,
                  callbacks: Sequence[Callback] = (), dataset: Optional[Dataset] = None) -> Trainer:
    """Build every plugin named in ``config``, assemble them (:func:`build_components`) and the trainer.

    Every plugin is resolved and the data is checked here, before any training starts. The seed is
    set first, so the initial weights depend only on ``config.train.seed``.

    Args:
        config: The run's configuration.
        accelerator: Default: :func:`build_accelerator` of ``config.train``.
        callbacks: Hooks into the loop (:class:`~vaegan.callbacks.Callback`).
        dataset: Training images to use instead of the ``data`` section's dataset plugin.

    Raises:
        PluginError, ConfigError, DataError: a name, option or dataset that cannot be used.

    Example:
        >>> trainer = build_trainer(load_config("recipes/configs/vaegan_mnist.yaml"))  # doctest: +SKIP
    """
    set_seed(config.train.seed)
    objective = Objective.from_config(config)
    model = build_generator(config.model)
    disc = build_discriminator(config)
    # Before any data is read: a folder that cannot take the run (a file, read-only, too little space), that
    # holds another run (without resume or overwrite), that a live run holds, or with links inside is refused.
    check_output(config.train.output_dir, output_estimate(config, model, disc), config.train.checkpoints_total_limit)
    accelerator = accelerator or build_accelerator(config.train)
    folder = run_folder(config.train)
    on_main(accelerator, folder.check)
    dataset = build_dataset(config.data, config.model) if dataset is None else dataset
    if accelerator.is_main_process:
        logger.info(describe_dataset(config.data, dataset))
    if config.sampler is not None:  # a bad sampler name, option or size fails now, not after training
        check_sampler(config, model, len(dataset))
    parts = build_components(config, model, objective, dataset, disc, accelerator)
    on_main(accelerator, folder.claim)  # the lock, before the run writes anything
    trainer = Trainer(config, parts.train_step, parts.loader, parts.total_steps, callbacks=callbacks,
                      evaluation=parts.evaluation)
    trainer.run_folder = folder
    return trainer


def run_folder(train: TrainConfig) -> RunFolder:
    """The :class:`~vaegan.run_folder.RunFolder` of ``train.output_dir`` (its checks: no links inside, no fresh
    run over a run, no second live run; its lock)."""
    extra = (train.project,) if train.report_to == "tensorboard" else ()  # TensorBoard's folder, a run's too
    return RunFolder(train.output_dir, resume=train.resume, overwrite=train.overwrite, extra_entries=extra)


def on_main(accelerator: Accelerator, fn: Callable[[], Any]) -> None:
    """``fn()`` on the main process only (another rank would see this run's own lock and config.yaml); the
    :class:`~vaegan.errors.OutputError` it raises is raised on every process, so none waits at a barrier.

    Raises:
        OutputError: what the main process refused, on every process.
    """
    message = None
    if accelerator.is_main_process:
        try:
            fn()
        except OutputError as exc:
            message = str(exc)
    if accelerator.num_processes > 1:  # every rank raises the same paragraph, none waits at a barrier
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message])[0]
    if message is not None:
        raise OutputError(message)


def check_sampler(config: ExperimentConfig, model: api.VAE, num_images: int) -> None:
    """Build ``config.sampler`` once (it is fitted at the end of training) and check it has enough images.

    Raises:
        ConfigError, PluginError: a name, option or latent size it refuses, or too few training images.
    """
    sc = config.sampler
    skip = "or set `sampler: null` to train without fitting a latent sampler at the end"
    try:
        with torch.random.fork_rng():  # building one may draw initial weights: the run's RNG stays untouched
            sampler = build_sampler(sc.name, model.latent_shape, sc.options)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (The `sampler` section: fix its options, {skip}.)") from None
    images = min(num_images, sc.limit or num_images)
    if images < sampler.min_latents:
        raise ConfigError(f"The '{sc.name}' sampler fitted at the end of training needs at least {sampler.min_latents} "
                          f"training images, but it would see {images}. Use more images, fewer components "
                          f"(sampler.options), {skip}.")


def train(config: ExperimentConfig, callbacks: Sequence[Callback] = ()) -> Path:
    """Build everything and train; returns the folder of the final model."""
    return build_trainer(config, callbacks=callbacks).fit()
