"""The trainer's preview panels (vaegan.previews): every sample grid says where its latents came from, and a
model that is not sampled from its prior (a spatial latent without a sampler) gets no prior-sample grid."""

from __future__ import annotations

import pytest
import torch
from conftest import load_digits, tiny_generator

from vaegan.previews import LABEL_HEIGHT, caption, preview_grids, sample_caption

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _band_text_pixels(grid: torch.Tensor) -> int:
    """Dark pixels in the caption band (text) of a float grid in [0, 1]."""
    return int((grid[:, :LABEL_HEIGHT] < 0.5).any(0).sum())


def test_sample_grids_carry_a_caption_naming_their_latents():
    model = tiny_generator()
    real = load_digits(4)
    grids = preview_grids(model, real, model.sample_prior(8), sampled={"gmm": torch.randn(8, *model.latent_shape)})
    plain = preview_grids(model, real, model.sample_prior(8))
    for key in ("samples", "samples_gmm"):
        assert grids[key].shape[1] == plain["samples"].shape[1]  # the same band height on both
        assert _band_text_pixels(grids[key]) > 20 and float(grids[key][:, :LABEL_HEIGHT].max()) == 1.0
    assert not torch.equal(grids["samples"][:, :LABEL_HEIGHT], grids["samples_gmm"][:, :LABEL_HEIGHT])
    assert sample_caption(None) == "samples: N(0, I) prior" and "'gmm'" in sample_caption("gmm")


def test_no_prior_grid_without_prior_latents():
    model = tiny_generator("tiny_spatial")
    grids = preview_grids(model, load_digits(4), None)
    assert "samples" not in grids and {"reconstructions", "interpolations"} <= set(grids)


def test_a_long_caption_is_cut_to_the_grid():
    grid = caption(torch.zeros(3, 30, 60, dtype=torch.uint8), "samples: the fitted 'a_very_long_sampler_name' sampler")
    assert grid.shape == (3, 30 + LABEL_HEIGHT, 60) and grid.dtype == torch.uint8
    assert int((grid[:, :LABEL_HEIGHT] < 128).any(0)[:, -2:].sum()) == 0  # nothing drawn past the right edge
