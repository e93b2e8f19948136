"""Mean compensation: what a removed channel fed its consumers on average goes back into them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hardware_profiles import load_profile
from search.config import SearchConfig
from search.errors import PlanError
from search.pipeline.chain import ChainSettings
from search.pipeline.plan import Plan
from search.pipeline.space import apply, build_space


class _ConvNet(nn.Module):
    """conv -> BN -> ReLU -> 1x1 conv (no bias) -> BN -> ReLU -> pool -> Linear -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.fc1(x.mean(dim=(2, 3))))
        out: torch.Tensor = self.fc2(x)
        return out


def _with_constant_channels() -> _ConvNet:
    """A net whose first 16 conv1 channels and first 32 fc1 features output a constant (1.0 and
    0.5) and weigh least in their consumers, so magnitude importance removes exactly those: with
    mean compensation the pruned net must compute what the dense one does."""
    torch.manual_seed(0)
    net = _ConvNet()
    with torch.no_grad():
        for norm in (net.bn1, net.bn2):
            assert norm.running_mean is not None and norm.running_var is not None
            norm.running_mean.uniform_(-0.2, 0.2)
            norm.running_var.uniform_(0.5, 1.5)
        net.conv1.weight[:16] = 0.0
        net.bn1.weight[:16] = 0.0
        net.bn1.bias[:16] = 1.0
        net.conv2.weight.mul_(5.0)
        net.conv2.weight[:, :16] = 0.02
        net.fc1.weight[:32] = 0.0
        net.fc1.bias[:32] = 0.5
        net.fc2.weight.mul_(5.0)
        net.fc2.weight[:, :32] = 0.01
    return net.eval()


@pytest.fixture(scope="module")
def setup() -> tuple[_ConvNet, torch.Tensor, object, Plan, list[tuple[torch.Tensor, torch.Tensor]]]:
    net = _with_constant_channels()
    example = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    space = build_space(net, example, [load_profile("cpu-ort-fp32")])
    plan = Plan(channels={"conv1": 0.5, "fc1": 0.5})
    generator = torch.Generator().manual_seed(2)
    calibration = [(torch.randn(4, 3, 8, 8, generator=generator), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    return net, example, space, plan, calibration


def test_mean_compensation_restores_constant_channels_exactly(setup) -> None:  # type: ignore[no-untyped-def]
    net, example, space, plan, calibration = setup
    inputs = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    plain = apply(net, example, space, plan, calibration=calibration)
    compensated = apply(net, example, space, plan, compensation="mean", calibration=calibration)
    with torch.no_grad():
        dense, lost, got = net(inputs), plain.model(inputs), compensated.model(inputs)
    assert compensated.kept == {"conv1": 16, "conv2": 32, "fc1": 32}
    # conv1's consumer conv2 has no bias (its BatchNorm's mean moves); fc1's, fc2, has one.
    assert (got - dense).abs().max() < 1e-5
    assert (lost - dense).abs().max() > 1e-2  # without it, the constants are lost


def test_mean_compensation_leaves_the_base_alone_and_repeats_bit_for_bit(setup) -> None:  # type: ignore[no-untyped-def]
    net, example, space, plan, calibration = setup
    before = {k: v.clone() for k, v in net.state_dict().items()}
    first = apply(net, example, space, plan, compensation="mean", calibration=calibration)
    second = apply(net, example, space, plan, compensation="mean", calibration=calibration)
    # The copy's untouched tensors share the base's storage until pruning ends: no in-place write.
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert first.signature == second.signature
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_compensation_needs_calibration_and_a_known_name(setup) -> None:  # type: ignore[no-untyped-def]
    net, example, space, plan, calibration = setup
    with pytest.raises(PlanError, match="compensation 'mean' needs calibration batches"):
        apply(net, example, space, plan, compensation="mean")
    with pytest.raises(PlanError, match="compensation 'median' is unknown"):
        apply(net, example, space, plan, compensation="median", calibration=calibration)


def test_compensation_is_a_search_setting_and_stored_searches_keep_none() -> None:
    config = SearchConfig.model_validate({"name": "c", "example": "digits", "targets": ["cpu-ort-fp32"],
                                          "compensation": "mean"})
    assert ChainSettings.for_search(config, batch_size=1).compensation == "mean"
    stored = config.model_dump(mode="json")
    del stored["compensation"]  # a search stored before the setting existed
    assert SearchConfig.from_stored(stored).compensation == "none"


def test_a_pretrained_example_starts_from_mean_compensation() -> None:
    from search.config import load_search_config

    assert load_search_config(None, {"name": "s", "example": "efficientnet-lite0@96"}).compensation == "mean"
    given = load_search_config(None, {"name": "s", "example": "efficientnet-lite0", "compensation": "none"})
    assert given.compensation == "none"  # a file or flag wins
    assert load_search_config(None, {"name": "s", "example": "digits"}).compensation == "none"
    # A stored search keeps what it stored: one from before the setting prunes as it did.
    assert SearchConfig.from_stored({"name": "s", "example": "efficientnet-lite0"}).compensation == "none"
