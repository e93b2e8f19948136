"""A tiny model plugin (a 2-conv net on 8x8 noise) that tests and bench/faults.py copy in as a module."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from search.pipeline.bundle import ModelBundle, classification_error


def bundle() -> ModelBundle:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(2))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    return ModelBundle(name="tiny", model=model, example_input=x[:1], train_loader=loader,
                       val_loader=loader, error_fn=classification_error)
