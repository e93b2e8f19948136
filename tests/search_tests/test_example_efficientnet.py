"""The pretrained built-in example: real weights, real photographs, agreement with the dense model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("efficientnet_lite_pytorch", reason="the examples extra: make test installs it")
pytest.importorskip("skimage", reason="the examples extra: make test installs it")

from search.errors import ModelLoadError  # noqa: E402
from search.examples import EXAMPLES, load_bundle  # noqa: E402
from search.examples.efficientnet_lite import (  # noqa: E402
    _MEAN,
    _STD,
    NAME,
    RECIPE,
    TRAIN_PHOTOS,
    VAL_PHOTOS,
    efficientnet_lite0,
    load_pretrained,
    photographs,
)
from search.pipeline.pruning import apply_pruning, discover  # noqa: E402

SMALL = replace(RECIPE, resolution=64, train_crops=48, val_crops=32, batch=16)
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
IMAGENET_CUPS = (967, 968, 504)  # espresso, cup, coffee mug


def _centre(image: torch.Tensor, size: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[..., top:top + side, left:left + side][None].float() / 255
    square = F.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (square - torch.tensor(_MEAN).view(1, 3, 1, 1)) / torch.tensor(_STD).view(1, 3, 1, 1)


def test_the_pretrained_model_labels_the_photographs_sensibly() -> None:
    model = load_pretrained(224)
    cat, coffee = (torch.from_numpy(p).permute(2, 0, 1) for p in photographs(["chelsea", "coffee"]))
    with torch.no_grad():
        labels = model(torch.cat([_centre(cat, 224), _centre(coffee, 224)])).argmax(dim=1).tolist()
    assert labels[0] in IMAGENET_CATS
    assert labels[1] in IMAGENET_CUPS


def test_bundle_scores_agreement_on_disjoint_photographs(tmp_path: Path) -> None:
    assert NAME in EXAMPLES
    assert not set(TRAIN_PHOTOS) & set(VAL_PHOTOS)
    bundle = efficientnet_lite0(cache_dir=tmp_path, recipe=SMALL)
    assert "agreement" in bundle.names()[0] and bundle.names()[1] == "top-1 agreement"
    assert bundle.error_fn(bundle.model, bundle.val_loader) == 0.0  # the dense model agrees with itself
    x_val, y_val = bundle.val_loader.dataset.tensors  # type: ignore[attr-defined]
    assert x_val.shape == (32, 3, 64, 64) and y_val.shape == (32, 1000)
    # The crops and the teacher's logits are a function of the recipe: a second build (from the
    # cached logits) gives the same tensors.
    again = efficientnet_lite0(cache_dir=tmp_path, recipe=SMALL)
    x_again, y_again = again.val_loader.dataset.tensors  # type: ignore[attr-defined]
    assert torch.equal(x_val, x_again) and torch.equal(y_val, y_again)
    # The loss distils the teacher's logits: zero at the teacher, positive elsewhere.
    assert float(bundle.loss_fn(y_val, y_val)) == pytest.approx(0.0, abs=1e-6)
    assert float(bundle.loss_fn(torch.zeros_like(y_val), y_val)) > 0


def test_pruning_it_changes_its_answers(tmp_path: Path) -> None:
    bundle = efficientnet_lite0(cache_dir=tmp_path, recipe=SMALL)
    found = discover(bundle.model, bundle.example_input)
    assert len(found.groups) > 10
    kept = {g.name: max(1, g.size // 2) for g in found.groups}
    pruned = apply_pruning(bundle.model, bundle.example_input, kept=kept, groups=found.groups, patterns={})
    assert pruned.macs < 0.6 * found.macs
    assert bundle.error_fn(pruned.model, bundle.val_loader) > 0.2


def test_resolution_is_part_of_the_name(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="whole number from 32 to 512"):
        load_bundle(f"{NAME}@huge", cache_dir=tmp_path)
