"""Model inputs as users bring them: one tensor, a tuple of tensors, or a mapping of named tensors.

A Hugging Face model takes ``input_ids``, ``attention_mask`` and ``token_type_ids`` by name and
returns a ``ModelOutput``; a CNN takes one tensor and returns one. Everything that calls a model
(discovery, calibration, recovery, error functions, export) goes through ``run`` and ``primary``
so both work the same way.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import nn

ModelInput: TypeAlias = torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor]

BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"


def run(model: nn.Module, inputs: ModelInput) -> Any:
    """``model(inputs)``, ``model(*inputs)`` or ``model(**inputs)`` by the kind of ``inputs``."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def tensors(inputs: ModelInput) -> list[torch.Tensor]:
    """The input tensors in call order."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    return list(inputs)


def rebuild(inputs: ModelInput, new: Sequence[torch.Tensor]) -> ModelInput:
    """``inputs`` with its tensors replaced by ``new`` (same order and kind)."""
    if isinstance(inputs, torch.Tensor):
        return new[0]
    if isinstance(inputs, Mapping):
        return dict(zip(inputs.keys(), new, strict=True))
    return tuple(new)


def batched(inputs: ModelInput, batch_size: int) -> ModelInput:
    """Every tensor's first sample repeated ``batch_size`` times along the first dimension."""
    return rebuild(inputs, [t[:1].expand(batch_size, *t.shape[1:]).contiguous() for t in tensors(inputs)])


def concatenated(batches: Sequence[ModelInput]) -> ModelInput:
    """One input holding every sample of ``batches`` (which share a kind and sample shapes)."""
    columns = zip(*(tensors(b) for b in batches), strict=True)
    return rebuild(batches[0], [torch.cat(list(column)) for column in columns])


def shapes(inputs: ModelInput) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in tensors(inputs))


def ordered(model: nn.Module, inputs: ModelInput) -> tuple[list[str], ModelInput]:
    """Input names in the order the exporter lists them, and ``inputs`` in that order.

    A mapping is reordered by the parameters of ``model.forward`` (the exporter binds keyword
    arguments to the signature); a tensor is ``input``, a tuple ``input_0``, ``input_1``, ...
    """
    if isinstance(inputs, torch.Tensor):
        return ["input"], inputs
    if isinstance(inputs, Mapping):
        try:
            parameters = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            parameters = []
        rank = {name: index for index, name in enumerate(parameters)}
        names = sorted(inputs, key=lambda n: (rank.get(n, len(rank)), list(inputs).index(n)))
        return names, {name: inputs[name] for name in names}
    return [f"input_{i}" for i in range(len(inputs))], inputs


def dynamic_axes(names: Sequence[str], inputs: ModelInput) -> dict[str, dict[int, str]]:
    """Batch (axis 0) of every input dynamic; the sequence axis too for token inputs.

    Token inputs are integer tensors of shape ``[batch, sequence]`` (ids, masks, token types).
    """
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in zip(names, tensors(inputs), strict=True):
        if tensor.dim() == 0:
            continue
        axes[name] = {0: BATCH_AXIS}
        if tensor.dim() == 2 and not tensor.is_floating_point():
            axes[name][1] = SEQUENCE_AXIS
    return axes


def flat_outputs(output: Any) -> list[torch.Tensor]:
    """Every tensor a model returned, in order (``ModelOutput``, tuples and dicts flattened)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in flat_outputs(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in flat_outputs(value)]
    return []


def primary(output: Any) -> torch.Tensor:
    """The output a loss or an error is taken on: the tensor itself, else ``logits``, else the first.

    Raises:
        TypeError: the model returned no tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else None
    if isinstance(logits, torch.Tensor):
        return logits
    found = flat_outputs(output)
    if not found:
        raise TypeError(f"the model returned no tensor ({type(output).__name__})")
    return found[0]
