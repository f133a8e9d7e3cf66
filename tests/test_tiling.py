"""Tiled encode / decode / reconstruct (vaegan.tiling) on a real autoencoder_kl without attention: exact when one
tile covers the image, seams that cost only the receptive field, GroupNorm's per-tile statistics measured, images
of any size, bad --tile values refused, the network's memory bounded (the torch profiler's allocations at two
image sizes), and `vaegan encode/decode/reconstruct --tile` on a folder of large images."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from vaegan_plugins.autoencoder_kl import AutoencoderKL

from vaegan.config import DataConfig
from vaegan.data import build_dataset
from vaegan.errors import ConfigError, DataError
from vaegan.tiling import (
    Tiling,
    check_tiling,
    decode_tiled,
    encode_tiled,
    reconstruct_tiled,
    tile_starts,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def no_attention(seed: int = 0, widths=(8, 16), latent: int = 4) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL((3, 32, 32), "symmetric", block_out_channels=list(widths), layers_per_block=1,
                         latent_channels=latent, norm_num_groups=4, mid_block_add_attention=False).eval()


def photo_like(h: int = 64, w: int = 96, seed: int = 0) -> torch.Tensor:
    """(1, 3, h, w) in [-1, 1]: smooth colour regions plus fine texture, as in a photograph."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(1, 3, h // 16, w // 16, generator=g), size=(h, w), mode="bicubic")
    return torch.tanh(coarse + 0.15 * torch.randn(1, 3, h, w, generator=g))


def test_tiles_are_spread_evenly_end_at_the_edge_and_overlap_at_least_as_asked():
    for size, tile, overlap in ((48, 16, 4), (50, 16, 8), (17, 16, 0), (100, 32, 8)):
        starts, length = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] + length == size and length == tile
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
    assert tile_starts(12, 16, 4) == ([0], 12) and tile_starts(40, None, 0) == ([0], 40)


def test_one_tile_as_large_as_the_image_is_the_untiled_result_exactly():
    model, x = no_attention(), photo_like()
    with torch.no_grad():
        q, pixels = model.encode(x), model.decode(model.encode(x).mean)
    tiled = encode_tiled(model, x, tile=128)
    assert torch.equal(tiled.mean, q.mean) and torch.equal(tiled.logvar, q.logvar)
    assert torch.equal(decode_tiled(model, q.mean.contiguous(), tile=128), pixels)
    assert torch.equal(reconstruct_tiled(model, x), model.reconstruct(x))  # tile None: one piece


def _without_normalisation(model: nn.Module) -> nn.Module:
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.GroupNorm):
                setattr(module, name, nn.Identity())
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_tiled_and_untiled_agree_up_to_the_measured_deviation(seed):
    """The numbers the module's docstring and docs/training.md state (64 x 96 image, f = 2, overlap 16 px)."""
    x = photo_like(seed=seed)
    model = no_attention(seed)
    with torch.no_grad():
        full = model.reconstruct(x)
    small = (reconstruct_tiled(model, x, 32, 16) - full).abs()
    large = (reconstruct_tiled(model, x, 64, 16) - full).abs()
    # GroupNorm normalises each tile by its own statistics: the deviation an untrained model shows, which larger
    # tiles (statistics closer to the whole image's) shrink.
    assert small.mean() < 0.3 and large.mean() < 0.1 and large.mean() < small.mean() / 2
    # Without normalisation only the receptive field is cut at the tiles' borders: the blend leaves no seam.
    plain = _without_normalisation(no_attention(seed))
    with torch.no_grad():
        full = plain.reconstruct(x)
    seams_32 = (reconstruct_tiled(plain, x, 32, 16) - full).abs()
    seams_64 = (reconstruct_tiled(plain, x, 64, 16) - full).abs()
    assert seams_32.max() < 1e-2 and seams_32.mean() < 1e-3 and seams_64.max() < 3e-3 and seams_64.mean() < 1e-4


def test_images_of_any_size_are_padded_to_a_multiple_of_f_and_cropped_back():
    model = no_attention(widths=(8, 8, 16))  # f = 4
    x = photo_like(64, 96)[..., :61, :77]
    q = encode_tiled(model, x, tile=32, overlap=8)
    assert q.mean.shape == (1, 4, 16, 20) and q.logvar.shape == q.mean.shape  # ceil(61 / 4), ceil(77 / 4)
    assert decode_tiled(model, q.mean, tile=32, overlap=8).shape == (1, 3, 64, 80)
    assert reconstruct_tiled(model, x, tile=32, overlap=8).shape == x.shape
    padded = F.pad(x, (0, 3, 0, 3), mode="replicate")  # what one piece of any size sees
    assert torch.equal(encode_tiled(model, x).mean, encode_tiled(model, padded).mean)


def test_a_bad_tile_an_overlap_or_a_model_that_cannot_tile_is_one_paragraph():
    model = no_attention(widths=(8, 8, 16))  # f = 4
    for tiling, words in ((Tiling(30), "--tile 30 must be a multiple of this model's downsampling factor 4"),
                          (Tiling(2), "--tile 2 must be a multiple"), (Tiling(32, 6), "--overlap 6 must be a multiple"),
                          (Tiling(32, 32), "--overlap 32 must be a multiple of 4 (the downsampling factor) from 0 "
                                           "to below the tile")):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")) as info:
            check_tiling(model, tiling)
        assert "\n" not in str(info.value)
    assert check_tiling(model, Tiling(64)) == (64, 16, 4)  # a quarter of the tile by default
    from conftest import tiny_generator

    with pytest.raises(ConfigError, match="spatial latent"):
        encode_tiled(tiny_generator("conv"), torch.rand(1, 1, 28, 28), tile=16)
    with pytest.raises(DataError, match="NaN or infinite"):
        encode_tiled(model, torch.full((1, 3, 8, 8), float("nan")), tile=32)
    with pytest.raises(DataError, match="another model"):
        decode_tiled(model, torch.zeros(1, 3, 8, 8), tile=32)


def _transient_peak(run) -> int:
    """Bytes the call allocated at its peak above what it returns (the torch profiler's allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()  # held: what the call returns is not transient
    # kineto_results is not a public name; it holds every allocation and free in order (torch 2.x)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    del result
    return peak - current


def test_the_tiled_peak_memory_does_not_grow_with_the_image_size():
    model = no_attention()
    peaks = {}
    for size in (64, 128):
        x = torch.rand(1, 3, size, size) * 2 - 1
        z = torch.randn(1, 4, size // 2, size // 2)
        peaks[size] = {"encode": _transient_peak(lambda: model.encode(x)),
                       "encode tiled": _transient_peak(lambda: encode_tiled(model, x, 32, 8)),
                       "decode": _transient_peak(lambda: model.decode(z)),
                       "decode tiled": _transient_peak(lambda: decode_tiled(model, z, 32, 8))}
    for kind in ("encode", "decode"):
        assert peaks[128][kind] > 3 * peaks[64][kind]  # 4x the pixels, 4x the activations
        assert peaks[128][f"{kind} tiled"] <= 1.05 * peaks[64][f"{kind} tiled"]  # one tile's activations
        assert peaks[128][f"{kind} tiled"] < peaks[128][kind] / 4


def _write_photos(folder, size, n=2):
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        pixels = ((photo_like(size[0], size[1], seed=i)[0] + 1) * 127.5).round().clamp(0, 255).byte()
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"photo{i}.png")
    return folder


def test_encode_decode_and_reconstruct_a_folder_of_large_images_with_tile(tmp_path, capsys):
    import numpy as np

    from vaegan.cli import main

    model = no_attention()
    model.save_pretrained(tmp_path / "model")
    folder = _write_photos(tmp_path / "photos", (150, 200))
    common = ["--model", str(tmp_path / "model"), "--data-dir", str(folder), "--dataset", "image_folder",
              "--image-size", "96", "128", "--tile", "32", "--overlap", "8"]
    assert main(["encode", *common, "--out", str(tmp_path / "z.safetensors")]) == 0
    latents = load_file(str(tmp_path / "z.safetensors"))["latents"]
    assert latents.shape == (2, 4, 48, 64)
    sized = dataclasses.replace(model.config, image_size=(96, 128))
    data = build_dataset(DataConfig(name="image_folder", root=str(folder), split="test"), sized)
    expected = encode_tiled(model, torch.stack([data[0], data[1]]), 32, 8).mean
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)
    assert main(["decode", "--model", str(tmp_path / "model"), "--latents", str(tmp_path / "z.safetensors"),
                 "--tile", "32", "--out", str(tmp_path / "x.npz")]) == 0
    assert np.load(tmp_path / "x.npz")["images"].shape == (2, 3, 96, 128)
    assert main(["reconstruct", *common, "--out", str(tmp_path / "r.npz")]) == 0
    assert np.load(tmp_path / "r.npz")["images"].shape == (2, 3, 96, 128)
    assert main(["encode", *common[:-4], "--tile", "33", "--out", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--tile 33 must be a multiple of this model's downsampling factor 2" in err
    assert not (tmp_path / "bad.safetensors").exists()


# A child process that imports everything first, then resets its peak resident memory (Linux: VmHWM, reset
# through /proc/self/clear_refs), runs the command and prints how far above the start the peak went.
_MEASURE = """
import sys
import torch, PIL.Image, torchvision.transforms.v2  # noqa: the imports' memory is not the command's
import vaegan.cli, vaegan.codec, vaegan.commands, vaegan.tiling, vaegan_plugins.autoencoder_kl  # noqa
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    print("NO_RESET"); sys.exit(0)
base = status("VmRSS")
rc = vaegan.cli.main(sys.argv[1:])
print("PEAK", status("VmHWM") - base)
sys.exit(rc)
"""


@pytest.mark.slow
def test_vaegan_encode_of_large_images_with_tile_stays_in_bounded_memory(tmp_path):
    """Peak resident memory of `vaegan encode --batch-size 1` of a 768 px photo at 384 and 768 px (32-channel model)."""
    no_attention(widths=(32, 32)).save_pretrained(tmp_path / "model")
    folder = _write_photos(tmp_path / "photos", (768, 768), n=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    peak = {}
    for tiled in (False, True):
        for size in (384, 768):
            cmd = [sys.executable, "-c", _MEASURE, "encode", "--model", str(tmp_path / "model"), "--data-dir",
                   str(folder), "--dataset", "image_folder", "--image-size", str(size), "--batch-size", "1",
                   "--out", str(tmp_path / f"z{size}{tiled}.safetensors"), *(["--tile", "128"] if tiled else [])]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-2000:]
            if "NO_RESET" in proc.stdout:
                pytest.skip("this kernel does not let a process reset its peak memory (/proc/self/clear_refs)")
            peak[tiled, size] = int(proc.stdout.split("PEAK")[1])
    print({k: f"{v / 2 ** 20:.0f} MiB" for k, v in peak.items()})
    # Untiled: the activations of 4x the pixels (measured 132 -> 386 MiB); tiled: one 128 px tile's, plus the
    # image and its latents (measured 46 -> 52 MiB).
    assert peak[False, 768] - peak[False, 384] > 150 * 2 ** 20
    assert peak[True, 768] - peak[True, 384] < 24 * 2 ** 20 and peak[True, 768] < peak[False, 384]
