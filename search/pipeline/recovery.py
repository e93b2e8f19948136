"""Recovery of a pruned model: adaptive batch-norm, short fine-tuning, and keeping the better model.

After pruning, a trial's model goes through three steps, all on the *training* data:

1. **Adaptive batch-norm** (EagleEye, ECCV 2020): BatchNorm running statistics are re-estimated
   on ``bn_batches`` training batches. Pruning changes the distribution each BatchNorm sees, so
   the stored statistics are stale; re-estimating them costs a few forward passes and is what
   makes a pruned model's error a usable score.
2. **Fine-tuning** for ``steps`` batches (AdamW with linear warm-up and cosine decay by default,
   optionally distilled from the dense model's outputs). N:M masks are re-applied after each step.
3. **Keep the better**: the raw, the BN-adapted and the fine-tuned models are compared on a
   held-out slice of the training data (``holdout_batches`` batches, never trained on, never the
   validation data that scores the trial); the best one is kept, so recovery never makes a model
   worse on data it has not seen.

Everything is a function of ``seed`` (and the thread count): the held-out slice, the order of the
training batches, the batches BatchNorm is adapted on and any randomness in the model. A stored
trial therefore re-materialises bit-identically in another process.

How the seed reaches the training data (see ``training_split``):

* a ``torch.utils.data.DataLoader`` over a map-style dataset is re-ordered by hwprune itself (its
  own ``shuffle``, sampler and ``generator`` are not used);
* a sequence of batches (a list or tuple) is re-ordered batch by batch;
* any other iterable is read in its own order; it takes the seed if it has a
  ``reseed(seed: int, epoch: int)`` method (called before each pass, see ``search.pipeline.bundle.Reseedable``)
  or a ``torch.Generator`` at ``.generator`` (re-seeded once).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, IterableDataset

from search.config import RecoverySettings, cpu_count
from search.errors import ModelLoadError
from search.pipeline.bundle import Batch, ModelBundle, Reseedable
from search.pipeline.device import CPU, ModelDevice, teacher_on, to_device, torch_threads
from search.pipeline.inputs import primary, run

logger = logging.getLogger(__name__)

Kept = Literal["raw", "bn", "finetuned"]
# The softmax temperature of distillation (``RecoverySettings.distill``): fixed, as it always was.
DISTILL_TEMPERATURE = 4.0


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What one recovery did and what it cost.

    ``holdout_error`` holds the held-out error of every candidate that was compared, keyed like
    ``kept``; empty when nothing was held out.
    """

    model: nn.Module
    kept: Kept
    bn_s: float
    finetune_s: float
    holdout_s: float
    holdout_error: Mapping[str, float]

    def to_dict(self) -> dict[str, object]:
        return {"kept": self.kept, "bn_s": self.bn_s, "finetune_s": self.finetune_s,
                "holdout_s": self.holdout_s, "holdout_error": dict(self.holdout_error)}


# --- training data: a held-out slice and a seeded order ------------------------------------------


@dataclass(frozen=True, slots=True)
class TrainingSplit:
    """The held-out batches and a function giving the training batches of each pass."""

    holdout: list[Batch]
    passes: _Passes

    def batches(self) -> Iterator[Batch]:
        """Training batches, pass after pass, for ever (each pass in its own seeded order)."""
        epoch = 0
        while True:
            empty = True
            for batch in self.passes.epoch(epoch):
                empty = False
                yield batch
            if empty:
                raise ModelLoadError("the training loader yielded no batches besides the held-out ones; "
                                 "give it more data or set recovery.holdout_batches: 0")
            epoch += 1


class _Passes:
    def epoch(self, epoch: int) -> Iterable[Batch]:
        raise NotImplementedError


def _order(count: int, seed: int, epoch: int) -> list[int]:
    # One generator per (seed, epoch): pass k's order does not depend on how far pass k-1 was read.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [int(i) for i in torch.randperm(count, generator=generator)]


class _DatasetPasses(_Passes):
    def __init__(self, loader: DataLoader[Batch], indices: Sequence[int], seed: int) -> None:
        self.loader, self.indices, self.seed = loader, indices, seed

    def epoch(self, epoch: int) -> Iterable[Batch]:
        order = [self.indices[i] for i in _order(len(self.indices), self.seed, epoch + 1)]
        return _like(self.loader, order)


class _SequencePasses(_Passes):
    def __init__(self, batches: Sequence[Batch], seed: int) -> None:
        self.batches, self.seed = batches, seed

    def epoch(self, epoch: int) -> Iterable[Batch]:
        return [self.batches[i] for i in _order(len(self.batches), self.seed, epoch + 1)]


class _StreamPasses(_Passes):
    def __init__(self, loader: Iterable[Batch], skip: int, seed: int) -> None:
        self.loader, self.skip, self.seed = loader, skip, seed

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if isinstance(self.loader, Reseedable):
            self.loader.reseed(self.seed, epoch)
        for index, batch in enumerate(self.loader):
            if index >= self.skip:
                yield batch


def _like(loader: DataLoader[Batch], order: Sequence[int]) -> DataLoader[Batch]:
    """A loader like ``loader`` that reads its dataset in ``order``."""
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=order,
                      collate_fn=loader.collate_fn, drop_last=loader.drop_last,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                      worker_init_fn=loader.worker_init_fn)


def training_split(loader: Iterable[Batch], *, holdout_batches: int, seed: int) -> TrainingSplit:
    """Split the training data into a held-out slice and seeded training passes.

    A map-style ``DataLoader`` holds out ``holdout_batches * batch_size`` samples chosen by the
    seed; a sequence of batches holds out that many batches chosen by the seed; any other iterable
    holds out the first ``holdout_batches`` batches of every pass (see the module docstring).
    """
    if (isinstance(loader, DataLoader) and loader.batch_size is not None
            and not isinstance(loader.dataset, IterableDataset)):
        size = len(loader.dataset)  # type: ignore[arg-type]
        order = _order(size, seed, 0)
        cut = min(holdout_batches * loader.batch_size, size // 2)
        holdout = list(_like(loader, order[:cut])) if cut else []
        return TrainingSplit(holdout, _DatasetPasses(loader, order[cut:], seed))
    if isinstance(loader, Sequence):
        order = _order(len(loader), seed, 0)
        cut = min(holdout_batches, len(loader) // 2)
        return TrainingSplit([loader[i] for i in order[:cut]],
                             _SequencePasses([loader[i] for i in order[cut:]], seed))
    if isinstance(loader, Reseedable):
        loader.reseed(seed, 0)
    else:
        generator = getattr(loader, "generator", None)
        if isinstance(generator, torch.Generator):
            generator.manual_seed(seed)
    holdout = []
    for batch in loader:
        if len(holdout) >= holdout_batches:
            break
        holdout.append(batch)
    return TrainingSplit(holdout, _StreamPasses(loader, len(holdout), seed))


# --- the three steps -----------------------------------------------------------------------------


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) and m.track_running_stats for m in model.modules())


def adapt_batchnorm(model: nn.Module, batches: Iterable[Batch], *, count: int, device: ModelDevice = CPU) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``count`` batches, in place.

    Only ``running_mean`` and ``running_var`` change: weights, biases, momentum and
    ``num_batches_tracked`` are restored, and every other module runs in eval mode (dropout off).
    Returns the number of batches used. The model (already on ``device``) is left in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    model.eval()
    if not norms or count <= 0:
        return 0
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches, not an exponential one
        norm.train()
    used = 0
    try:
        with torch.no_grad(), device.work():
            for inputs, _ in batches:
                run(model, to_device(inputs, device.torch))
                used += 1
                if used >= count:
                    break
    finally:
        for norm, (momentum, tracked) in zip(norms, saved, strict=True):
            norm.momentum = momentum
            if tracked is not None and norm.num_batches_tracked is not None:
                norm.num_batches_tracked.copy_(tracked)
            norm.eval()
    return used


def _loss(outputs: torch.Tensor, targets: torch.Tensor, teacher_outputs: torch.Tensor | None,
          bundle: ModelBundle, config: RecoverySettings) -> torch.Tensor:
    loss = bundle.loss_fn(outputs, targets)
    if teacher_outputs is None:
        return loss
    temperature = DISTILL_TEMPERATURE
    kd = F.kl_div(F.log_softmax(outputs / temperature, dim=1), F.softmax(teacher_outputs / temperature, dim=1),
                  reduction="batchmean") * temperature**2
    return (1 - config.distill) * loss + config.distill * kd


def _schedule(step: int, config: RecoverySettings) -> float:
    if config.version == 1:
        return 1.0  # version 1 trained at a constant rate
    warm = max(1, round(config.warmup * config.steps)) if config.warmup > 0 else 0
    if step < warm:
        return (step + 1) / (warm + 1)
    progress = (step - warm) / max(1, config.steps - warm)
    return 0.5 * (1 + math.cos(math.pi * progress))


def fine_tune(
    model: nn.Module,
    bundle: ModelBundle,
    batches: Iterator[Batch],
    config: RecoverySettings,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    device: ModelDevice = CPU,
) -> nn.Module:
    """Train ``model`` (already on ``device``) in place for ``config.steps`` batches; returns it in
    eval mode. Each step holds the device for model work (``ModelDevice.work``), so a measurement
    on the same device waits for the step in flight and the next step waits for it."""
    modules = dict(model.named_modules())
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=0.9, weight_decay=1e-4)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=1e-4)
    teacher = teacher_on(bundle.model, device).eval() if config.distill > 0 else None
    model.train()
    if config.batchnorm == "frozen":
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.eval()  # normalise by the running statistics, and leave them unchanged
    for step in range(config.steps):
        inputs, targets = to_device(next(batches), device.torch)
        with device.work():
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _schedule(step, config)
            optimizer.zero_grad(set_to_none=True)
            outputs = primary(run(model, inputs))
            teacher_outputs = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_outputs = primary(run(teacher, inputs))
            _loss(outputs, targets, teacher_outputs, bundle, config).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            if masks:
                with torch.no_grad():
                    for name, mask in masks.items():
                        modules[name].weight.mul_(mask.to(device.torch))  # type: ignore[operator]
    return model.eval()


def holdout_score(model: nn.Module, bundle: ModelBundle, holdout: Sequence[Batch],
                  device: ModelDevice = CPU) -> tuple[float, float]:
    """(error, mean loss) on the held-out training batches (already on the model's device): the
    bundle's error function decides, the loss breaks ties (a small slice often gives two models
    the same error)."""
    model.eval()
    with device.work():
        error = float(bundle.error_fn(model, holdout))
    total, count = 0.0, 0
    with torch.no_grad(), device.work():
        for inputs, targets in holdout:
            total += float(bundle.loss_fn(primary(run(model, inputs)), targets)) * len(targets)
            count += len(targets)
    return error, total / max(count, 1)


# --- recovery of one trial -----------------------------------------------------------------------


def recover(
    model: nn.Module,
    bundle: ModelBundle,
    config: RecoverySettings,
    *,
    seed: int = 0,
    masks: Mapping[str, torch.Tensor] | None = None,
    device: ModelDevice = CPU,
) -> nn.Module:
    """Recover ``model`` in place (see the module docstring) and return it in eval mode."""
    return recover_with_report(model, bundle, config, seed=seed, masks=masks, device=device).model


def recover_with_report(
    model: nn.Module,
    bundle: ModelBundle,
    config: RecoverySettings,
    *,
    seed: int = 0,
    masks: Mapping[str, torch.Tensor] | None = None,
    before_finetune: Callable[[float], None] | None = None,
    device: ModelDevice = CPU,
) -> RecoveryReport:
    """Like ``recover``, and say which model was kept and what each step cost.

    ``model`` must already be on ``device`` (``search.pipeline.device.move_model``); batches are
    moved there as they are read, and every piece of model work holds the device (see
    ``ModelDevice.work``).

    ``before_finetune`` is called with the held-out error of the model about to be fine-tuned
    (after adaptive batch-norm, else as pruned) when there is a held-out slice and steps to run;
    an exception it raises stops the recovery there (a search prunes hopeless trials this way).
    The returned ``report.model`` is ``model`` itself, holding the kept weights. ``seed`` seeds
    the held-out slice, the batch order and torch's generator.
    """
    with torch_threads(config.threads or cpu_count()):  # for bit-identical replays
        return _recover(model, bundle, config, seed, masks, before_finetune, device)


def _recover(
    model: nn.Module,
    bundle: ModelBundle,
    config: RecoverySettings,
    seed: int,
    masks: Mapping[str, torch.Tensor] | None,
    before_finetune: Callable[[float], None] | None = None,
    device: ModelDevice = CPU,
) -> RecoveryReport:
    model.eval()
    if config.version == 1:
        return _recover_version_1(model, bundle, config, seed, masks, device)
    adapt = config.bn_batches > 0 and has_batchnorm(model)
    if not adapt and config.steps <= 0:
        return RecoveryReport(model, "raw", 0.0, 0.0, 0.0, {})
    torch.manual_seed(seed)
    split = training_split(bundle.train_loader, holdout_batches=config.holdout_batches, seed=seed)
    holdout = to_device(split.holdout, device.torch)
    scores: dict[Kept, tuple[float, float]] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    holdout_s = 0.0

    def judge(name: Kept) -> None:
        nonlocal holdout_s
        if not holdout:
            return
        started = time.perf_counter()
        scores[name] = holdout_score(model, bundle, holdout, device)
        holdout_s += time.perf_counter() - started

    def snapshot(name: Kept) -> None:
        if holdout:
            states[name] = copy.deepcopy(model.state_dict())

    judge("raw")
    snapshot("raw")
    bn_s = 0.0
    if adapt:
        started = time.perf_counter()
        adapt_batchnorm(model, split.batches(), count=config.bn_batches, device=device)
        bn_s = time.perf_counter() - started
        judge("bn")
        snapshot("bn")
    finetune_s = 0.0
    if config.steps > 0 and before_finetune is not None and scores:
        before_finetune(scores["bn" if adapt else "raw"][0])
    if config.steps > 0:
        started = time.perf_counter()
        fine_tune(model, bundle, split.batches(), config, masks=masks, device=device)
        finetune_s = time.perf_counter() - started
        if adapt:
            # Training moved the weights under statistics averaged with momentum over a few
            # batches; statistics of the final weights score it fairly.
            started = time.perf_counter()
            adapt_batchnorm(model, split.batches(), count=config.bn_batches, device=device)
            bn_s += time.perf_counter() - started
        judge("finetuned")
    last: Kept = "finetuned" if config.steps > 0 else "bn"
    kept = last
    if scores:
        # Lowest held-out (error, loss); min() keeps the first of exact ties, the least trained.
        kept = min(scores, key=lambda name: scores[name])
        if kept != last:
            model.load_state_dict(states[kept])
    report = RecoveryReport(model.eval(), kept, bn_s, finetune_s, holdout_s,
                            {str(name): score[0] for name, score in scores.items()})
    logger.info("recovery kept %s (held-out error %s); adaptive BN %.2f s, fine-tuning %.2f s, "
                "held-out scoring %.2f s", kept, report.holdout_error, bn_s, finetune_s, holdout_s)
    return report


def _recover_version_1(
    model: nn.Module,
    bundle: ModelBundle,
    config: RecoverySettings,
    seed: int,
    masks: Mapping[str, torch.Tensor] | None,
    device: ModelDevice = CPU,
) -> RecoveryReport:
    """hwprune's first recovery, step for step, so that searches stored with it replay."""
    if config.steps <= 0:
        return RecoveryReport(model, "raw", 0.0, 0.0, 0.0, {})
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = getattr(bundle.train_loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(seed)
    fine_tune(model, bundle, _loader_order(bundle.train_loader), config.model_copy(update={"optimizer": "sgd"}),
              masks=masks, device=device)
    return RecoveryReport(model.eval(), "finetuned", 0.0, time.perf_counter() - started, 0.0, {})


def _loader_order(loader: Iterable[Batch]) -> Iterator[Batch]:
    # Re-iterating (not itertools.cycle) reshuffles each epoch as the loader itself does.
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ModelLoadError("the training loader yielded no batches; recovery needs training data")
