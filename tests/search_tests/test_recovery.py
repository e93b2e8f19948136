from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Literal

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from hardware_profiles import load_profile
from search.config import RecoverySettings, SearchConfig
from search.errors import ModelLoadError
from search.examples.zoo import make_architecture
from search.pipeline.bundle import Batch, ModelBundle, classification_error, seeded_error
from search.pipeline.inputs import tensors
from search.pipeline.recovery import (
    adapt_batchnorm,
    recover,
    recover_with_report,
    training_split,
)
from search.pipeline.space import SearchSpace, apply, build_space


def _space(bundle: ModelBundle) -> SearchSpace:
    return build_space(bundle.model, bundle.example_input, [load_profile("cpu-ort-fp32")])


def _list_bundle(bundle: ModelBundle, batches: int = 12) -> ModelBundle:
    """The digits bundle with a plain list of batches as its training loader, as a plugin may give."""
    data = [batch for _, batch in zip(range(batches), iter(bundle.train_loader), strict=False)]
    return ModelBundle(name="digits-list", model=bundle.model, example_input=bundle.example_input,
                       train_loader=data, val_loader=bundle.val_loader, error_fn=bundle.error_fn)


def test_adaptive_bn_changes_running_statistics_and_nothing_else(digits_bundle: ModelBundle) -> None:
    space = _space(digits_bundle)
    pruned = apply(digits_bundle.model, digits_bundle.example_input, space, space.uniform_plan(0.5))
    model = pruned.model
    before = copy.deepcopy(model.state_dict())
    momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    split = training_split(digits_bundle.train_loader, holdout_batches=2, seed=0)

    assert adapt_batchnorm(model, split.batches(), count=4) == 4

    after = model.state_dict()
    assert after.keys() == before.keys()
    statistics = {k for k in after if k.endswith(("running_mean", "running_var"))}
    assert statistics and all(not torch.equal(after[k], before[k]) for k in statistics)
    assert all(torch.equal(after[k], before[k]) for k in after.keys() - statistics)
    assert [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)] == momenta
    assert not any(m.training for m in model.modules())
    # The point of it: statistics of the pruned network, not the dense one's, rescue its error.
    raw = digits_bundle.error_fn(apply(digits_bundle.model, digits_bundle.example_input, space,
                                       space.uniform_plan(0.5)).model, digits_bundle.val_loader)
    assert digits_bundle.error_fn(model, digits_bundle.val_loader) < raw


def test_adaptive_bn_leaves_a_model_without_batchnorm_alone() -> None:
    model, example = make_architecture("transformer")
    before = copy.deepcopy(model.state_dict())
    batches = iter([(example, torch.zeros(1, dtype=torch.long))])
    assert adapt_batchnorm(model, batches, count=4) == 0
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_nearly_dense_plan_is_never_made_worse_by_recovery(digits_bundle: ModelBundle) -> None:
    bundle = digits_bundle
    space = _space(bundle)
    dense_error = bundle.error_fn(bundle.model, bundle.val_loader)
    default = SearchConfig(name="t", example="digits", recovery=RecoverySettings(steps=20)).recovery
    # The default recovery, the old default that blew up a nearly dense ResNet-18 in issue 16, and
    # a learning rate that wrecks any model.
    configs = (default, RecoverySettings(steps=5, optimizer="sgd", lr=0.01, warmup=0, bn_batches=8, holdout_batches=2),
               RecoverySettings(steps=20, optimizer="sgd", lr=5.0, warmup=0, bn_batches=8, holdout_batches=2))
    for ratio in (0.875, 0.75):
        plan = space.uniform_plan(ratio)
        raw = bundle.error_fn(apply(bundle.model, bundle.example_input, space, plan).model, bundle.val_loader)
        for config in configs:
            pruned = apply(bundle.model, bundle.example_input, space, plan)
            adapted = copy.deepcopy(pruned.model)
            adapt_batchnorm(adapted, training_split(bundle.train_loader, holdout_batches=2, seed=0).batches(),
                            count=8)
            report = recover_with_report(pruned.model, bundle, config, masks=pruned.masks)
            error = bundle.error_fn(pruned.model, bundle.val_loader)
            assert report.holdout_error[report.kept] <= min(report.holdout_error.values())
            # Not worse than before recovery, or than the dense model when the pruned one matched
            # it by luck (0.875 misses 1 of the 360 validation images, the dense model 2).
            assert error <= max(raw, dense_error), (ratio, config, report, error, raw)
            if config.lr == 5.0:
                # Fine-tuning diverged: the held-out slice caught it and an untrained model was kept.
                assert report.holdout_error["finetuned"] > 0.5
                assert report.kept in ("raw", "bn")
                candidate = adapted if report.kept == "bn" else apply(bundle.model, bundle.example_input,
                                                                     space, plan).model
                assert all(torch.equal(v, candidate.state_dict()[k]) for k, v in pruned.model.state_dict().items())


def test_two_seeds_give_different_recovery_orders_on_a_list_loader(digits_bundle: ModelBundle) -> None:
    bundle = _list_bundle(digits_bundle)
    batches: list[Batch] = list(bundle.train_loader)  # type: ignore[call-overload]

    def order(seed: int) -> tuple[list[int], list[int]]:
        split = training_split(batches, holdout_batches=2, seed=seed)
        stream = split.batches()

        def index(batch: Batch) -> int:
            return next(i for i, b in enumerate(batches) if b is batch)

        return [index(b) for b in split.holdout], [index(next(stream)) for _ in range(20)]

    held0, trained0 = order(0)
    held1, trained1 = order(1)
    assert order(0) == (held0, trained0)  # a seed is a fixed order
    assert trained0 != trained1
    assert not set(held0) & set(trained0) and not set(held1) & set(trained1)  # held out: never trained on
    assert trained0[:10] != trained0[10:20]  # each pass reshuffles

    space = _space(bundle)
    weights = []
    for seed in (0, 1, 0):
        pruned = apply(bundle.model, bundle.example_input, space, space.uniform_plan(0.5))
        recover(pruned.model, bundle, RecoverySettings(steps=6, bn_batches=2, holdout_batches=2), seed=seed)
        weights.append(pruned.model.state_dict())
    assert any(not torch.equal(v, weights[1][k]) for k, v in weights[0].items())
    assert all(torch.equal(v, weights[2][k]) for k, v in weights[0].items())  # replays bit-identically


def test_a_dataloader_is_split_by_sample_and_reordered_by_the_seed() -> None:
    inputs = torch.randn(200, 4)
    loader = DataLoader(TensorDataset(inputs, torch.arange(200)), batch_size=10, shuffle=True)

    def ids(seed: int) -> tuple[set[int], list[int]]:
        split = training_split(loader, holdout_batches=3, seed=seed)
        stream = split.batches()
        trained = [int(i) for _ in range(36) for i in next(stream)[1]]  # two passes of 17 batches, and some
        return {int(i) for _, t in split.holdout for i in t}, trained

    held, trained = ids(0)
    assert len(held) == 30 and not held & set(trained)
    assert set(trained[:170]) == set(range(200)) - held  # one pass covers every other sample once
    assert ids(0) == (held, trained)
    assert ids(1)[1] != trained


class _Stream:
    """A plugin's own iterable that takes the seed through ``reseed``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.seed = 0

    def reseed(self, seed: int, epoch: int) -> None:
        self.calls.append((seed, epoch))
        self.seed = seed * 100 + epoch

    def __iter__(self) -> Iterator[Batch]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(4):
            yield torch.randn(2, 3, generator=generator), torch.zeros(2, dtype=torch.long)


def test_a_plugin_stream_takes_the_seed_through_reseed() -> None:
    stream = _Stream()
    split = training_split(stream, holdout_batches=1, seed=7)
    batches = split.batches()
    trained = [next(batches) for _ in range(5)]  # 3 per pass after the held-out one
    assert stream.calls == [(7, 0), (7, 0), (7, 1)]
    assert len(split.holdout) == 1 and not torch.equal(tensors(trained[0][0])[0], tensors(trained[3][0])[0])


def test_scoring_is_seeded(digits_bundle: ModelBundle) -> None:
    def first_batch_error(model: torch.nn.Module, batches: object) -> float:
        # An error function that samples: it reads only the first (shuffled) batch.
        inputs, targets = next(iter(batches))  # type: ignore[call-overload]
        return classification_error(model, [(inputs, targets)]) + float(targets.float().mean())

    sampled = DataLoader(digits_bundle.val_loader.dataset, batch_size=5, shuffle=True,  # type: ignore[attr-defined]
                         generator=torch.Generator())
    bundle = ModelBundle(name="s", model=digits_bundle.model, example_input=digits_bundle.example_input,
                         train_loader=digits_bundle.train_loader, val_loader=sampled, error_fn=first_batch_error)
    model = bundle.model
    errors = {seed: [seeded_error(bundle, model, seed) for _ in range(2)] for seed in range(6)}
    assert all(a == b for a, b in errors.values())
    assert len({a for a, _ in errors.values()}) > 1


def test_an_empty_training_loader_is_a_one_line_error() -> None:
    with pytest.raises(ModelLoadError, match="yielded no batches besides the held-out ones; .*holdout_batches: 0"):
        next(training_split([], holdout_batches=2, seed=0).batches())


# --- searches stored before recovery version 2 ---------------------------------------------------

STORED_BEFORE_VERSION_2 = {"name": "old", "example": "digits", "recovery": {"steps": 3, "distill": 0.0, "threads": 1}}


def test_a_config_stored_before_version_2_keeps_the_first_recovery() -> None:
    config = SearchConfig.from_stored(STORED_BEFORE_VERSION_2)
    assert config.recovery.version == 1
    assert config.recovery.lr == 0.01  # version 1's default, not today's 3e-4
    # Today's configurations, written by a user or stored now, are version 2.
    assert SearchConfig.model_validate(STORED_BEFORE_VERSION_2).recovery.version == 2
    stored_now = SearchConfig.model_validate(STORED_BEFORE_VERSION_2).model_dump()
    assert SearchConfig.from_stored(stored_now).recovery.version == 2


def test_recovery_version_1_is_plain_sgd_on_the_loaders_order() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4))
    batches = [(torch.randn(8, 6, generator=torch.Generator().manual_seed(i)), torch.tensor([i % 4] * 8))
               for i in range(3)]
    bundle = ModelBundle(name="lin", model=model, example_input=batches[0][0][:1], train_loader=batches,
                         val_loader=batches, error_fn=classification_error)
    config = RecoverySettings(steps=5, lr=0.05, version=1, bn_batches=2, holdout_batches=2)
    report = recover_with_report(copy.deepcopy(model), bundle, config)
    # The same steps written out: SGD with momentum 0.9 and weight decay 1e-4 at a constant rate,
    # batches in the list's own order, cycling; nothing held out.
    expected = copy.deepcopy(model)
    optimizer = torch.optim.SGD(expected.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for step in range(5):
        inputs, targets = batches[step % 3]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(expected(inputs), targets).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    assert report.kept == "finetuned" and report.holdout_error == {}
    for got, want in zip(report.model.parameters(), expected.parameters(), strict=True):
        assert torch.equal(got, want)
    version_2 = recover_with_report(copy.deepcopy(model), bundle,
                                    RecoverySettings(steps=5, lr=0.05, bn_batches=0, holdout_batches=0))
    assert not torch.equal(next(version_2.model.parameters()), next(expected.parameters()))


class _Stop(Exception):
    pass


def test_before_finetune_sees_the_held_out_error_and_can_stop_the_recovery(digits_bundle: ModelBundle) -> None:
    space = _space(digits_bundle)
    config = RecoverySettings(steps=4, bn_batches=2, holdout_batches=2)
    seen: list[float] = []
    pruned = apply(digits_bundle.model, digits_bundle.example_input, space, space.uniform_plan(0.5))
    report = recover_with_report(pruned.model, digits_bundle, config, seed=3, masks=pruned.masks,
                                 before_finetune=seen.append)
    # Called once, with the error of the model about to be fine-tuned: the BN-adapted one.
    assert seen == [report.holdout_error["bn"]]

    def stop(error: float) -> None:
        raise _Stop(error)

    again = apply(digits_bundle.model, digits_bundle.example_input, space, space.uniform_plan(0.5))
    threads = torch.get_num_threads()
    with pytest.raises(_Stop):
        recover_with_report(again.model, digits_bundle, config, seed=3, masks=again.masks, before_finetune=stop)
    assert torch.get_num_threads() == threads
    # Stopped before any fine-tuning step: the weights are the BN-adapted model's, not trained.
    adapted = apply(digits_bundle.model, digits_bundle.example_input, space, space.uniform_plan(0.5)).model
    adapt_batchnorm(adapted, training_split(digits_bundle.train_loader, holdout_batches=2, seed=3).batches(), count=2)
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                   adapted.state_dict().values(), strict=True))


@pytest.mark.parametrize("batchnorm", ["train", "frozen"])
def test_frozen_batchnorm_keeps_running_statistics_while_weights_train(
    digits_bundle: ModelBundle, batchnorm: Literal["train", "frozen"]
) -> None:
    space = _space(digits_bundle)
    model = apply(digits_bundle.model, digits_bundle.example_input, space, space.uniform_plan(0.5)).model
    before = copy.deepcopy(model.state_dict())
    settings = RecoverySettings(steps=3, bn_batches=0, holdout_batches=0, threads=1, batchnorm=batchnorm)
    recover(model, digits_bundle, settings)
    after = model.state_dict()
    statistics = {k for k in after if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    weights = {k for k in after if k.endswith("weight")}
    assert statistics and all(not torch.equal(after[k], before[k]) for k in weights)
    unchanged = all(torch.equal(after[k], before[k]) for k in statistics)
    assert unchanged == (batchnorm == "frozen")
    assert not any(m.training for m in model.modules())


def test_a_pretrained_example_starts_from_the_pretrained_recovery() -> None:
    from search.config import PRETRAINED_RECOVERY, load_search_config

    for example in ("efficientnet-lite0", "efficientnet-lite0@96"):
        recovery = load_search_config(None, {"name": "s", "example": example}).recovery
        assert {key: getattr(recovery, key) for key in PRETRAINED_RECOVERY} == PRETRAINED_RECOVERY
    # A file or flag wins over it, field by field; other examples keep the defaults.
    given = load_search_config(None, {"name": "s", "example": "efficientnet-lite0", "recovery": {"lr": 1e-4}})
    assert (given.recovery.lr, given.recovery.batchnorm) == (1e-4, "frozen")
    assert load_search_config(None, {"name": "s", "example": "digits"}).recovery == RecoverySettings()
    assert SearchConfig.from_stored({"name": "s", "example": "efficientnet-lite0",
                                     "recovery": {"version": 2}}).recovery.batchnorm == "train"
