"""LPIPS perceptual loss (Zhang et al. 2018) through the ``lpips`` package, made safe to train with.

Registered as ``lpips`` in ``vaegan.losses``:

.. code-block:: yaml

    losses:
      - {name: l1}
      - {name: kl}
      - {name: lpips, weight: 0.25, options: {net: vgg}}

Where the backbone's ImageNet weights come from, in order: the ``backbone_path`` option, the
``VAEGAN_LPIPS_BACKBONE`` environment variable (each a file, or a folder holding the file under
torchvision's name), torchvision's cache (``$TORCH_HOME/hub/checkpoints``), then a download into that
cache. The linear calibration layers ship inside the ``lpips`` package, so they never need a network.

Offline: ``net: alex_st`` or ``vgg_st`` is the *shift-tolerant* LPIPS of Ghildyal & Liu (ECCV 2022),
whose backbone and heads ship inside the ``stlpips-pytorch`` wheel (``pip install "vaegan[stlpips]"``;
:mod:`vaegan_plugins._stlpips`), so it needs no download at all. It is a different network trained on
the same judgements: ST-LPIPS numbers are not LPIPS numbers (report them as ``st_lpips``).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Dict, Optional
from urllib.parse import urlparse

import lpips as _lpips
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from einops import repeat
from torch import Tensor, nn

from vaegan.api import LossTerm, Player, TermInputs
from vaegan.errors import ConfigError, PluginError

from . import _stlpips

__all__ = ["LPIPSLoss", "BACKBONE_ENV", "NETS", "backbone_file_name", "st_lpips_problem"]

logger = logging.getLogger(__name__)

BACKBONE_ENV = "VAEGAN_LPIPS_BACKBONE"
_EPS = 1e-10  # as lpips' normalize_tensor, but *inside* the square root (see _unit)


@dataclass(frozen=True)
class _Backbone:
    weights: Callable[[], tvm.WeightsEnum]  # torchvision's ImageNet weights (url -> file name)
    min_side: int  # measured: the smallest square input for which every LPIPS layer is non-empty


_BACKBONES: Dict[str, _Backbone] = {
    "alex": _Backbone(lambda: tvm.AlexNet_Weights.IMAGENET1K_V1, 31),
    "vgg": _Backbone(lambda: tvm.VGG16_Weights.IMAGENET1K_V1, 16),
    "squeeze": _Backbone(lambda: tvm.SqueezeNet1_1_Weights.IMAGENET1K_V1, 17),
}
_SOURCES = ("pretrained", "random")
_ST_SUFFIX = "_st"  # alex_st, vgg_st: the shift-tolerant networks of the stlpips-pytorch wheel
NETS = (*_BACKBONES, *(n + _ST_SUFFIX for n in _stlpips.NETS))
OFFLINE_HINT = (f"Offline, net: alex_st or vgg_st needs no download: the shift-tolerant LPIPS, whose weights ship "
                f"inside the stlpips-pytorch wheel ({_stlpips.EXTRA}); its numbers are ST-LPIPS, not LPIPS.")


def backbone_file_name(net: str) -> str:
    """The file name torchvision gives the ImageNet weights of LPIPS backbone ``net``.

    Example:
        >>> backbone_file_name("alex")
        'alexnet-owt-7be5be79.pth'
    """
    return Path(urlparse(_BACKBONES[net].weights().url).path).name


def _unit(features: Tensor) -> Tensor:
    """Scale each feature vector (B, C, H, W) to unit length along C.

    lpips' ``normalize_tensor`` computes ``x / (sqrt(sum x^2) + eps)``, with eps *outside* the root:
    the square root's derivative is infinite at 0, so wherever ``sum x^2`` is 0 the backward gives
    NaN. In fp32 the preceding ReLU's backward usually masks that, but not when the sum underflows
    while the features do not (fp16 autocast: any |x| < 2.4e-4), the latent-diffusion #176 failure.
    With eps inside the root (and fp32) the gradient is finite for every input; for any vector longer
    than ~1e-5 the value equals lpips'.
    """
    return features * torch.rsqrt(features.pow(2).sum(dim=1, keepdim=True) + _EPS)


class LPIPSLoss(LossTerm):
    """The LPIPS distance between reconstructions and real images, as a generator loss.

    - Frozen and pinned in eval mode: the trainer's ``.train()`` on the player never re-enables the
      dropout of LPIPS' linear layers (the taming/LDM bug), and its weights never get gradients.
    - Kept out of ``state_dict`` and ``parameters()``: the network is held in a plain attribute, not
      registered as a submodule, so it is in no optimizer, not wrapped by DDP, and adds nothing to
      checkpoints (tens of MB of fixed ImageNet weights, and a checkpoint saved without LPIPS still
      loads). The price is that ``.to(device)`` does not reach it, so :meth:`forward` moves it to the
      input's device on first use.
    - Computed in fp32 with autocast disabled; inputs are mapped from ``inputs.value_range`` to
      [-1, 1]; one-channel images are repeated to three; images whose shorter side is below
      ``min_size`` are upsampled bilinearly (AlexNet's stride-4 stem needs at least 31 pixels).
    - The gradient is finite everywhere, including at identical inputs and all-zero features (see
      :func:`_unit` for the NaN in lpips' own normalisation).

    Reduction: per layer, the calibrated squared difference is averaged over positions (lpips'
    ``spatial_average``), summed over layers, then averaged over the batch, so the weight means the
    same at any image size.

    Args:
        net: Backbone, ``alex`` (fast; LPIPS' default), ``vgg`` (taming/LDM's choice) or ``squeeze``;
            ``alex_st`` / ``vgg_st``: shift-tolerant LPIPS, weights from the stlpips-pytorch wheel (offline).
        backbone: ``pretrained`` (ImageNet weights, see the module docstring) or ``random``: an
            untrained backbone, *only* for testing the plumbing offline; it is not a perceptual metric.
        backbone_path: The torchvision weights file, or a folder that holds it.
        download: Try torchvision's download when no local file is found.
        st_weights_path: For ``*_st``: stlpips-pytorch's ``{net}_shift_tolerant.pth`` (or its folder)
            instead of the installed wheel's.
        min_size: Shorter image side below which inputs are upsampled before the backbone.

    Raises:
        ValueError: an unknown ``net``/``backbone`` or a ``min_size`` below the backbone's minimum.
        PluginError: pretrained weights that cannot be found, downloaded or read (the message names
            the file torchvision expects and where to put it).

    Example:
        >>> term = LPIPSLoss(net="alex", backbone="random")  # offline plumbing test
        >>> term.network.training
        False
    """

    player: ClassVar[Player] = "generator"

    def __init__(self, net: str = "alex", backbone: str = "pretrained", backbone_path: Optional[str] = None,
                 download: bool = True, min_size: int = 32, st_weights_path: Optional[str] = None) -> None:
        super().__init__()
        if net not in NETS:
            raise ValueError(f"lpips: net must be one of {list(NETS)}, got {net!r}.")
        if backbone not in _SOURCES:
            raise ValueError(
                f"lpips: backbone must be 'pretrained' (ImageNet weights) or 'random' (an untrained network, "
                f"for offline tests only), got {backbone!r}. To use a local weights file set backbone_path."
            )
        shift_tolerant = net.endswith(_ST_SUFFIX)
        base = net[: -len(_ST_SUFFIX)] if shift_tolerant else net
        need = _stlpips.min_side(base) if shift_tolerant else _BACKBONES[net].min_side
        if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < need:
            raise ValueError(f"lpips: min_size must be an integer >= {need} for net={net}, got {min_size!r}.")
        self.net_name, self.backbone, self.min_size = net, backbone, min_size
        # Find the weights before building anything, so a missing file fails fast.
        if shift_tolerant:
            weights = _stlpips.weights_file(base, st_weights_path) if backbone == "pretrained" else None
            model = _stlpips.ShiftTolerantLPIPS(base)
            if weights is not None:
                model.load_weights(weights)
                logger.info("lpips: shift-tolerant %s network loaded from %s", base, weights)
        else:
            weights = _resolve_backbone(net, backbone_path, download) if backbone == "pretrained" else None
            model = _build(net)
            if weights is not None:
                _load_backbone(model, net, weights)
        if weights is None:
            logger.warning("lpips: using a RANDOM %s backbone (backbone: random); this is not a perceptual "
                           "metric, only a way to exercise the plumbing without ImageNet weights.", net)
        model.requires_grad_(False).eval()
        # A plain attribute, deliberately not a registered submodule: see the class docstring.
        object.__setattr__(self, "_lpips", model)

    @classmethod
    def missing_resources(cls) -> Optional[str]:
        """What the default ``net: alex`` lacks here (its ImageNet backbone weights), with the fix; None when it
        has them (``vaegan plugins`` shows "needs weights: ..."). Looks for the file only: no download."""
        try:
            _resolve_backbone("alex", None, download=False)
            return None
        except PluginError:
            name, cache = backbone_file_name("alex"), Path(torch.hub.get_dir()) / "checkpoints"
            return (f"weights: torchvision's ImageNet file '{name}' is not in '{cache}' (downloaded on first use when "
                    f"online; offline, copy it there or set the option backbone_path, or use net: alex_st, whose "
                    f"weights ship with vaegan[stlpips])")

    @property
    def network(self) -> nn.Module:
        """The frozen ``lpips.LPIPS`` (or :class:`~vaegan_plugins._stlpips.ShiftTolerantLPIPS`) module
        (not a submodule of this term)."""
        return self._lpips

    def train(self, mode: bool = True) -> "LPIPSLoss":
        """Set this term's mode; the LPIPS network stays in eval mode whatever ``mode`` is."""
        super().train(mode)
        self._lpips.eval()
        return self

    def extra_repr(self) -> str:
        return f"net={self.net_name}, backbone={self.backbone}, min_size={self.min_size}"

    def _prepare(self, x: Tensor, value_range) -> Tensor:
        low, high = value_range
        x = 2.0 * (x.float() - low) / (high - low) - 1.0  # value_range -> [-1, 1], as LPIPS expects
        channels = x.shape[1]
        if channels == 1:
            x = repeat(x, "b 1 h w -> b 3 h w")
        elif channels != 3:
            raise ConfigError(f"lpips compares 1- or 3-channel images, got {channels} channels.")
        h, w = x.shape[-2:]
        if min(h, w) < self.min_size:
            scale = self.min_size / min(h, w)
            x = F.interpolate(x, size=(max(self.min_size, round(h * scale)), max(self.min_size, round(w * scale))),
                              mode="bilinear", align_corners=False)
        return x

    def distance(self, a: Tensor, b: Tensor, value_range=(0.0, 1.0)) -> Tensor:
        """LPIPS distance of each pair, (B,), for images (B, C, H, W) in ``value_range`` (fp32).

        Only ``a`` carries a gradient; ``vaegan.evaluation`` uses this as its LPIPS metric.
        """
        model = self._lpips
        if next(model.parameters()).device != a.device:
            model.to(a.device)  # lazily: .to() on the parent never reaches an unregistered module
        with torch.autocast(device_type=a.device.type, enabled=False):
            # One backbone pass over both: (2B, 3, H', W').
            x = self._prepare(torch.cat([a.float(), b.detach().float()]), value_range)
            layers = model.net(model.scaling_layer(x))
            total = torch.zeros(a.shape[0], 1, device=a.device)
            for lin, features in zip(model.lins, layers):
                mine, theirs = _unit(features.float()).chunk(2)  # (B, C_l, h_l, w_l) each
                total = total + lin((mine - theirs).pow(2)).mean(dim=(2, 3))  # (B, 1)
            return total.squeeze(1)

    def forward(self, inputs: TermInputs) -> Tensor:
        """Mean LPIPS distance between reconstructions and inputs over the batch (fp32)."""
        return self.distance(inputs.output.recon, inputs.real, inputs.value_range).mean()


def st_lpips_problem(net: str = "alex") -> Optional[str]:
    """None when the shift-tolerant ``net`` can be built offline here; else the one-paragraph reason.

    Example:
        >>> st_lpips_problem("alex") is None or "stlpips" in st_lpips_problem("alex")
        True
    """
    try:
        _stlpips.weights_file(net)
        return None
    except PluginError as exc:
        return str(exc)


def _build(net: str) -> nn.Module:
    """An lpips.LPIPS with a random backbone and its shipped linear layers (read with weights_only)."""
    with warnings.catch_warnings():
        # lpips 0.1.4 calls torchvision's deprecated `pretrained=` argument; harmless here, since the
        # backbone is always built random and loaded by _load_backbone.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\.models\._utils")
        model = _lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    lin_file = Path(_lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    try:
        state = torch.load(lin_file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise PluginError(
            f"lpips: cannot read the linear-layer weights '{lin_file}' shipped with the lpips package "
            f"({type(exc).__name__}: {exc}). Reinstall it: pip install --force-reinstall lpips."
        ) from exc
    result = model.load_state_dict(state, strict=False)
    # lin0..lin6 also appear as lins.0..lins.6 (the same modules): check the former only.
    lin_missing = [k for k in result.missing_keys if k.startswith("lin") and not k.startswith("lins.")]
    if result.unexpected_keys or lin_missing:
        raise PluginError(f"lpips: '{lin_file}' does not fit LPIPS({net}): unexpected {result.unexpected_keys[:4]}, "
                          f"missing {lin_missing[:4]}. Reinstall lpips.")
    return model


def _resolve_backbone(net: str, backbone_path: Optional[str], download: bool) -> Path:
    """The local file with ``net``'s ImageNet weights; downloads it into the cache when allowed."""
    name = backbone_file_name(net)
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"  # torchvision's cache; honours TORCH_HOME
    for origin, given in (("the lpips option backbone_path", backbone_path),
                          (f"the environment variable {BACKBONE_ENV}", os.environ.get(BACKBONE_ENV))):
        if given:
            path = Path(given).expanduser()
            path = path / name if path.is_dir() else path
            if not path.is_file():
                raise PluginError(
                    f"lpips: {origin} points at '{given}', but '{path}' does not exist. Put torchvision's "
                    f"ImageNet weights for net={net}, the file '{name}', there (a file or its folder), or "
                    f"unset it to use the torchvision cache '{cache_dir}'."
                )
            return path
    cached = cache_dir / name
    if cached.is_file():
        return cached
    url = _BACKBONES[net].weights().url
    problem = "downloading is disabled (download: false)"
    if download:
        try:
            # check_hash: the hash prefix in torchvision's file name guards against a truncated file.
            torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True,
                                               weights_only=True)
            return cached
        except Exception as exc:  # URLError, timeouts, HTTP errors, hash mismatch: one clear message
            problem = f"the download failed ({type(exc).__name__}: {exc})"
    raise PluginError(
        f"lpips: the ImageNet weights of the {net} backbone are missing and {problem}. torchvision "
        f"expects the file '{name}' in '{cache_dir}' (set TORCH_HOME to move that cache). Download it "
        f"from {url} on a machine with internet and copy it there, or point the lpips option "
        f"backbone_path (or the environment variable {BACKBONE_ENV}) at the file or its folder. "
        f"{OFFLINE_HINT} (backbone: random exists only for offline tests; it is not a perceptual metric.)"
    )


def _load_backbone(model: nn.Module, net: str, path: Path) -> None:
    """Copy torchvision's ``features.<i>.*`` weights into lpips' slices, which keep the index ``i``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or not a state dict
        raise PluginError(f"lpips: cannot read backbone weights '{path}' ({type(exc).__name__}: {exc}); the "
                          f"file is corrupt or not torchvision's '{backbone_file_name(net)}'.") from exc
    by_index = {int(name): module for piece in model.net.children() for name, module in piece.named_children()}
    parts: Dict[int, Dict[str, Tensor]] = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        index, _, param = rest.partition(".")
        if head == "features" and index.isdigit() and int(index) in by_index:
            parts.setdefault(int(index), {})[param] = value
    try:
        for index, module in by_index.items():
            if any(True for _ in module.parameters()):
                module.load_state_dict(parts.get(index, {}), strict=True)
    except RuntimeError as exc:
        raise PluginError(f"lpips: '{path}' does not fit the {net} backbone ({exc}); it is not torchvision's "
                          f"'{backbone_file_name(net)}'.") from exc
    logger.info("lpips: %s backbone weights loaded from %s", net, path)
