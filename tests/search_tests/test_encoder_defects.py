"""The defects issue 34 found on a real sentence encoder (BERT layout, named inputs, an unused
pooler) and in the demo, reproduced on a small random BERT built from a transformers config (no
download) and the tiny plugin; one test each."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from hardware_profiles import load_profile
from search.cli.main import app
from search.pipeline.space import apply, build_space
from search.pipeline.sparsity import NM_CRITERIA, sparsify

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


# --- the encoder through the command line, as a plugin (the process's own output is the point) ---

BERT_PLUGIN = '''
import torch
import transformers
from torch import nn

from search.pipeline.bundle import ModelBundle


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.bert = transformers.BertModel(transformers.BertConfig(
            vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64))

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)


def bundle():
    torch.manual_seed(0)
    model = Encoder().eval()
    ids = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(8, 16, dtype=torch.long)
    mask[:, 13:] = 0
    data = [({"input_ids": ids[i:i + 4], "attention_mask": mask[i:i + 4]}, torch.zeros(4, 64)) for i in (0, 4)]

    def error(model, loader):
        return 0.0

    return ModelBundle(name="encoder", model=model, example_input={"input_ids": ids[:1], "attention_mask": mask[:1]},
                       train_loader=data, val_loader=data, error_fn=error)
'''


def _hwprune(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "search", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The encoder plugin exported by `hwprune export` (an all-dense plan), and that process."""
    folder = tmp_path_factory.mktemp("encoder")
    (folder / "encoder_plugin.py").write_text(BERT_PLUGIN)
    (folder / "plan.yaml").write_text("channels: {}\n")
    done = _hwprune(folder, "export", "--plan", "plan.yaml", "--model", "encoder_plugin:bundle", "--out", "out",
                    "--json")
    assert done.returncode == 0, done.stderr
    return folder, done


def test_space_json_on_named_inputs_is_only_json(exported: tuple[Path, Any]) -> None:
    # issue 34: torch-pruning print()ed "Warning! No positional inputs found ..." before the JSON
    folder, _ = exported
    done = _hwprune(folder, "space", "--model", "encoder_plugin:bundle", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["base_macs"] > 0
    assert "Warning" not in done.stderr and "warn" not in done.stderr.lower(), done.stderr


def test_export_prints_no_third_party_warning(exported: tuple[Path, Any]) -> None:
    # issue 34: the ONNX exporter's aten::index UserWarning was printed into every export
    _, done = exported
    assert json.loads(done.stdout)["self_contained"] == "model.pt2"
    assert done.stderr.strip() == "", done.stderr


def test_measure_reads_the_shapes_an_export_records(exported: tuple[Path, Any], fast_profile_path: Path) -> None:
    # issue 34: `measure` refused hwprune's own export for its dynamic sequence axis
    folder, _ = exported
    result = CliRunner().invoke(app, ["--profiles-dir", str(fast_profile_path.parent), "measure",
                                      str(folder / "out" / "model.onnx"), "-p", "fast", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["median_us"] > 0


def test_the_pt2_program_is_dynamic_where_the_onnx_is(exported: tuple[Path, Any]) -> None:
    # issue 34: model.pt2 fixed the sequence length (Guard failed: input_ids.size()[1] == 16)
    folder, _ = exported
    program = torch.export.load(str(folder / "out" / "model.pt2")).module()
    onnx_inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
                   for i in onnx.load(str(folder / "out" / "model.onnx")).graph.input}
    assert onnx_inputs["input_ids"] == ["batch", "sequence"]
    for batch, length in ((2, 9), (3, 40)):
        ids = torch.randint(0, 100, (batch, length))
        with torch.no_grad():
            assert program(input_ids=ids, attention_mask=torch.ones_like(ids)).shape == (batch, 64)
