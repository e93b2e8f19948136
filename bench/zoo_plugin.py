"""Model plugins over the zoo's reference architectures at 224x224, for benchmarks.

No labels exist for these randomly initialised models, so the error is fidelity to the dense
model (``search.pipeline.bundle.fidelity_error``: 1 - cosine similarity of the outputs) and recovery
distils the dense outputs (the training targets are the dense model's outputs, the loss their
mean squared error). The inputs are seeded noise. Use as ``--model zoo_plugin:resnet18_224`` with
``bench/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from search.examples.zoo import make_architecture
from search.pipeline.bundle import ModelBundle, fidelity_error


def _bundle(name: str, architecture: str, *, samples: int = 32, batch: int = 8) -> ModelBundle:
    model, example = make_architecture(architecture, resolution=224)
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(2 * samples, *example.shape[1:], generator=generator)
    with torch.no_grad():
        dense = model(inputs)
    train = DataLoader(TensorDataset(inputs[:samples], dense[:samples]), batch_size=batch, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(inputs[samples:], dense[samples:]), batch_size=batch)
    return ModelBundle(name=name, model=model, example_input=example, train_loader=train, val_loader=val,
                       error_fn=fidelity_error(model), loss_fn=nn.functional.mse_loss)


def resnet18_224() -> ModelBundle:
    """ResNet-18 (full width, 11.7M parameters) at 224x224."""
    return _bundle("resnet18-224", "resnet18-full")


def mobilenetv2_224() -> ModelBundle:
    """The zoo's shortened MobileNetV2 at 224x224."""
    return _bundle("mobilenetv2-224", "mobilenetv2")
