"""The shift-tolerant LPIPS networks (Ghildyal & Liu, ECCV 2022), built here, weighted from the
``stlpips-pytorch`` wheel.

ST-LPIPS is LPIPS whose AlexNet / VGG16 backbone was made tolerant to one-pixel shifts (the first
convolution at stride 1, every stride replaced by a blur then subsampling, reflection padding) and
retrained, backbone and linear heads, on the BAPPS judgements. Its weights ship *inside* the wheel
(``stlpips_pytorch/weights/vST0.0/{alex,vgg}_shift_tolerant.pth``: 20 and 37 tensors), so it is a
real perceptual metric and loss that needs no download, unlike LPIPS, whose torchvision ImageNet
backbones must be fetched.

Why vaegan builds the networks instead of calling ``stlpips_pytorch.stlpips.LPIPS``:

- the package's modules import ``IPython`` and ``torchsummary`` at the top without declaring them
  (a whole interactive shell as a training dependency); only its weight files are read here, so the
  ``vaegan[stlpips]`` extra needs nothing but the wheel;
- its ``normalize_tensor`` puts the epsilon outside the square root, the NaN gradient of
  latent-diffusion #176 (vaegan's :func:`vaegan_plugins.perceptual._unit` keeps it inside);
- its linear heads keep dropout layers that a parent's ``.train()`` would switch on, it prints at
  construction and reads its weights with a plain ``torch.load``.

The layers below reproduce the package's (same kinds, same order, same indices inside each slice), so
its state dict loads key for key (``lin{k}.model.1.weight`` becomes ``lins.{k}.weight``: the dropout
in front of each head is left out); ``tests/test_stlpips.py`` checks the distance against the
package's own forward.

Example:
    >>> net = ShiftTolerantLPIPS("alex")  # random weights; load_weights(weights_file("alex")) for real ones
    >>> [f.shape[1] for f in net.net(torch.zeros(1, 3, 32, 32))]
    [64, 192, 384, 256, 256]
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaegan.errors import PluginError

__all__ = ["NETS", "PACKAGE", "EXTRA", "ShiftTolerantLPIPS", "weights_file", "min_side"]

PACKAGE = "stlpips_pytorch"  # the import name of the stlpips-pytorch wheel
EXTRA = 'pip install "vaegan[stlpips]"'  # (or: pip install stlpips-pytorch)
NETS = ("alex", "vgg")

# Layer plans, one tuple per layer in the package's order: ("conv", in, out, kernel, padding),
# ("blur", channels) = blur-then-subsample by 2, ("relu",), ("max", kernel) = max-pool at stride 1.
# Each slice ends where LPIPS reads a feature map; layer indices run on across slices, as in the package.
_Layer = Tuple[Union[str, int], ...]
_ALEX: Tuple[Tuple[_Layer, ...], ...] = (
    (("conv", 3, 64, 11, 2), ("blur", 64), ("relu",)),
    (("max", 3), ("blur", 64), ("conv", 64, 192, 5, 2), ("relu",)),
    (("max", 3), ("blur", 192), ("conv", 192, 384, 3, 1), ("relu",)),
    (("conv", 384, 256, 3, 1), ("relu",)),
    (("conv", 256, 256, 3, 1), ("relu",)),
)


def _vgg_plan() -> Tuple[Tuple[_Layer, ...], ...]:
    """VGG16 (configuration D) up to relu5_3, each max-pool at stride 1 followed by a blur-subsample."""
    widths = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
    slices, c_in = [], 3
    for level, outs in enumerate(widths):
        layers: List[_Layer] = [("max", 2), ("blur", c_in)] if level else []
        for c_out in outs:
            layers += [("conv", c_in, c_out, 3, 1), ("relu",)]
            c_in = c_out
        slices.append(tuple(layers))
    return tuple(slices)


_PLANS = {"alex": _ALEX, "vgg": _vgg_plan()}
_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}


class BlurSubsample(nn.Module):
    """Reflection-pad by 2, blur with the normalised [1, 2, 1] x [1, 2, 1] filter, keep every second
    pixel (the package's ``Downsample(filt_size=3, stride=2, pad_more=True)``).

    The filter is a buffer named ``filt``, as in the package, so its state dict loads unchanged.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = taps[:, None] * taps[None, :]
        self.register_buffer("filt", (kernel / kernel.sum()).expand(channels, 1, 3, 3).clone())

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, (H + 1) // 2 + 1, ...)
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


def _layer(spec: _Layer) -> nn.Module:
    kind = spec[0]
    if kind == "conv":
        _, c_in, c_out, k, pad = spec
        return nn.Conv2d(int(c_in), int(c_out), int(k), padding=int(pad))
    if kind == "blur":
        return BlurSubsample(int(spec[1]))
    if kind == "max":
        return nn.MaxPool2d(int(spec[1]), stride=1)
    return nn.ReLU(inplace=False)  # not in place: the features a slice returns are read again


class _Trunk(nn.Module):
    """The backbone: five slices whose outputs are the feature maps LPIPS compares."""

    def __init__(self, plan: Tuple[Tuple[_Layer, ...], ...]) -> None:
        super().__init__()
        index = 0
        for s, layers in enumerate(plan, start=1):
            piece = nn.Sequential()
            for spec in layers:
                piece.add_module(str(index), _layer(spec))
                index += 1
            self.add_module(f"slice{s}", piece)

    def forward(self, x: Tensor) -> List[Tensor]:
        feats = []
        for piece in self.children():
            x = piece(x)
            feats.append(x)
        return feats


class _Scaling(nn.Module):
    """LPIPS' input normalisation, ``(x - shift) / scale`` per channel (buffers from the weights file)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class ShiftTolerantLPIPS(nn.Module):
    """ST-LPIPS with the same parts as ``lpips.LPIPS``: ``scaling_layer``, ``net`` (a list of five feature
    maps) and ``lins`` (one 1x1 convolution to one channel per map), so
    :meth:`vaegan_plugins.perceptual.LPIPSLoss.distance` computes the distance the same way for both
    (with its finite-gradient normalisation).

    Args:
        net: ``alex`` or ``vgg``.

    Raises:
        ValueError: an unknown ``net``.
    """

    def __init__(self, net: str) -> None:
        super().__init__()
        if net not in _PLANS:
            raise ValueError(f"shift-tolerant LPIPS has nets {list(NETS)}, got {net!r}.")
        self.net_name = net
        self.scaling_layer = _Scaling()
        self.net = _Trunk(_PLANS[net])
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in _CHANNELS[net])

    def load_weights(self, path: Path) -> None:
        """Load the package's ``{net}_shift_tolerant.pth``: every tensor of the file is used and every one
        of this network is set (a file of another network or version is refused).

        Raises:
            PluginError: the file cannot be read or does not fit.
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated, not a state dict, not a file
            raise PluginError(f"lpips: cannot read the shift-tolerant weights '{path}' ({type(exc).__name__}: "
                              f"{exc}); reinstall them: {EXTRA} (pip install --force-reinstall stlpips-pytorch).") from exc
        if not isinstance(state, dict):
            raise PluginError(f"lpips: '{path}' holds a {type(state).__name__}, not a state dict of ST-LPIPS.")
        mapped: Dict[str, Tensor] = {}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if head.startswith("lin") and head[3:].isdigit() and rest == "model.1.weight":
                key = f"lins.{head[3:]}.weight"  # lin{k}.model = (Dropout, Conv): the dropout is not kept
            mapped[key] = value
        try:
            self.load_state_dict(mapped, strict=True)
        except RuntimeError as exc:
            raise PluginError(f"lpips: '{path}' does not fit the shift-tolerant {self.net_name} network ({exc}); "
                              f"it is not stlpips-pytorch's '{self.net_name}_shift_tolerant.pth'.") from exc

    @torch.no_grad()
    def pooled_features(self, x: Tensor) -> Tensor:
        """The last feature map averaged over positions, (B, C_5): 512-d for ``vgg``, 256-d for ``alex``.

        The feature space of the benchmarks' "Fréchet distance in VGG-ST features" (not an FID: not
        Inception, and not ImageNet-only weights). ``x`` is (B, 3, H, W) in [-1, 1].
        """
        return self.net(self.scaling_layer(x))[-1].float().mean(dim=(2, 3))


def weights_file(net: str, path: Optional[str] = None) -> Path:
    """The shift-tolerant weights of ``net``: ``path`` when given (a file, or a folder holding it), else
    the file inside the installed ``stlpips-pytorch`` wheel (found without importing its modules).

    Raises:
        PluginError: the package is not installed (the message says how to install it) or the file is missing.

    Example:
        >>> weights_file("alex").name  # doctest: +SKIP
        'alex_shift_tolerant.pth'
    """
    name = f"{net}_shift_tolerant.pth"
    if path:
        given = Path(path).expanduser()
        file = given / name if given.is_dir() else given
        if not file.is_file():
            raise PluginError(f"lpips: the option st_weights_path points at '{path}', but '{file}' does not exist; "
                              f"point it at stlpips-pytorch's '{name}' (or its folder), or unset it and {EXTRA}.")
        return file
    try:
        spec = importlib.util.find_spec(PACKAGE)  # a top-level find_spec imports nothing
    except (ImportError, ValueError):  # a broken or half-removed installation counts as none
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise PluginError(
            f"lpips: net={net}_st needs the shift-tolerant LPIPS weights that ship inside the stlpips-pytorch "
            f"wheel, which is not installed. Install it with {EXTRA} (no network is needed afterwards: the "
            f"weights are in the wheel), or point the option st_weights_path at a copy of '{name}'."
        )
    file = Path(next(iter(spec.submodule_search_locations))) / "weights" / "vST0.0" / name
    if not file.is_file():
        raise PluginError(f"lpips: the stlpips-pytorch package has no '{file}'; reinstall it: "
                          "pip install --force-reinstall stlpips-pytorch.")
    return file


def min_side(net: str, limit: int = 256) -> int:
    """The smallest square input for which every layer of ``net`` runs (reflection padding needs a
    map larger than the pad), found by shape propagation on the meta device.

    Example:
        >>> min_side("alex"), min_side("vgg")
        (21, 18)
    """
    model = ShiftTolerantLPIPS(net).to("meta")
    for side in range(1, limit):
        try:
            model.net(torch.empty(1, 3, side, side, device="meta"))
            return side
        except RuntimeError:
            continue
    raise ValueError(f"no input side below {limit} fits {net}")  # cannot happen for the two nets here

