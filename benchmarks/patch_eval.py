"""The held-out evaluation of the photo-patch benchmarks (``spatial_quality.py``, ``decoder_finetune.py``):
the patches as uint8 tensors, the reconstruction metrics, the bicubic reference and the picture rows.

One definition for every script, so their tables measure the same thing the same way:

- PSNR of the mean squared error over the whole test set, SSIM, L1, and the sharpness (Laplacian energy)
  and high-frequency ratios of the reconstructions against the real patches (``vaegan.metrics``);
- LPIPS(alex) when its ImageNet weights are local, ST-LPIPS(alex) when the stlpips-pytorch wheel is
  installed (a different network: never compared with LPIPS);
- a Fréchet distance between real and reconstructed patches in the VGG-ST network's pooled last
  feature map (512-d; called that, not FID: it is neither Inception nor ImageNet-only features);
- reconstructions from the posterior mean, clamped to the value range (what an image file would hold).

    >>> from patch_eval import bicubic_reference  # run from benchmarks/, as the scripts are
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaegan.config import DataConfig, ModelConfig
from vaegan.data import build_dataset
from vaegan.metrics import HighFrequencyRatio, SharpnessRatio

__all__ = ["load_split", "perceptual_nets", "reconstruction_metrics", "bicubic_reference", "grid_indices", "to_u8",
           "compose_rows", "PooledFeatures"]

GRID_COLUMNS = 10


def load_split(root: Path, split: str, size: int) -> Tensor:
    """The patches of ``root/split`` through the ``image_folder`` plugin, as uint8 (N, 3, size, size)."""
    if not (root / split).is_dir():  # checked first: without it image_folder would read every file under root
        raise SystemExit(f"{root / split} does not exist: write the patches first "
                         f"(python benchmarks/rgb_patches.py --out {root.parent} --sizes {size}).")
    model = ModelConfig(image_channels=3, image_size=(size, size), output_range="unit")
    ds = build_dataset(DataConfig(name="image_folder", root=str(root), split=split, download=False), model)
    images = torch.stack([ds[i] for i in range(len(ds))])  # floats in [0, 1], exactly k / 255
    return images.mul(255).round().to(torch.uint8)


def perceptual_nets() -> Dict[str, Tuple[Optional[nn.Module], Optional[str]]]:
    """``{"lpips": (net, problem), "st_lpips": ..., "vgg_st": ...}``: each network built from local files
    only (never downloaded), or None with the first sentence of why not."""
    from vaegan import registry
    from vaegan.errors import PluginError

    out: Dict[str, Tuple[Optional[nn.Module], Optional[str]]] = {}
    for key, net in (("lpips", "alex"), ("st_lpips", "alex_st"), ("vgg_st", "vgg_st")):
        try:
            out[key] = (registry.load("vaegan.losses", "lpips")(net=net, download=False).eval(), None)
        except PluginError as exc:
            out[key] = (None, str(exc).split(". ")[0])
    return out


class PooledFeatures(nn.Module):
    """An LPIPS network's pooled last feature map as the feature extractor torchmetrics' FID takes; the
    input is in ``value_range`` (the metric is updated with normalize=False)."""

    def __init__(self, term: nn.Module, value_range: Tuple[float, float]) -> None:
        super().__init__()
        object.__setattr__(self, "term", term)  # not a submodule: the metric's .to() must not copy it
        self.low, self.high = value_range
        self.num_features = int(term.network.lins[-1].weight.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        x = 2.0 * (x.float() - self.low) / (self.high - self.low) - 1.0  # -> [-1, 1]
        return self.term.network.pooled_features(x).double()


@torch.no_grad()
def reconstruction_metrics(recon_fn: Callable[[Tensor], Tensor], test_u8: Tensor, value_range: Tuple[float, float],
                           lpips_net: Optional[nn.Module] = None, batch: int = 100,
                           st_lpips: Optional[nn.Module] = None, fd_net: Optional[nn.Module] = None) -> Dict[str, float]:
    """PSNR, SSIM, L1, sharpness and high-frequency ratios (and the perceptual metrics whose networks are
    given) of ``recon_fn(x)`` against ``x`` for every test patch.

    Args:
        recon_fn: Images in ``value_range`` (B, 3, H, W) -> reconstructions.
        test_u8: The test patches, uint8 (N, 3, H, W).
        value_range: The model's (low, high).
        lpips_net, st_lpips: ``lpips`` plugin terms (their ``distance``) for ``lpips`` / ``st_lpips``.
        fd_net: An ``lpips`` term with ``net: vgg_st``: ``fd_vgg_st``, the Fréchet distance of pooled features.
    """
    from torchmetrics.aggregation import MeanMetric
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    from torchmetrics.image.fid import FrechetInceptionDistance

    low, high = value_range
    psnr, ssim = PeakSignalNoiseRatio(data_range=high - low), StructuralSimilarityIndexMeasure(data_range=high - low)
    sharp, hf, l1 = SharpnessRatio(), HighFrequencyRatio(), MeanMetric()
    distances = {k: (net, MeanMetric()) for k, net in (("lpips", lpips_net), ("st_lpips", st_lpips)) if net is not None}
    fd = None
    if fd_net is not None:
        fd = FrechetInceptionDistance(feature=PooledFeatures(fd_net, value_range), normalize=False)
    for chunk in test_u8.split(batch):
        x = chunk.float().div(255).mul(high - low).add(low)
        recon = recon_fn(x).float().clamp(low, high)  # what an image file of the output would hold
        psnr.update(recon, x)
        ssim.update(recon, x)
        sharp.update(x, real=True)
        sharp.update(recon, real=False)
        hf.update(x, real=True)
        hf.update(recon, real=False)
        l1.update((recon - x).abs().mean(dim=(1, 2, 3)))
        for net, mean in distances.values():
            mean.update(net.distance(recon, x, value_range))
        if fd is not None:
            fd.update(x, real=True)
            fd.update(recon, real=False)
    out = {"psnr": float(psnr.compute()), "ssim": float(ssim.compute()), "l1": float(l1.compute()),
           "sharpness_ratio": float(sharp.compute()), "high_frequency_ratio": float(hf.compute())}
    out.update({k: float(mean.compute()) for k, (_, mean) in distances.items()})
    if fd is not None:
        out["fd_vgg_st"] = float(fd.compute())
    return out


def bicubic_reference(x: Tensor) -> Tensor:
    """Area-downscale 4x, then bicubic back up: (3, H/4, W/4) numbers per image, no learning."""
    small = F.interpolate(x, scale_factor=0.25, mode="area")
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False)


def grid_indices(n: int) -> Tensor:
    """The test patches shown in the pictures: ``GRID_COLUMNS`` spread evenly over the set."""
    return torch.linspace(0, n - 1, min(GRID_COLUMNS, n)).round().long()


def to_u8(x: Tensor, value_range: Tuple[float, float]) -> Tensor:
    low, high = value_range
    return ((x.float().clamp(low, high) - low) / (high - low)).mul(255).round().to(torch.uint8)


def compose_rows(rows: Sequence[Tuple[Optional[str], Optional[Tensor]]], path: Path, show: int = 64,
                 margin: int = 90) -> None:
    """One labelled row of images per ``(label, uint8 (N, 3, h, w))``, images scaled (nearest) to ``show``
    pixels; ``(None, None)`` is a thin gap. Written as a PNG at ``path``."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    tiles: List[Image.Image] = []
    grids = []
    for label, images in rows:
        if images is None:
            grids.append((None, None))
            continue
        images = images.float() / 255
        if images.shape[-1] != show:
            images = F.interpolate(images, scale_factor=show / images.shape[-1], mode="nearest")
        grids.append((label, make_grid(images, nrow=images.shape[0], padding=2, pad_value=1.0)))
    width = max(g.shape[2] for _, g in grids if g is not None)
    for label, grid in grids:
        if grid is None:
            tiles.append(Image.new("RGB", (width + margin, 8), "white"))
            continue
        arr = grid.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
        tile = Image.new("RGB", (width + margin, arr.shape[0]), "white")
        tile.paste(Image.fromarray(arr), (margin, 0))
        ImageDraw.Draw(tile).text((4, arr.shape[0] // 2 - 6), label or "", fill="black")
        tiles.append(tile)
    out = Image.new("RGB", (width + margin, sum(t.height for t in tiles)), "white")
    y = 0
    for t in tiles:
        out.paste(t, (0, y))
        y += t.height
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
