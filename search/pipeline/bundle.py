"""The base model bundle: what a user hands hwprune, from a plugin or a built-in example."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from search.errors import ModelLoadError
from search.pipeline.inputs import ModelInput, primary, run, shapes

# Inputs may be a tensor, a tuple of tensors or a mapping of named tensors (``input_ids``,
# ``attention_mask``, ...); the targets are one tensor.
Batch = tuple[ModelInput, torch.Tensor]
ErrorFn = Callable[[nn.Module, Iterable[Batch]], float]


@runtime_checkable
class Reseedable(Protocol):
    """A loader that takes the search's seed: how a plugin's own iterable follows ``--seed``.

    hwprune re-orders a ``DataLoader`` over a map-style dataset and a list of batches itself; any
    other iterable (a stream, an ``IterableDataset``) keeps its own order unless it has this
    method. hwprune calls ``reseed(seed, epoch)`` before each pass over the training loader (and
    before scoring over the validation loader, with ``epoch`` 0); the loader should make that
    pass's order (and any augmentation) a function of the two numbers.
    """

    def reseed(self, seed: int, epoch: int) -> None: ...


@dataclass(frozen=True)
class ModelBundle:
    """A trained model and everything needed to prune, recover and score it.

    Attributes:
        name: a short label for reports.
        model: the trained ``nn.Module`` (never modified by hwprune: plans apply to copies).
        example_input: one input batch (batch size 1) with the deployed shape: a tensor, a tuple
            of tensors (passed positionally) or a mapping of named tensors (passed by keyword,
            exported as ONNX inputs of those names). Exports make the batch axis dynamic (and
            the sequence axis of integer ``[batch, sequence]`` inputs) and are measured at the
            profile's ``batch_size`` and ``dim_values`` (else the example's own sizes).
        train_loader: batches ``(inputs, targets)`` for recovery fine-tuning and calibration.
        val_loader: batches for the error function.
        error_fn: ``error_fn(model, val_loader) -> error`` in [0, 1] (lower is better).
        loss_fn: training loss on ``(outputs, targets)``; cross-entropy by default. ``outputs``
            is the model's tensor, or its ``logits`` (else first tensor) when it returns a
            ``ModelOutput``, tuple or dict.
        ignored_layers: qualified module names never pruned, beyond the output layer.
        error_name: what ``error_fn`` measures, for tables and reports (e.g. "1 - top-1
            agreement with the dense model" where there are no labels).
    """

    name: str
    model: nn.Module
    example_input: ModelInput
    train_loader: Iterable[Batch]
    val_loader: Iterable[Batch]
    error_fn: ErrorFn
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(
        default=nn.functional.cross_entropy
    )
    ignored_layers: tuple[str, ...] = ()
    error_name: str = "error"

    def fingerprint(self) -> str:
        """sha256 over the architecture, every parameter and buffer, and the input shape.

        Used to refuse re-materialising a stored plan on a base model that has changed.
        """
        digest = hashlib.sha256()
        digest.update(repr(self.model).encode())
        digest.update(repr(_shape_key(self.example_input)).encode())
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


def _shape_key(example: ModelInput) -> object:
    # A single tensor keeps its old key, so fingerprints of stored searches stay valid.
    return tuple(example.shape) if isinstance(example, torch.Tensor) else shapes(example)


def classification_error(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Top-1 error of a classifier over ``batches``."""
    model.eval()
    wrong = total = 0
    with torch.no_grad():
        for inputs, targets in batches:
            predictions = primary(run(model, inputs)).argmax(dim=1)
            wrong += int((predictions != targets).sum())
            total += int(targets.numel())
    if total == 0:
        raise ModelLoadError("the validation loader yielded no samples")
    return wrong / total


def seeded_error(bundle: ModelBundle, model: nn.Module, seed: int) -> float:
    """``bundle.error_fn`` on the validation loader with every source of sampling seeded.

    torch's generator, a ``Reseedable`` loader and a loader's ``torch.Generator`` (e.g. a
    shuffling ``DataLoader``) take ``seed``, so an error function that samples (a random subset,
    test-time augmentation) gives the same figure for the same seed.
    """
    torch.manual_seed(seed)
    loader = bundle.val_loader
    if isinstance(loader, Reseedable):
        loader.reseed(seed, 0)
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
    return float(bundle.error_fn(model, loader))


def fidelity_error(reference: nn.Module) -> ErrorFn:
    """An error function for models without labels: 1 - the mean cosine similarity between the
    model's outputs and ``reference``'s (the dense model) on the same inputs, in [0, 1].

    The dense model scores 0 by definition; the reward's default error floor (base error + 0.01)
    keeps it from winning on that alone. Targets in the batches are ignored.
    """
    reference = reference.eval()

    def error(model: nn.Module, batches: Iterable[Batch]) -> float:
        model.eval()
        total = similarity = 0.0
        with torch.no_grad():
            for inputs, _targets in batches:
                ours = primary(run(model, inputs)).flatten(1).double()
                theirs = primary(run(reference, inputs)).flatten(1).double()
                similarity += float(nn.functional.cosine_similarity(ours, theirs, dim=1).sum())
                total += ours.shape[0]
        if total == 0:
            raise ModelLoadError("the validation loader yielded no samples")
        error = 1.0 - similarity / total
        # Rounding leaves identical outputs a hair off a cosine of 1: that is no error.
        return 0.0 if error < 1e-9 else min(1.0, error)

    return error
