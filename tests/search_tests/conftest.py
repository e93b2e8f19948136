"""Fixtures over the reference architectures of ``search.examples.zoo``: residual, depthwise, attention."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from search.examples.zoo import make_architecture

TEST_ARCHITECTURES = ("mobilenetv2", "resnet18", "transformer")


@pytest.fixture(params=TEST_ARCHITECTURES)
def architecture(request: pytest.FixtureRequest) -> tuple[str, nn.Module, torch.Tensor]:
    model, example = make_architecture(request.param)
    return request.param, model, example


@pytest.fixture
def build_architecture() -> Callable[[str, int], tuple[nn.Module, torch.Tensor]]:
    return lambda name, seed: make_architecture(name, seed=seed)
