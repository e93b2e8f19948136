"""Short recovery fine-tuning of a pruned model, optionally distilled from the base model."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from search.bundle import Batch, ModelBundle
from search.config import SearchConfig


@dataclass(frozen=True, slots=True)
class RecoveryConfig:
    """Steps of SGD with momentum; ``distill`` mixes in KL to the base model's outputs."""

    steps: int = 0
    lr: float = 0.01
    distill: float = 0.0
    temperature: float = 4.0
    seed: int = 0
    threads: int = 1


def recovery_for(config: SearchConfig) -> RecoveryConfig:
    """The recovery a search's trials use (seeded by the search's seed)."""
    settings = config.recovery
    return RecoveryConfig(steps=settings.steps, lr=settings.lr, distill=settings.distill,
                          seed=config.seed, threads=settings.threads)


def _forever(loader: Iterable[Batch]) -> Iterator[Batch]:
    # Re-iterating (not itertools.cycle) reshuffles each epoch and holds no batch in memory.
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training loader yielded no batches")


def recover(
    model: nn.Module,
    bundle: ModelBundle,
    config: RecoveryConfig,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Fine-tune ``model`` in place for ``config.steps`` batches and return it in eval mode.

    N:M ``masks`` are re-applied after every step so that sparse layers stay exactly sparse.
    Deterministic for a fixed seed and thread count (the loader's shuffling is reseeded too where
    it has a generator): a stored trial re-materialises bit-identically in another process.
    """
    if config.steps <= 0:
        return model.eval()
    previous_threads = torch.get_num_threads()
    # Float reductions split differently across thread counts; fix it for bit-identical replays.
    torch.set_num_threads(config.threads)
    try:
        return _train(model, bundle, config, masks)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    model: nn.Module,
    bundle: ModelBundle,
    config: RecoveryConfig,
    masks: Mapping[str, torch.Tensor] | None,
) -> nn.Module:
    torch.manual_seed(config.seed)
    generator = getattr(bundle.train_loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(config.seed)
    teacher = bundle.model.eval() if config.distill > 0 else None
    modules = dict(model.named_modules())
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    batches = _forever(bundle.train_loader)
    for _ in range(config.steps):
        inputs, targets = next(batches)
        optimizer.zero_grad(set_to_none=True)
        outputs = model(inputs)
        loss = bundle.loss_fn(outputs, targets)
        if teacher is not None:
            with torch.no_grad():
                soft = F.softmax(teacher(inputs) / config.temperature, dim=1)
            kd = F.kl_div(F.log_softmax(outputs / config.temperature, dim=1), soft,
                          reduction="batchmean") * config.temperature**2
            loss = (1 - config.distill) * loss + config.distill * kd
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        if masks:
            with torch.no_grad():
                for name, mask in masks.items():
                    modules[name].weight.mul_(mask)  # type: ignore[operator]
    return model.eval()
