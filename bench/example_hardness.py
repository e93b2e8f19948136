"""Is a built-in example hard enough to tell pruning methods apart?

For each example: the dense model's training time and accuracy, and the accuracy of uniform
pruning (every group at one keep-ratio) after the default per-trial recovery of a search
(``RecoverySettings()``, seed 0), on the validation data a search scores with.

Run by hand: ``.venv/bin/python bench/example_hardness.py [--examples digits digits-distorted]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _report import write_section  # noqa: E402

from hardware_profiles import load_profile  # noqa: E402
from search.config import load_search_config  # noqa: E402
from search.examples import load_example  # noqa: E402
from search.pipeline.bundle import seeded_error  # noqa: E402
from search.pipeline.recovery import recover  # noqa: E402
from search.pipeline.space import apply, build_space  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", nargs="+", default=["digits", "digits-distorted"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5])
    parser.add_argument("--cache", type=Path, default=None,
                        help="Model cache to use (default: a fresh one, so that training is timed).")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.examples:
            started = time.perf_counter()
            bundle = load_example(name, cache_dir=args.cache or Path(tmp))
            train_s = time.perf_counter() - started
            config = load_search_config(None, {"name": "hardness", "example": name})
            space = build_space(bundle.model, bundle.example_input, [load_profile("cpu-ort-fp32")],
                                keep_ratios=config.keep_ratios)
            dense = 1 - seeded_error(bundle, bundle.model, config.seed)
            cells = [f"{name}", f"{train_s:.0f} s", f"{100 * dense:.2f}%"]
            for ratio in args.ratios:
                pruned = apply(bundle.model, bundle.example_input, space, space.uniform_plan(ratio))
                recover(pruned.model, bundle, config.recovery, seed=config.seed, masks=pruned.masks)
                accuracy = 1 - seeded_error(bundle, pruned.model, config.seed)
                cells.append(f"{100 * accuracy:.2f}% ({100 * (accuracy - dense):+.2f})")
            rows.append("| " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    header = "| example | dense training | dense accuracy | " + " | ".join(
        f"uniform keep {r:g}, default recovery" for r in args.ratios) + " |"
    body = (
        "Dense training time on this machine (torch 2 threads), validation accuracy of the dense "
        "model and of uniform pruning after the default per-trial recovery (30 AdamW steps, "
        "adaptive batch-norm, keep-the-better; seed 0).\n\n" + header + "\n|" + "---|" * (3 + len(args.ratios))
        + "\n" + "\n".join(rows) + "\n"
    )
    write_section("example-hardness", "Built-in examples: hard enough? (bench/example_hardness.py)",
                  " ".join([".venv/bin/python bench/example_hardness.py", "--examples", *args.examples,
                            "--ratios", *(f"{r:g}" for r in args.ratios)]
                           + (["--cache", str(args.cache)] if args.cache else [])), body)


if __name__ == "__main__":
    main()
