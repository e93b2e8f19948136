"""hwprune's Wanda and SparseGPT against llmcompressor's, at 2:4, on the Llama of bench/criteria.py.

llmcompressor pins another transformers (and brings datasets, pandas, pyarrow...), so it runs in
its own venv layered over the project's (same torch), never in the project's:

    python -m venv /tmp/llmc && echo "$PWD/.venv/lib/python3.11/site-packages" > \\
        /tmp/llmc/lib/python3.11/site-packages/zz_project.pth && /tmp/llmc/bin/pip install llmcompressor
    .venv/bin/python bench/criteria_llmcompressor.py prepare DIR     # model, data, hwprune's figures
    /tmp/llmc/bin/python bench/criteria_llmcompressor.py measure DIR # llmcompressor's figures

Both print one line per criterion: relative logits error on held-out tokens and seconds;
``measure`` then writes both sets into docs/benchmarks.md (section ``criteria-llmcompressor``).
The same model (saved with save_pretrained), the same 64 calibration sequences of 64 tokens,
every Linear but lm_head at 2:4, llmcompressor's defaults otherwise (sequential pipeline,
dampening 0.01, block size 128).
"""

from __future__ import annotations

import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

SEQUENCES, TOKENS, VOCAB = 64, 64, 512


def _relative(out: torch.Tensor, dense: torch.Tensor) -> float:
    return float((out - dense).norm() / dense.norm())


def prepare(folder: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from search.examples.zoo import tiny_llama, token_ids
    from search.pipeline.sparsity import sparsify

    wrapped = tiny_llama(hidden=128, layers=4, heads=8, kv_heads=2, intermediate=352, vocab=VOCAB)
    model = wrapped.model
    model.save_pretrained(folder / "model")  # type: ignore[operator]
    calibration = token_ids(SEQUENCES, TOKENS, vocab=VOCAB, seed=20)
    held_out = token_ids(8, TOKENS, vocab=VOCAB, seed=10)
    with torch.no_grad():
        dense = wrapped(held_out)
    torch.save({"calibration": calibration, "held_out": held_out, "dense": dense}, folder / "data.pt")
    layers = {name: (2, 4) for name, module in wrapped.named_modules()
              if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")}
    batches = list(torch.split(calibration, 8))
    rows = []
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        copy = tiny_llama(hidden=128, layers=4, heads=8, kv_heads=2, intermediate=352, vocab=VOCAB)
        copy.load_state_dict(wrapped.state_dict())
        start = time.perf_counter()
        sparsify(copy, layers, criterion=criterion, calibration=batches)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            rel = _relative(copy(held_out), dense)
        print(f"hwprune {criterion}: rel. error {rel:.4f}, {seconds:.2f} s", flush=True)
        rows.append(f"| hwprune | {criterion} | {rel:.4f} | {seconds:.2f} |")
    (folder / "hwprune.md").write_text("\n".join(rows) + "\n")


def measure(folder: Path) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from tokenizers import Tokenizer, models
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    data = torch.load(folder / "data.pt")
    ids = data["calibration"]
    rows = (folder / "hwprune.md").read_text().splitlines()
    # oneshot insists on a processor; the data is already token ids, so a word-level stand-in will do.
    vocabulary = {f"t{i}": i for i in range(VOCAB)}
    processor = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="t0")),
        pad_token="t0")
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    for name, modifier in (("wanda", WandaPruningModifier), ("sparsegpt", SparseGPTModifier)):
        model = LlamaForCausalLM.from_pretrained(folder / "model", attn_implementation="eager").eval()  # type: ignore[no-untyped-call]
        recipe = modifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])
        start = time.perf_counter()
        oneshot(model=model, processor=processor, dataset=dataset, recipe=recipe, num_calibration_samples=SEQUENCES,
                max_seq_length=TOKENS, shuffle_calibration_samples=False)
        seconds = time.perf_counter() - start
        held_out = data["held_out"]
        with torch.no_grad():
            out = model(input_ids=held_out, attention_mask=torch.ones_like(held_out)).logits.transpose(1, 2)
        zeros = [float((m.weight == 0).float().mean()) for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
        rel = _relative(out, data["dense"])
        print(f"llmcompressor {name}: rel. error {rel:.4f}, {seconds:.2f} s, "
              f"zeros {min(zeros):.3f}-{max(zeros):.3f}", flush=True)
        rows.append(f"| llmcompressor {version('llmcompressor')} | {name} | {rel:.4f} | {seconds:.2f} |")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import write_section

    body = (
        "The Llama of the criteria benchmark (4 layers, hidden 128, 8 query / 2 kv heads, random init), "
        f"{SEQUENCES} calibration sequences of {TOKENS} tokens, every Linear but lm_head at 2:4; "
        "`rel. error` = ||pruned - dense|| / ||dense|| of the logits on 8 held-out sequences. hwprune: "
        "`search.pipeline.sparsity.sparsify`; llmcompressor: `oneshot` with its modifier (sequential pipeline, its "
        "defaults), in a venv of its own over the project's torch (it pins another transformers).\n\n"
        "| implementation | criterion | rel. error | seconds |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    write_section("criteria-llmcompressor", "Wanda and SparseGPT: hwprune against llmcompressor",
                  ".venv/bin/python bench/criteria_llmcompressor.py prepare DIR; "
                  "/tmp/llmc/bin/python bench/criteria_llmcompressor.py measure DIR", body)


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    (prepare if mode == "prepare" else measure)(folder)
