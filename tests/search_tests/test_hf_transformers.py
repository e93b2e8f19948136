"""Transformers as users bring them: Hugging Face BERT and ViT built from configs (random weights,
no download) and a torch.nn.MultiheadAttention encoder: heads as units, named inputs, dynamic
batch and sequence axes, ONNX Runtime agreement and a short search on real latency."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import optuna
import pytest
import torch
from torch import nn

from hardware_profiles import HardwareProfile, load_profile
from latency_models.ort import OnnxRuntimeBackend
from search.pipeline.attention import HeadPrunedAttention
from search.pipeline.inputs import ModelInput, primary, run
from search.pipeline.onnx_export import export_onnx
from search.pipeline.plan import Plan
from search.pipeline.space import SearchSpace, apply, build_space

transformers = pytest.importorskip("transformers")


# Tracing Hugging Face code turns shape checks into Python booleans and indexes with
# non-negative aranges; export_onnx compares ONNX Runtime with torch, which is the real check.
def TRACED(test: Callable[..., None]) -> Callable[..., None]:  # noqa: N802
    test = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")(test)
    marked: Callable[..., None] = pytest.mark.filterwarnings(
        "ignore:Exporting aten.{2}index operator:UserWarning")(test)
    return marked


SELF = "bert.encoder.layer.{}.attention.self"


def _bert_config() -> Any:
    return transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=64, num_labels=3)


def _tokens(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[:, length - 3:] = 0  # padding at the end: the mask must reach the model
    return {"input_ids": torch.randint(0, 100, (batch, length), generator=generator),
            "attention_mask": mask,
            "token_type_ids": torch.zeros(batch, length, dtype=torch.long)}


class SentenceEncoder(nn.Module):
    """A BERT whose pooler is never used: the mean of the last hidden states is the output."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = transformers.BertModel(_bert_config())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled: torch.Tensor = (hidden * weights).sum(1) / weights.sum(1)
        return pooled


class MhaEncoder(nn.Module):
    """A plain torch encoder block with ``nn.MultiheadAttention`` and a classifier."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 128)
        self.fc2 = nn.Linear(128, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        h = h + self.fc2(torch.relu(self.fc1(h)))
        logits: torch.Tensor = self.head(h.mean(1))
        return logits


@pytest.fixture(scope="module")
def cpu() -> HardwareProfile:
    return load_profile("cpu-ort-fp32")


@pytest.fixture(scope="module")
def bert() -> nn.Module:
    torch.manual_seed(0)
    model: nn.Module = transformers.BertForSequenceClassification(_bert_config()).eval()
    return model


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    image_size=32, patch_size=8, num_labels=10)
    model: nn.Module = transformers.ViTForImageClassification(config).eval()
    return model


def test_bert_heads_are_the_units(bert: nn.Module, cpu: HardwareProfile) -> None:
    space = build_space(bert, _tokens(1, 16), [cpu])
    heads = {g.name: g for g in space.groups if g.kind == "heads"}
    assert len(heads) == 2
    for layer, group in enumerate(sorted(heads.values(), key=lambda g: g.name)):
        assert group.kept == (1, 2, 3, 4) and group.unit_width == 16
        assert f"{SELF.format(layer)}.query" in group.members
        assert f"bert.encoder.layer.{layer}.attention.output.dense" in group.members
    # The hidden size is off by default: no group holds the embeddings' residual stream.
    assert not any("attention.output.dense" in g.name or g.name.endswith("output.dense") for g in space.groups)
    assert space.output_layer == "classifier"
    with_hidden = build_space(bert, _tokens(1, 16), [cpu], hidden_size=True)
    assert len(with_hidden.groups) == len(space.groups) + 1


def test_unused_pooler_is_not_the_output_layer(cpu: HardwareProfile) -> None:
    torch.manual_seed(0)
    encoder = SentenceEncoder().eval()
    example = {"input_ids": _tokens(1, 16)["input_ids"], "attention_mask": _tokens(1, 16)["attention_mask"]}
    space = build_space(encoder, example, [cpu])
    assert space.output_layer == "bert.encoder.layer.1.output.dense"  # writes the returned states
    assert "bert.pooler.dense" not in space.ignored
    # The pooler feeds nothing returned: no decision for it, nor a group of the hidden size.
    assert sorted(g.kind for g in space.groups) == ["channels", "channels", "heads", "heads"]
    pruned = apply(encoder, example, space, space.uniform_plan(0.5))
    with torch.no_grad():
        other = {k: v for k, v in _tokens(2, 9).items() if k != "token_type_ids"}
        assert run(pruned.model, other).shape == (2, 64)  # the hidden size is kept


@TRACED
def test_bert_pruned_runs_in_its_own_code_and_exports_named_dynamic_inputs(
    bert: nn.Module, cpu: HardwareProfile, tmp_path: Path
) -> None:
    example = _tokens(1, 16)
    space = build_space(bert, example, [cpu])
    heads = sorted(g.name for g in space.groups if g.kind == "heads")
    pruned = apply(bert, example, space, Plan(channels={heads[0]: 0.5, heads[1]: 0.25}))
    modules: Any = dict(pruned.model.named_modules())
    counts = [modules[SELF.format(i)].num_attention_heads for i in range(2)]
    assert counts == [2, 1]
    assert modules[SELF.format(0)].all_head_size == 32 and modules[SELF.format(0)].query.out_features == 32
    # Its own code, its own named inputs, another batch and length:
    with torch.no_grad():
        logits = pruned.model(**_tokens(3, 11)).logits
    assert logits.shape == (3, 3)
    artifact = export_onnx(pruned.model, example, tmp_path, batch_size=2)
    graph = onnx.load(str(artifact.path)).graph
    names = [i.name for i in graph.input]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    for tensor in graph.input:
        assert [d.dim_param for d in tensor.type.tensor_type.shape.dim] == ["batch", "sequence"]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    feed = _tokens(5, 9, seed=3)
    (got, *_) = session.run(None, {k: v.numpy() for k, v in feed.items()})
    with torch.no_grad():
        expected = pruned.model(**feed).logits.numpy()
    assert np.allclose(got, expected, atol=1e-4)
    # The backend times at the profile's batch and the example's sequence length.
    run_once = OnnxRuntimeBackend(cpu).load(artifact.path)
    assert run_once() > 0


def test_pruning_heads_equals_masking_them(bert: nn.Module, cpu: HardwareProfile) -> None:
    """Removing 2 of 4 heads in layer 0 gives the dense model's output with those heads' values
    zeroed (a head whose value is zero adds nothing to the attention output)."""
    example = _tokens(1, 16)
    space = build_space(bert, example, [cpu])
    group = sorted(g.name for g in space.groups if g.kind == "heads")[0]
    pruned: Any = apply(bert, example, space, Plan(channels={group: 0.5})).model
    base: Any = bert
    base_value = base.bert.encoder.layer[0].attention.self.value.weight.detach().view(4, 16, -1)
    kept_value = pruned.bert.encoder.layer[0].attention.self.value.weight.detach().view(2, 16, -1)
    kept = [next(h for h in range(4) if torch.equal(base_value[h], kept_value[k])) for k in range(2)]
    assert len(set(kept)) == 2
    masked: Any = copy.deepcopy(bert)
    with torch.no_grad():
        value = masked.bert.encoder.layer[0].attention.self.value
        for head in set(range(4)) - set(kept):
            value.weight[head * 16:(head + 1) * 16] = 0
            value.bias[head * 16:(head + 1) * 16] = 0
        inputs = _tokens(2, 12, seed=5)
        assert torch.allclose(pruned(**inputs).logits, masked(**inputs).logits, atol=1e-5)
        assert not torch.allclose(base(**inputs).logits, masked(**inputs).logits, atol=1e-5)


@TRACED
def test_vit_heads_apply_and_export(vit: nn.Module, cpu: HardwareProfile, tmp_path: Path) -> None:
    example = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    space = build_space(vit, example, [cpu])
    heads = [g for g in space.groups if g.kind == "kv-heads"]
    assert len(heads) == 2 and all(g.kept == (1, 2, 3, 4) and g.unit_width == 16 for g in heads)
    assert space.output_layer == "classifier"
    pruned = apply(vit, example, space, Plan(channels={heads[0].name: 0.25}))
    attention: Any = dict(pruned.model.named_modules())[heads[0].name.rsplit(".", 1)[0]]
    assert attention.num_attention_heads == 1 and attention.q_proj.out_features == 16
    with torch.no_grad():
        assert pruned.model(pixel_values=torch.randn(4, 3, 32, 32)).logits.shape == (4, 10)
    artifact = export_onnx(pruned.model, example, tmp_path, batch_size=2)
    assert artifact.max_abs_diff <= 1e-4


def test_multihead_attention_heads(cpu: HardwareProfile, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MhaEncoder().eval()
    example = torch.randn(1, 8, 16)
    space = build_space(model, example, [cpu])
    assert [(g.name, g.kind, g.kept, g.unit_width) for g in space.groups if g.kind == "heads"] == [
        ("attn", "heads", (1, 2, 3, 4), 16)]
    assert "fc1" in {g.name for g in space.groups}
    pruned: Any = apply(model, example, space, Plan(channels={"attn": 0.5, "fc1": 0.5})).model
    assert isinstance(pruned.attn, HeadPrunedAttention) and pruned.attn.num_heads == 2
    assert pruned.attn.in_proj.out_features == 3 * 32 and pruned.fc1.out_features == 64
    artifact = export_onnx(pruned, example, tmp_path, batch_size=3)
    assert artifact.max_abs_diff <= 1e-4
    # Removing heads equals zeroing their values in the dense module.
    kept = pruned.attn.kept_heads.tolist()
    masked: Any = copy.deepcopy(model)
    pruned_attention_only: Any = apply(model, example, space, Plan(channels={"attn": 0.5})).model
    assert pruned_attention_only.attn.kept_heads.tolist() == kept
    with torch.no_grad():
        for head in set(range(4)) - set(kept):
            rows = slice(2 * 64 + head * 16, 2 * 64 + (head + 1) * 16)
            masked.attn.in_proj_weight[rows] = 0
            masked.attn.in_proj_bias[rows] = 0
        x = torch.randn(3, 8, 16)
        assert torch.allclose(pruned_attention_only(x), masked(x), atol=1e-5)
        assert not torch.allclose(model(x), masked(x), atol=1e-5)


class MhaNoNorm(nn.Module):
    """``nn.MultiheadAttention`` on a residual stream with no LayerNorm: torch-pruning then
    couples the attention's embedding to the stream's other layers in one channel group."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.fc = nn.Linear(64, 128)
        self.out = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.out(torch.relu(self.fc(h)))
        logits: torch.Tensor = self.head(h.mean(1))
        return logits


def test_multihead_attention_without_norm_keeps_its_embedding(cpu: HardwareProfile, tmp_path: Path) -> None:
    """The stream group through the attention's embedding is no decision (cutting it changed the
    heads' width, and the head group then failed with a reshape error); the heads are."""
    torch.manual_seed(0)
    model = MhaNoNorm().eval()
    example = torch.randn(1, 8, 16)
    space = build_space(model, example, [cpu])
    assert sorted(g.name for g in space.groups) == ["attn", "fc"]
    pruned: Any = apply(model, example, space, Plan(channels={"attn": 0.5, "fc": 0.5})).model
    assert pruned.attn.num_heads == 2 and pruned.fc.out_features == 64
    assert export_onnx(pruned, example, tmp_path).max_abs_diff <= 1e-4


def _short_search(model: nn.Module, example: ModelInput, space: SearchSpace, held_out: ModelInput,
                  profile: HardwareProfile, tmp_path: Path) -> list[tuple[float, float]]:
    """Three trials (the dense one first): relative output change and measured ORT latency."""
    with torch.no_grad():
        dense = primary(run(model, held_out))
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial(space.dense_params())
    results = []
    with OnnxRuntimeBackend(profile) as backend:
        for _ in range(3):
            trial = study.ask()
            pruned = apply(model, example, space, space.suggest(trial))
            artifact = export_onnx(pruned.model, example, tmp_path, batch_size=profile.batch_size)
            with torch.no_grad():
                error = float((primary(run(pruned.model, held_out)) - dense).norm() / dense.norm())
            latency = backend.measure(artifact.path).median_us
            study.tell(trial, (error, latency))
            results.append((error, latency))
    return results


@TRACED
def test_short_searches(bert: nn.Module, vit: nn.Module, fast_profile: HardwareProfile, tmp_path: Path) -> None:
    cases: list[tuple[nn.Module, ModelInput, ModelInput]] = [
        (bert, _tokens(1, 16), _tokens(4, 16, seed=9)),
        (vit, torch.randn(1, 3, 32, 32), torch.randn(4, 3, 32, 32)),
        (MhaEncoder().eval(), torch.randn(1, 8, 16), torch.randn(4, 8, 16)),
    ]
    for model, example, held_out in cases:
        space = build_space(model, example, [fast_profile])
        results = _short_search(model, example, space, held_out, fast_profile, tmp_path)
        assert results[0][0] == 0.0 and all(latency > 0 for _, latency in results)


@TRACED
def test_hidden_size_opt_in_prunes_embeddings_and_norms_consistently(
    bert: nn.Module, vit: nn.Module, cpu: HardwareProfile, tmp_path: Path
) -> None:
    for model, example in ((bert, _tokens(1, 16)), (vit, torch.randn(1, 3, 32, 32))):
        space = build_space(model, example, [cpu], hidden_size=True)
        default = {g.name for g in build_space(model, example, [cpu]).groups}
        (hidden,) = [g for g in space.groups if g.name not in default]
        assert hidden.size == 64
        pruned: Any = apply(model, example, space, Plan(channels={hidden.name: 0.5})).model
        norms = [m for m in pruned.modules() if isinstance(m, nn.LayerNorm)]
        assert norms and all(m.normalized_shape == (32,) for m in norms)
        embeddings = [m for m in pruned.modules() if isinstance(m, nn.Embedding)]
        assert all(m.embedding_dim == 32 for m in embeddings)
        with torch.no_grad():
            run(pruned, example)  # its own code, its own inputs
        assert export_onnx(pruned, example, tmp_path, batch_size=2).max_abs_diff <= 1e-4


def test_a_note_when_whole_heads_miss_the_channel_multiple() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=48, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = transformers.BertForSequenceClassification(config).eval()
    example = {k: v for k, v in _tokens(1, 8).items() if k != "input_ids"} | {"input_ids": torch.zeros(1, 8).long()}
    space = build_space(model, example, [load_profile("ampere-trt-fp16")])
    (heads,) = [g for g in space.groups if g.kind == "heads"]
    assert heads.kept == (1, 2, 3, 4) and heads.unit_width == 12
    assert "12, 36 channels are not multiples of 8" in space.notes[heads.name]
    assert space.to_dict()["notes"] == dict(space.notes)


BERT_PLUGIN = '''
import torch
import transformers

from search.pipeline.bundle import ModelBundle, classification_error


def bundle() -> ModelBundle:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):  # (named inputs, labels): what a Hugging Face user's loader yields
        ids = torch.randint(0, 100, (8, 16), generator=generator)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            batches.append((inputs, model(**inputs).logits.argmax(dim=1)))
    example = {k: v[:1] for k, v in batches[0][0].items()}
    return ModelBundle(name="bert", model=model, example_input=example, train_loader=batches,
                       val_loader=batches, error_fn=classification_error)
'''


@TRACED
def test_search_over_a_bert_with_named_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole search (base measurement, recovery, scoring, export, ORT timing) on a bundle whose
    example and loaders are mappings of named tensors and whose model returns a ModelOutput."""
    from typer.testing import CliRunner

    from search.cli.main import app

    name = f"bert_plugin_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(BERT_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    url = f"sqlite:///{tmp_path / 'h.db'}"
    env = {"HWPRUNE_CACHE": str(tmp_path / "cache"), "HWPRUNE_HEARTBEAT_S": "1", "HWPRUNE_GRACE_S": "3"}
    result = CliRunner().invoke(app, ["search", "start", "--name", "bert", "--model", f"{name}:bundle",
                                      "--trials", "3", "--recovery-steps", "2", "--db", url, "--json"], env=env)
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="hwprune:bert", storage=url)
    completed = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(completed) == 3
    assert any(key.startswith("keep:") and "attention.self" in key for key in completed[0].params)
