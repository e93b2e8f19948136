"""Reference architectures built in code (no weight downloads), for tests and benchmarks.

A ResNet-18 layout (residual shortcuts), a shortened MobileNetV2 (depthwise convolutions,
inverted residuals), a small transformer encoder with timm-style attention (one ``qkv`` Linear
and a ``num_heads`` attribute, the convention hwprune prunes whole heads by) and a small decoder
Llama built from a ``transformers`` config.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from search.errors import ModelLoadError


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        result: torch.Tensor = F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))
        return result


class ResNet18(nn.Module):
    """ResNet-18 layout (2-2-2-2 basic blocks); ``width`` scales every stage."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        cin = width
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            cout = width * mult
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        result: torch.Tensor = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return result


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = x + self.conv(x) if self.use_residual else self.conv(x)
        return result


class MobileNetV2(nn.Module):
    """A shortened MobileNetV2: depthwise convolutions and inverted residuals."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
        cin = 32
        for expand, cout, repeats, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2)):
            for index in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if index == 0 else 1, expand))
                cin = cout
        layers += [nn.Conv2d(cin, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))
        return result


class Attention(nn.Module):
    """timm-style attention: one ``qkv`` Linear, ``num_heads`` read at every forward."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.head_dim**-0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        result: torch.Tensor = self.proj(out)
        return result


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        result: torch.Tensor = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return result


class TinyTransformer(nn.Module):
    """A transformer encoder classifier over 8 tokens of 16 features."""

    def __init__(self, dim: int = 64, heads: int = 4, depth: int = 2, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.head(self.norm(self.blocks(self.embed(x))).mean(1))
        return result


class CausalLM(nn.Module):
    """A transformers causal LM as a plain module: token ids ``[batch, tokens]`` to logits
    ``[batch, vocab, tokens]``.

    The vocabulary is dimension 1, as classes are for every other model here, so cross-entropy
    against next-token ids, ``argmax(dim=1)`` and the ONNX export apply unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # An explicit all-ones mask: without one, transformers probes the positions for packed
        # sequences with torch.diff, which the ONNX exporter cannot express.
        logits: torch.Tensor = self.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                          use_cache=False).logits
        return logits.transpose(1, 2)


def tiny_llama(
    *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
    vocab: int = 128, seed: int = 0,
) -> CausalLM:
    """A randomly initialised Llama (grouped-query attention, gated MLP, RMSNorm, rotary
    embeddings) from a ``transformers`` config; nothing is downloaded.

    Raises:
        ModelLoadError: ``transformers`` is not installed.
    """
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise ModelLoadError("the Llama model needs transformers: pip install 'hwprune[dev]'") from exc
    config = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        attn_implementation="eager",  # traceable by torch-pruning and the TorchScript exporter
    )
    torch.manual_seed(seed)
    return CausalLM(LlamaForCausalLM(config)).eval()


def token_ids(batch: int, tokens: int, *, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def randomize_norms(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers random statistics and scales, in place; returns the model."""
    # Fresh BatchNorm layers are identities; random statistics make pruning errors visible.
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            if module.running_mean is not None and module.running_var is not None:
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


def _seeded_input(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


ARCHITECTURES: dict[str, Callable[[int], tuple[nn.Module, torch.Tensor]]] = {
    "resnet18": lambda resolution: (ResNet18(width=16), _seeded_input(1, 3, resolution, resolution)),
    "resnet18-full": lambda resolution: (ResNet18(width=64), _seeded_input(1, 3, resolution, resolution)),
    "mobilenetv2": lambda resolution: (MobileNetV2(), _seeded_input(1, 3, resolution, resolution)),
    "transformer": lambda _resolution: (TinyTransformer(), _seeded_input(1, 8, 16)),
    "llama": lambda _resolution: (tiny_llama(), token_ids(1, 16)),
}


def make_architecture(name: str, *, seed: int = 0, resolution: int = 64) -> tuple[nn.Module, torch.Tensor]:
    """A reference model in eval mode (weights from ``seed``) and an example input."""
    torch.manual_seed(seed)
    model, example = ARCHITECTURES[name](resolution)
    return randomize_norms(model), example
