"""The defects issue 34 found on a real sentence encoder (BERT layout, named inputs, an unused
pooler) and in the demo, reproduced on a small random BERT built from a transformers config (no
download) and the tiny plugin; one test each."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hardware_profiles import load_profile
from search.pipeline.sparsity import NM_CRITERIA, sparsify
from search.pipeline.space import apply, build_space

transformers = pytest.importorskip("transformers")


def _tokens(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, length - 3:] = 0  # padding at the end: the mask must reach the model
    return {"input_ids": torch.randint(0, 100, (batch, length), generator=generator), "attention_mask": mask}


class SentenceEncoder(nn.Module):
    """A BERT whose pooler is never used: the masked mean of the last hidden states is the output."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=128, max_position_embeddings=64)
        self.bert = transformers.BertModel(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled: torch.Tensor = (hidden * weights).sum(1) / weights.sum(1)
        return pooled


@pytest.fixture(scope="module")
def encoder() -> nn.Module:
    torch.manual_seed(0)
    return SentenceEncoder().eval()


def _tiny_bundle() -> Any:
    path = Path(__file__).parent / "tiny_plugin.py"
    spec = importlib.util.spec_from_file_location("tiny_plugin_for_defects", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.bundle()


def test_an_unused_pooler_is_offered_no_sparsity(encoder: nn.Module) -> None:
    # issue 34: `space` offered 2:4 on bert.pooler.dense, whose output the model never returns
    space = build_space(encoder, _tokens(1, 16), [load_profile("ampere-trt-fp16")])
    offered = {choice.layer for choice in space.sparsity}
    assert "bert.encoder.layer.0.intermediate.dense" in offered  # the live layers still are
    assert not any(name.startswith("bert.pooler") for name in offered), offered
    assert not any(name.startswith("bert.pooler") for group in space.groups for name in group.members)


@pytest.mark.parametrize("criterion", NM_CRITERIA)
def test_an_all_dense_plan_prunes_with_every_nm_criterion(criterion: str) -> None:
    # issue 34: wanda and sparsegpt concatenated an empty list of calibration batches (IndexError)
    # when a plan had no N:M layer, so the base trial of such a search failed
    bundle = _tiny_bundle()
    assert sparsify(bundle.model, {}, criterion=criterion, calibration=[]) == {}
    space = build_space(bundle.model, bundle.example_input, [load_profile("ampere-trt-fp16")])
    assert space.sparsity  # the profile offers 2:4, and the plan takes none of it
    pruned = apply(bundle.model, bundle.example_input, space, space.dense_plan(), nm_criterion=criterion,
                   calibration=bundle.train_loader)
    assert pruned.masks == {} and pruned.patterns == {}
