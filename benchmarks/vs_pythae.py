"""vaegan against pythae's VAEGAN: the same networks and data, images/s and quality at equal wall-clock.

pythae (``pip install pythae``) is the library a user would otherwise pick for a VAE-GAN. Both train:

- the same encoder and decoder (vaegan's default conv VAE, wrapped in pythae's BaseEncoder/BaseDecoder)
  and the same discriminator layers (vaegan's ``simple`` discriminator, with the sigmoid pythae's BCE
  needs), so the difference is the training machinery, not the architecture;
- on the same MNIST training digits, batch 64, Adam, fp32, one process, the same threads.

pythae trains ``--pythae-epochs`` epochs with its CoupledOptimizerAdversarialTrainer (its VAEGAN
objective: Larsen et al.'s feature-space reconstruction, margin/equilibrium gating); its wall time is
the budget. vaegan's recipe (its defaults) then trains for the same wall time. Both final generators
are evaluated with vaegan.evaluation's protocol (the pythae encoder/decoder weights are loaded into a
vaegan VAE of the same architecture: same modules, so the numbers are comparable).

    python benchmarks/vs_pythae.py --data-dir ../shared/data                 # 2 pythae epochs
    python benchmarks/vs_pythae.py --data-dir ../shared/data --pythae-epochs 5 --json out.json
    python benchmarks/vs_pythae.py --data-dir ../shared/data --set train.mixed_precision=bf16 train.channels_last=true

``--speed-repeats N`` measures only images/s, N times in alternation (pythae one epoch on
``--speed-images`` digits, then vaegan for the same wall time), and reports every ratio and their
median: on a VM whose speed drifts by 10% between runs, one pair of runs cannot settle a ratio.

    python benchmarks/vs_pythae.py --data-dir ../shared/data --speed-repeats 3 --set train.mixed_precision=bf16
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

import vaegan
from vaegan.config import DataConfig, EvalConfig, ExperimentConfig, apply_overrides
from vaegan.data import build_dataset
from vaegan.discriminators import SimpleDiscriminator
from vaegan.evaluation import evaluate
from vaegan.model import ConvDecoder, ConvEncoder

sys.path.insert(0, str(Path(__file__).parent))
from machine import DEFAULTS_0_2  # noqa: E402  (run as a script from benchmarks/)


def _conv_options(model_cfg) -> dict:
    """The conv generator's resolved options (latent size, widths, depth): the nets both libraries train."""
    opts = vaegan.build_generator(model_cfg).config.options
    return {k: opts[k] for k in ("latent_dim", "channels", "res_blocks", "norm_groups")}


def _pythae_model(model_cfg, opts: dict):
    from pythae.models import VAEGAN, VAEGANConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseDiscriminator, BaseEncoder

    class Encoder(BaseEncoder):
        def __init__(self):
            BaseEncoder.__init__(self)
            self.net = ConvEncoder(model_cfg)

        def forward(self, x):
            mean, logvar = self.net(x).chunk(2, dim=1)
            return ModelOutput(embedding=mean, log_covariance=logvar)

    class Decoder(BaseDecoder):
        def __init__(self):
            BaseDecoder.__init__(self)
            self.net = ConvDecoder(model_cfg.image_shape, **opts)

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    class Discriminator(BaseDiscriminator):
        def __init__(self):
            BaseDiscriminator.__init__(self)
            self.net = SimpleDiscriminator(model_cfg.image_shape)
            self.depth = len(self.net.blocks) + 1

        def forward(self, x, output_layer_levels: List[int] = None):
            out = self.net(x)
            result = ModelOutput(embedding=torch.sigmoid(out.logits))
            for level in output_layer_levels or []:
                result[f"embedding_layer_{level}"] = out.features[level - 1] if level <= len(out.features) else out.logits
            return result

    config = VAEGANConfig(input_dim=model_cfg.image_shape, latent_dim=opts["latent_dim"], reconstruction_layer=2)
    return VAEGAN(config, encoder=Encoder(), decoder=Decoder(), discriminator=Discriminator())


def train_pythae(args, train_images: torch.Tensor, out: Path, epochs: int):
    from pythae.trainers import CoupledOptimizerAdversarialTrainer, CoupledOptimizerAdversarialTrainerConfig

    model_cfg = apply_overrides(ExperimentConfig(), DEFAULTS_0_2).model
    opts = _conv_options(model_cfg)
    torch.manual_seed(args.seed)
    model = _pythae_model(model_cfg, opts)
    cfg = CoupledOptimizerAdversarialTrainerConfig(
        output_dir=str(out), num_epochs=epochs, per_device_train_batch_size=64,
        encoder_learning_rate=1e-3, decoder_learning_rate=1e-3, discriminator_learning_rate=1e-3,
        no_cuda=not torch.cuda.is_available(), steps_saving=None, seed=args.seed)
    from pythae.data.datasets import BaseDataset

    dataset = BaseDataset(train_images, torch.zeros(len(train_images)))  # pythae's container (labels unused)
    trainer = CoupledOptimizerAdversarialTrainer(model=model, train_dataset=dataset, training_config=cfg)
    # pythae pickles the whole model at the end, which spectral-norm parametrisations refuse; the
    # weights are taken from memory below, so skip that save (it is not training work either).
    trainer.save_model = lambda model, dir_path: None
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    vae = vaegan.build_generator(model_cfg)  # the same modules: copy the trained weights over
    vae.encoder.load_state_dict(model.encoder.net.state_dict())
    vae.decoder.load_state_dict(model.decoder.net.state_dict())
    return vae, wall, epochs * len(train_images) / wall


class _Budget(vaegan.Callback):
    """Ends training (normally: final/ is written) after the first step that ends past ``deadline``."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def on_step_end(self, trainer, output) -> None:
        if time.perf_counter() > self.deadline:
            trainer.stop()


def train_vaegan(args, seconds: float, out: Path):
    shutil.rmtree(out, ignore_errors=True)  # scratch: a rerun replaces it (a run refuses a folder that holds one)
    cfg = apply_overrides(ExperimentConfig(), [*DEFAULTS_0_2,  # the recipe as measured (docs/benchmarks.md)
        f"data.root={args.data_dir}", "data.download=false", f"train.output_dir={out}", "train.epochs=1000",
        f"train.seed={args.seed}", "train.checkpoint_every=0", "train.sample_every=0", "train.log_every=100",
        "train.plot_loss_curves=false", *args.set])
    budget = _Budget(float("inf"))
    trainer = vaegan.build_trainer(cfg, callbacks=[budget])
    t0 = time.perf_counter()
    budget.deadline = t0 + seconds
    final = trainer.fit()
    wall = time.perf_counter() - t0
    return vaegan.VAE.from_pretrained(final), wall, trainer.state.images_seen / wall


def speed_only(args, train_images: torch.Tensor) -> int:
    """Alternate pythae and vaegan ``args.speed_repeats`` times; print each images/s ratio and the median."""
    images = train_images[: args.speed_images]
    ratios: List[float] = []
    for r in range(args.speed_repeats):
        with tempfile.TemporaryDirectory() as tmp:
            _, wall, theirs = train_pythae(args, images, Path(tmp) / "pythae", epochs=1)
            _, _, ours = train_vaegan(args, wall, Path(tmp) / "vaegan")
        ratios.append(ours / theirs)
        sys.stdout.write(f"repeat {r + 1}: pythae {theirs:.1f} images/s, vaegan {ours:.1f} images/s, "
                         f"ratio {ratios[-1]:.2f}\n")
    sys.stdout.write(f"median ratio {statistics.median(ratios):.2f} over {len(ratios)} pairs "
                     f"(min {min(ratios):.2f}, max {max(ratios):.2f}; target >= 3)\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--pythae-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=10000)
    p.add_argument("--json", type=Path)
    p.add_argument("--speed-repeats", type=int, default=0, help="only images/s, this many alternating pairs")
    p.add_argument("--speed-images", type=int, default=6400, help="digits per pythae epoch in --speed-repeats")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="vaegan config overrides, e.g. train.mixed_precision=bf16 train.channels_last=true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model_cfg = apply_overrides(ExperimentConfig(), DEFAULTS_0_2).model
    train = build_dataset(DataConfig(root=args.data_dir, download=False), model_cfg)
    train_images = train[torch.arange(len(train))]  # (N, 1, 28, 28) floats in [0, 1], as pythae takes them
    if args.speed_repeats:
        return speed_only(args, train_images)
    ec = EvalConfig(num_samples=args.num_samples, nll_images=1000, nll_samples=100)
    data = DataConfig(root=args.data_dir, download=False)
    rows: Dict[str, Dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pythae_vae, pythae_wall, pythae_ips = train_pythae(args, train_images, Path(tmp) / "pythae", args.pythae_epochs)
        logging.info("pythae: %.0f s, %.1f images/s", pythae_wall, pythae_ips)
        ours, wall, ips = train_vaegan(args, pythae_wall, Path(tmp) / "vaegan")
        logging.info("vaegan: %.0f s, %.1f images/s", wall, ips)
        for name, model, w, speed in (("pythae VAEGAN", pythae_vae, pythae_wall, pythae_ips), ("vaegan", ours, wall, ips)):
            metrics = evaluate(model, data, ec)
            rows[name] = {"wall_s": w, "images_per_s": speed, **metrics}
    sys.stdout.write("| library | wall s | images/s | FD | sharpness | PSNR | SSIM | NLL nats | recall |\n")
    sys.stdout.write("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    for name, r in rows.items():
        sys.stdout.write(f"| {name} | {r['wall_s']:.0f} | {r['images_per_s']:.1f} | {r['fd_classifier']:.1f} | "
                         f"{r['sharpness_ratio']:.2f} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['nll_nats']:.1f} | "
                         f"{r['recall']:.2f} |\n")
    speedup = rows["vaegan"]["images_per_s"] / rows["pythae VAEGAN"]["images_per_s"]
    sys.stdout.write(f"\nvaegan images/s / pythae images/s = {speedup:.2f} (target >= 3)\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
