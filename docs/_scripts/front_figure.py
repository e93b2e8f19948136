"""Draw the README's picture: a real search's front on the built-in benchmark example, with the
uniform ladder beside it, from the kept results of a benchmark (nothing is run again, nothing
invented: the points are the trials that bench/search_quality.py stored).

    python docs/_scripts/front_figure.py     # writes docs/assets/images/front.png

The source is the `tpe` search and the uniform sweep of seed 0 in
bench/results/search_quality/digits-distorted-trial-pruning/ (section "Search quality on
digits-distorted, trial-pruning" of the benchmarks page; seed 0 is the seed at that section's
median). The plot is drawn with the report's own figure factory and front (search.study.report,
search.study.read.shown_front), the way `hwprune report` draws a front.
"""

from __future__ import annotations

import json
from pathlib import Path

from search.study.pareto import TrialPoint
from search.study.read import shown_front
from search.study.report import MARKERS, _figure

ROOT = Path(__file__).resolve().parents[2]
KEPT = ROOT / "bench" / "results" / "search_quality" / "digits-distorted-trial-pruning"
OUT = ROOT / "docs" / "assets" / "images" / "front.png"
TARGET = "cpu-ort-fp32"


def _points(name: str) -> list[TrialPoint]:
    kept = json.loads((KEPT / name).read_text())
    return [TrialPoint(**point) for point in kept["points"]]


def draw(out: Path = OUT, seed: int = 0) -> Path:
    searched, uniform = _points(f"tpe-s{seed}.json"), _points(f"uniform-s{seed}.json")
    base_us = next(p for p in uniform if p.trial == 0).latency_us[TARGET]
    figure = _figure(7.0, 4.2)
    axes = figure.add_subplot()
    marker, color = MARKERS["measured once"]
    axes.scatter([p.latency_us[TARGET] for p in searched], [p.error for p in searched], marker=marker,
                 facecolors="none", edgecolors=color, label=f"tpe search, every trial ({len(searched)})")
    front = shown_front(searched, TARGET)
    axes.step([p.latency_us[TARGET] for p in front], [p.error for p in front], where="post",
              color="tab:red", label=f"its front ({len(front)})")
    ladder = sorted(uniform, key=lambda p: p.latency_us[TARGET])
    axes.plot([p.latency_us[TARGET] for p in ladder], [p.error for p in ladder], marker="D", color="black",
              linestyle="--", label=f"uniform ladder, every group at one keep-ratio ({len(ladder)})")
    for p in ladder:
        if p.trial != 0:  # a rung's nominal keep-ratio: narrow groups round some of theirs down
            nominal = max(p.plan["channels"].values())
            axes.annotate(f"keep {nominal:g}", (p.latency_us[TARGET], p.error), textcoords="offset points",
                          xytext=(6, 2), fontsize=8)
    axes.axvline(base_us, color="tab:gray", linestyle=":", label=f"dense model {base_us:.0f} us")
    axes.set_xlabel(f"latency on {TARGET} (ONNX Runtime, 2-core CPU), us")
    axes.set_ylabel("error (digits-distorted validation)")
    axes.set_title("hwprune search against uniform pruning, digits-distorted, 50 trials")
    axes.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    return out


if __name__ == "__main__":
    print(draw())
