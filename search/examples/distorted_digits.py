"""``digits-distorted``: scikit-learn's digits made hard enough to tell pruning methods apart.

Plain ``digits`` recovers from almost any pruning (a few fine-tuning steps bring every plan back
to ~98%), so a search cannot beat a uniform width there. Here every image is drawn several times
through a seeded random affine distortion (rotation, scale, shear, shift), blurred or sharpened,
partly occluded by a blank patch, and given Gaussian pixel noise, at 16x16. Nothing is downloaded:
the 1,797 source images ship with scikit-learn and the distortions are generated from a fixed
seed, so the data are bit-identical on every machine with the same torch.

Why it is hard enough (measured, see docs/benchmarks.md "Built-in examples"): the dense model is
well below 100% accurate, and halving every group's width loses several points even after the
default per-trial recovery, so which layers keep their width matters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from search.examples.digits import trained_bundle
from search.pipeline.bundle import ModelBundle

logger = logging.getLogger(__name__)

NAME = "digits-distorted"


@dataclass(frozen=True, slots=True)
class DistortionRecipe:
    """How the data are generated and the model trained; every field keys the cache."""

    version: int = 1  # bump when the generator, the architecture or the training changes
    size: int = 16
    copies: int = 4  # distorted draws of each source image
    rotation_deg: float = 30.0
    scale: tuple[float, float] = (0.75, 1.2)
    shear: float = 0.3
    shift: float = 0.22  # of the half-width
    noise: float = 0.45  # Gaussian pixel noise, in units of the normalised image
    occlusion: float = 0.35  # side of the blank patch, as a share of the image
    widths: tuple[int, ...] = (32, 64, 128)
    epochs: int = 8
    lr: float = 3e-3
    seed: int = 0
    batch: int = 64


RECIPE = DistortionRecipe()


def _distort(images: torch.Tensor, recipe: DistortionRecipe, rng: np.random.Generator) -> torch.Tensor:
    count = images.shape[0]
    angle = np.deg2rad(rng.uniform(-recipe.rotation_deg, recipe.rotation_deg, count))
    scale = rng.uniform(*recipe.scale, count)
    shear = rng.uniform(-recipe.shear, recipe.shear, count)
    shift = rng.uniform(-recipe.shift, recipe.shift, (count, 2))
    theta = np.zeros((count, 2, 3), dtype=np.float32)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin + shear
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    theta[:, :, 2] = shift
    grid = F.affine_grid(torch.from_numpy(theta), [count, 1, recipe.size, recipe.size], align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # A blank patch at a random place hides part of each digit.
    side = max(1, int(recipe.occlusion * recipe.size))
    corners = rng.integers(0, recipe.size - side + 1, (count, 2))
    for index, (row, col) in enumerate(corners):
        out[index, :, row:row + side, col:col + side] = 0.0
    out = (out - 0.5) / 0.5
    out += torch.from_numpy(rng.normal(0.0, recipe.noise, out.shape).astype(np.float32))
    return out


Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def distorted_tensors(recipe: DistortionRecipe = RECIPE) -> Tensors:
    """Training and validation images and labels: the digits 80/20 split (the same as
    ``digits``), each source image drawn ``copies`` times through its own distortions."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(recipe.size, recipe.size), mode="bilinear", align_corners=False)
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.tensor(np.random.default_rng(0).permutation(len(labels)))
    cut = int(0.8 * len(labels))
    rng = np.random.default_rng(recipe.seed + 1)
    splits = []
    for part in (order[:cut], order[cut:]):
        source = images[part].repeat(recipe.copies, 1, 1, 1)
        splits += [_distort(source, recipe, rng), labels[part].repeat(recipe.copies)]
    return splits[0], splits[1], splits[2], splits[3]


def digits_distorted(*, cache_dir: Path) -> ModelBundle:
    """The ``digits-distorted`` example: trained on first use (about two minutes on 2 cores),
    then cached."""
    return trained_bundle(NAME, RECIPE, distorted_tensors(RECIPE), cache_dir=cache_dir)


__all__ = ["NAME", "RECIPE", "DistortionRecipe", "digits_distorted", "distorted_tensors"]
