"""Built-in example models, trained once on data that ships inside a package, then cached.

``digits``: a small residual CNN on scikit-learn's 8x8 handwritten digits (1,797 images, shipped
with scikit-learn), upsampled to 16x16 so that layer latencies are well above timer noise.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import search.progress as progress
from search.pipeline.bundle import ModelBundle, classification_error

logger = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class Recipe:
    """How the digits model is built and trained; every field keys the cache."""

    version: int = 1  # bump when the architecture or the training code changes
    widths: tuple[int, ...] = (32, 64, 128)
    epochs: int = 12
    lr: float = 3e-3
    seed: int = 0
    batch: int = 64
    size: int = 16


DIGITS_RECIPE = Recipe()


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        result: torch.Tensor = F.relu(x + self.bn2(self.conv2(out)))
        return result


class DigitsNet(nn.Module):
    """Stem, then per stage a residual block; stages halve the resolution and double width."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages: list[nn.Module] = []
        previous = widths[0]
        for index, width in enumerate(widths):
            layers: list[nn.Module] = []
            if index > 0:
                layers += [
                    nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                ]
            layers.append(ResidualBlock(width))
            stages.append(nn.Sequential(*layers))
            previous = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(previous, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        logits: torch.Tensor = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return logits


def digits_tensors(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    labels = torch.tensor(data.target, dtype=torch.long)
    # A fixed 80/20 split, the same on every machine.
    order = torch.tensor(np.random.default_rng(0).permutation(len(labels)))
    cut = int(0.8 * len(labels))
    train, val = order[:cut], order[cut:]
    return images[train], labels[train], images[val], labels[val]


def _cache_key(recipe: str, images: torch.Tensor) -> str:
    digest = hashlib.sha256(recipe.encode())
    digest.update(images.numpy().tobytes())
    digest.update(torch.__version__.split("+")[0].encode())
    return digest.hexdigest()[:16]


def _train(name: str, model: nn.Module, loader: DataLoader[tuple[torch.Tensor, ...]], epochs: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * len(loader)
    )
    model.train()
    with progress.task(f"training the {name} example (once; then cached)", total=epochs) as advance:
        for epoch in range(epochs):
            for inputs, targets in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(inputs), targets).backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                schedule.step()
            logger.info("%s: epoch %d/%d", name, epoch + 1, epochs)
            advance(1)
    model.eval()


def cached_training(name: str, model: nn.Module, loader: DataLoader[tuple[torch.Tensor, ...]], *,
                    recipe: str, data: torch.Tensor, epochs: int, lr: float, cache_dir: Path) -> None:
    """Load ``model``'s trained weights from the cache, or train it once and cache them.

    The cache key covers the recipe, the training data and torch's version. Leaves ``model`` in
    eval mode.
    """
    path = cache_dir / "examples" / f"{name}-{_cache_key(recipe, data)}.pt"
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
        except Exception as exc:
            logger.warning("ignoring unreadable cached %s model %s: %s", name, path, exc)
            path.unlink(missing_ok=True)
    if not path.is_file():
        logger.warning("training the %s example once; cached at %s", name, path)
        _train(name, model, loader, epochs, lr)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        torch.save(model.state_dict(), partial)
        partial.replace(path)
    model.eval()


class TrainingRecipe(Protocol):
    """What ``trained_bundle`` reads of an example's recipe."""

    @property
    def seed(self) -> int: ...
    @property
    def batch(self) -> int: ...
    @property
    def widths(self) -> tuple[int, ...]: ...
    @property
    def epochs(self) -> int: ...
    @property
    def lr(self) -> float: ...


def trained_bundle(name: str, recipe: TrainingRecipe,
                   tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], *,
                   cache_dir: Path) -> ModelBundle:
    """A ``DigitsNet`` example from its ``(x_train, y_train, x_val, y_val)``: trained once, cached."""
    x_train, y_train, x_val, y_val = tensors
    generator = torch.Generator().manual_seed(recipe.seed)
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=recipe.batch, shuffle=True,
                              generator=generator)
    val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=256)
    torch.manual_seed(recipe.seed)
    model = DigitsNet(recipe.widths)
    cached_training(name, model, train_loader, recipe=repr(recipe), data=x_train, epochs=recipe.epochs,
                    lr=recipe.lr, cache_dir=cache_dir)
    return ModelBundle(
        name=name,
        model=model,
        example_input=x_val[:1].clone(),
        train_loader=train_loader,
        val_loader=val_loader,
        error_fn=classification_error,
    )


def digits(*, cache_dir: Path) -> ModelBundle:
    """The ``digits`` example: trained on first use (about half a minute on 2 cores), then cached."""
    return trained_bundle("digits", DIGITS_RECIPE, digits_tensors(DIGITS_RECIPE.size), cache_dir=cache_dir)
