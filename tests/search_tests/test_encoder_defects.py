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


# --- the front: one row per architecture, columns named after what the error measures -----------

def _point(trial: int, *, signature: str, error: float, latency_us: float) -> Any:
    from search.study.pareto import TrialPoint

    return TrialPoint(trial=trial, error=error, latency_us={"cpu": latency_us}, macs=1, params=1, reward=None,
                      feasible=True, signature=signature)


def test_a_front_shows_an_architecture_once_naming_its_trials() -> None:
    # issue 34: `make demo` listed trials 19, 21 and 22 as three identical rows
    from search.study.pareto import pareto_front

    points = [*(_point(n, signature="a", error=0.1, latency_us=50.0) for n in (22, 19, 21)),
              _point(3, signature="b", error=0.05, latency_us=80.0),
              _point(4, signature="c", error=0.1, latency_us=50.0)]
    front = pareto_front(points, "cpu")
    assert [(p.trial, p.same_as) for p in front] == [(4, ()), (19, (21, 22)), (3, ())]


def test_a_bundle_names_its_error() -> None:
    from search.pipeline.bundle import ModelBundle, classification_error, fidelity_error

    bundle = _tiny_bundle()
    assert bundle.error_fn is classification_error and bundle.names() == ("error", "accuracy")
    fidelity = ModelBundle(name="f", model=bundle.model, example_input=bundle.example_input,
                           train_loader=bundle.train_loader, val_loader=bundle.val_loader,
                           error_fn=fidelity_error(bundle.model))
    assert fidelity.names() == ("1 - cosine similarity", "cosine similarity")
    own = ModelBundle(name="o", model=bundle.model, example_input=bundle.example_input, train_loader=[],
                      val_loader=[], error_fn=lambda model, batches: 0.5, error_name="word error rate")
    assert own.names() == ("word error rate", None)


def _row(error_name: str, score_name: str | None) -> dict[str, Any]:
    return {"trial": 19, "trials": [19, 21, 22], "error": 0.0123, "accuracy": 0.9877, "accuracy_change": -0.01,
            "latency_us": {"cpu": 50.0}, "speedup": {"cpu": 2.0}, "speedup_interval": {"cpu": [1.9, 2.1]},
            "confirmed": {"cpu": True}, "macs": 1e6, "params": 1e5, "final_error": None, "final_accuracy": None,
            "final_steps": None, "error_name": error_name, "score_name": score_name}


@pytest.mark.parametrize(("error_name", "score_name", "shown", "not_shown"), [
    ("error", "accuracy", ["accuracy", "98.77%", "19 (=21, 22)"], []),
    ("1 - cosine similarity", "cosine similarity", ["1 - cosine similarity", "cosine similarity"], ["accuracy"]),
    ("word error rate", None, ["word error rate", "0.0123"], ["accuracy", "98.77%"]),
])
def test_the_front_table_is_named_after_the_error(error_name: str, score_name: str | None, shown: list[str],
                                                  not_shown: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # issue 34: the table printed 1 - (mean cosine similarity) as a percentage "accuracy"
    from search.cli.searches import _print_pareto

    _print_pareto([_row(error_name, score_name)], "s", "cpu")
    printed = capsys.readouterr().out
    assert all(word in printed for word in shown), printed
    assert not any(word in printed for word in not_shown), printed


# --- the report's plots read at a glance ---------------------------------------------------------

def _texts_inside(figure: Any) -> list[str]:
    """The drawn texts (title, axis labels, tick labels) that reach outside the saved figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()  # type: ignore[no-untyped-call]
    renderer = canvas.get_renderer()  # type: ignore[no-untyped-call]
    bounds = figure.bbox
    outside = []
    for axes in figure.axes:
        ticks = [text for labels, places, (low, high) in (
                     (axes.get_xticklabels(), axes.get_xticks(), sorted(axes.get_xlim())),
                     (axes.get_yticklabels(), axes.get_yticks(), sorted(axes.get_ylim())))
                 for text, at in zip(labels, places, strict=True) if low <= at <= high]  # drawn ones only
        for text in [axes.title, axes.xaxis.label, axes.yaxis.label, *ticks]:
            if not text.get_text() or not text.get_visible():
                continue
            box = text.get_window_extent(renderer)
            if box.x0 < bounds.x0 - 1 or box.x1 > bounds.x1 + 1 or box.y0 < bounds.y0 - 1 or box.y1 > bounds.y1 + 1:
                outside.append(text.get_text())
    return outside


ENCODER_GROUPS: list[dict[str, Any]] = [
    *({"name": f"bert.encoder.layer.{i}.attention", "kind": "heads", "size": 12} for i in range(6)),
    *({"name": f"bert.encoder.layer.{i}.intermediate.dense", "kind": "channels", "size": 1536} for i in range(6)),
]


def test_channels_plot_draws_heads_and_channels_as_shares_of_their_width() -> None:
    # issue 34: heads (3-12) and FFN channels (384-1536) on one axis; the y-label was clipped
    pytest.importorskip("matplotlib")
    from search.study.pareto import TrialPoint
    from search.study.report import channels_figure

    kept = {str(g["name"]): int(g["size"]) // 4 for g in ENCODER_GROUPS}
    point = TrialPoint(trial=7, error=0.1, latency_us={"cpu": 1.0}, macs=1, params=1, reward=None, feasible=True,
                       kept=kept)
    figure, drawn = channels_figure(ENCODER_GROUPS, [point], "Kept width per group, front on cpu-ort-fp32")
    assert drawn == len(ENCODER_GROUPS)
    trial_line = next(line for line in figure.axes[0].get_lines() if line.get_label() == "trial 7")
    assert list(trial_line.get_ydata()) == [0.25] * len(ENCODER_GROUPS)  # 3 of 12 heads, 384 of 1536 channels
    labels = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert "bert.encoder.layer.0.attention (12 heads)" in labels
    assert _texts_inside(figure) == []


def test_macs_plot_title_is_not_cut() -> None:
    pytest.importorskip("matplotlib")
    from search.study.report import macs_figure

    points = [_point(n, signature=str(n), error=0.1, latency_us=10.0 + n) for n in range(5)]
    # issue 34: one line, "Latency against MACs on <target>: D of T pairs mis-ordered by MACs", was cut
    title = "Latency against MACs on jetson-orin-trt-fp16-maxn-25w\n1234 of 4560 pairs of trials mis-ordered by MACs"
    assert _texts_inside(macs_figure(points, "cpu", title)) == []
    assert _texts_inside(macs_figure(points, "cpu", title.replace("\n", ": "))) == [title.replace("\n", ": ")]
