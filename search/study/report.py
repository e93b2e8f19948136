"""A stored search as a report: an HTML page and PNG plots, drawn with matplotlib.

matplotlib because it renders PNGs headless (the Agg canvas, no browser, no display, no
JavaScript), is one wheel with no service behind it, and a PNG opens anywhere: in a browser, a
notebook, a pull request. Optuna's own plots need plotly and pandas and render in a browser.

Plots: per target, error against latency with the front and how each figure was obtained
(confirmed by a second session, measured once, predicted by a latency model); the optimisation
history; the kept channels per group of the front's trials; latency against MACs (where the MAC
count mis-orders two trials, it would have misled a FLOPs-driven search).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search.errors import ConfigError
from search.storage import SearchRecord
from search.study.pareto import TrialPoint
from search.study.read import base_latency_us, pareto_rows, shown_front, summary, trial_points

DPI = 100


@dataclass
class Plot:
    """One PNG: its file, title, and how many points of each kind it draws (what a test checks)."""

    file: str
    title: str
    points: dict[str, int] = field(default_factory=dict)
    note: str = ""


def _figure(width: float = 7.0, height: float = 4.5) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError("hwprune report needs matplotlib: pip install 'hwprune[report]'") from exc
    # A Figure with no pyplot: no global state, no display, the Agg canvas on save.
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _kind(point: TrialPoint, target: str) -> str:
    first = point.first_session.get(target)
    if first is not None and getattr(first, "predicted", False):
        return "predicted"
    return "confirmed" if point.confirmed.get(target) else "measured once"


MARKERS = {"confirmed": ("o", "tab:blue"), "measured once": ("s", "tab:orange"), "predicted": ("^", "tab:purple")}


def _front_plot(points: list[TrialPoint], target: str, base_us: float, folder: Path, index: int,
                error_name: str = "error") -> Plot:
    figure = _figure()
    axes = figure.add_subplot()
    plot = Plot(f"front-{index}.png", f"Error against latency on {target}")
    feasible = [p for p in points if p.feasible and target in p.latency_us]
    infeasible = [p for p in points if not p.feasible and target in p.latency_us]
    if infeasible:
        axes.scatter([p.latency_us[target] for p in infeasible], [p.error for p in infeasible], marker="x",
                     color="tab:gray", label=f"infeasible ({len(infeasible)})")
        plot.points["infeasible"] = len(infeasible)
    for kind, (marker, color) in MARKERS.items():
        chosen = [p for p in feasible if _kind(p, target) == kind]
        if chosen:
            axes.scatter([p.latency_us[target] for p in chosen], [p.error for p in chosen], marker=marker,
                         facecolors="none", edgecolors=color, label=f"{kind} ({len(chosen)})")
            plot.points[kind] = len(chosen)
    front = shown_front(points, target)  # the `pareto` table's front: no unconfirmed prediction
    if front:
        axes.step([p.latency_us[target] for p in front], [p.error for p in front], where="post",
                  color="tab:red", label=f"front ({len(front)})")
        for p in front:
            axes.annotate(str(p.trial), (p.latency_us[target], p.error), textcoords="offset points",
                          xytext=(4, 4), fontsize=8)
        plot.points["front"] = len(front)
    axes.axvline(base_us, color="tab:gray", linestyle=":", label=f"base model {base_us:.0f} us")
    axes.set_xlabel(f"latency on {target}, us (confirmed figure where confirmed)")
    axes.set_ylabel(error_name)  # what the bundle's error measures
    axes.set_title(plot.title)
    axes.legend(fontsize=8)
    figure.savefig(folder / plot.file)
    return plot


def _history_plot(study: optuna.Study, record: SearchRecord, points: list[TrialPoint], folder: Path) -> Plot:
    figure = _figure()
    axes = figure.add_subplot()
    reward_mode = record.config.objective == "reward"
    error_name = record.base.error_name
    label = "reward (higher is better)" if reward_mode else f"{error_name} (lower is better)"
    plot = Plot("history.png", "Optimisation history")
    by_trial = {p.trial: p for p in points}
    xs = sorted(by_trial)
    ys = [(by_trial[n].reward if reward_mode else by_trial[n].error) for n in xs]
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
    feasible = [(x, y) for x, y in pairs if by_trial[x].feasible]
    infeasible = [(x, y) for x, y in pairs if not by_trial[x].feasible]
    if feasible:
        axes.scatter(*zip(*feasible, strict=True), color="tab:blue", label=f"feasible ({len(feasible)})")
    if infeasible:
        axes.scatter(*zip(*infeasible, strict=True), color="tab:gray", marker="x",
                     label=f"infeasible ({len(infeasible)})")
    best: list[float] = []
    for _x, y in feasible:
        best.append(y if not best else (max if reward_mode else min)(best[-1], y))
    if feasible:
        axes.step([x for x, _ in feasible], best, where="post", color="tab:red", label="best so far")
    failed = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
    if failed and pairs:
        low = min(y for _, y in pairs)
        axes.scatter(failed, [low] * len(failed), marker="v", color="black", label=f"failed ({len(failed)})")
        plot.points["failed"] = len(failed)
    plot.points |= {"feasible": len(feasible), "infeasible": len(infeasible)}
    axes.set_xlabel("trial (0 is the base model)")
    axes.set_ylabel(label)
    axes.set_title(plot.title)
    axes.legend(fontsize=8)
    figure.savefig(folder / plot.file)
    return plot


def _channels_plot(record: SearchRecord, front: list[TrialPoint], target: str, folder: Path) -> Plot:
    plot = Plot("channels.png", f"Kept width per group, front on {target}")
    figure, drawn = channels_figure(record.space.get("groups", []), front, plot.title)
    plot.points["kept"] = drawn
    figure.savefig(folder / plot.file)
    return plot


def channels_figure(groups: list[dict[str, Any]], front: list[TrialPoint], title: str) -> tuple[Any, int]:
    """Each front trial's kept width per group as a share of the group's full width, so heads
    (3 of 12) and channels (384 of 1536) read on one axis; the tick labels say which and how
    many. Returns the figure and the number of points drawn."""
    sizes = [(str(g["name"]), int(g["size"]), "heads" if "heads" in str(g.get("kind", "")) else "channels")
             for g in groups]
    figure = _figure(max(7.0, 0.6 * len(sizes) + 3), 5.0)
    axes = figure.add_subplot()
    positions = list(range(len(sizes)))
    axes.axhline(1.0, color="tab:gray", linestyle=":", label="base model")
    drawn = 0
    for point in front:
        shares = [point.kept.get(name, size) / size if size else 1.0 for name, size, _ in sizes]
        axes.plot(positions, shares, marker="o", label=f"trial {point.trial}")
        drawn += len(shares)
    axes.set_xticks(positions, [f"{name} ({size} {unit})" for name, size, unit in sizes], rotation=45,
                    ha="right", fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("kept share of the group's width")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    return figure, drawn


def _discordant_pairs(points: list[TrialPoint], target: str) -> tuple[int, int]:
    """Pairs of trials that MACs and latency order differently, of the pairs with different MACs."""
    discordant = total = 0
    for i, a in enumerate(points):
        for b in points[i + 1:]:
            if a.macs == b.macs:
                continue
            total += 1
            if (a.macs - b.macs) * (a.latency_us[target] - b.latency_us[target]) < 0:
                discordant += 1
    return discordant, total


def _macs_plot(points: list[TrialPoint], target: str, folder: Path) -> Plot:
    usable = [p for p in points if target in p.latency_us]
    discordant, total = _discordant_pairs(usable, target)
    plot = Plot("macs.png", f"Latency against MACs on {target}", {"trials": len(usable)},
                f"{discordant} of {total} pairs of trials are ordered differently by MACs than by latency")
    macs_figure(usable, target, f"{plot.title}\n{discordant} of {total} pairs of trials mis-ordered by MACs"
                ).savefig(folder / plot.file)
    return plot


def macs_figure(usable: list[TrialPoint], target: str, title: str) -> Any:
    """Latency against MACs, each trial labelled; ``title`` in short lines (one long line was
    cut off at the figure's edge)."""
    figure = _figure()
    axes = figure.add_subplot()
    axes.scatter([p.macs / 1e6 for p in usable], [p.latency_us[target] for p in usable], color="tab:blue")
    for p in usable:
        axes.annotate(str(p.trial), (p.macs / 1e6, p.latency_us[target]), textcoords="offset points",
                      xytext=(3, 3), fontsize=7)
    axes.set_xlabel("MACs (millions)")
    axes.set_ylabel(f"latency on {target}, us")
    axes.set_title(title, fontsize=10)
    return figure


def write_report(record: SearchRecord, study: optuna.Study, out: Path) -> dict[str, Any]:
    """Write ``out/index.html`` and its PNGs for a stored search; returns what was drawn."""
    points = trial_points(study, record)
    targets: list[str] = list(record.config.targets)
    base = base_latency_us(record, study)
    out.mkdir(parents=True, exist_ok=True)
    error_name = record.base.error_name
    plots = [_front_plot(points, t, base[t], out, i, error_name) for i, t in enumerate(targets)]
    plots.append(_history_plot(study, record, points, out))
    rows = [row.to_dict() for row in pareto_rows(record, study, targets[0])]  # as `hwprune pareto` shows it
    by_trial = {p.trial: p for p in points}
    plots.append(_channels_plot(record, [by_trial[row["trial"]] for row in rows], targets[0], out))
    plots.append(_macs_plot(points, targets[0], out))
    info = summary(record, study).to_dict()
    data = {"search": record.name, "plots": [plot.__dict__ for plot in plots], "summary": info, "pareto": rows}
    (out / "report.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    (out / "index.html").write_text(_page(record, info, rows, plots, targets[0]))
    return data


def _page(record: SearchRecord, info: dict[str, Any], rows: list[dict[str, Any]], plots: list[Plot],
          target: str) -> str:
    esc = html.escape
    table = "".join(
        f"<tr><td>{row['trial']}</td><td>{row['error']:.4f}</td><td>{row['latency_us'][target]:.1f}</td>"
        f"<td>{row['speedup'][target]:.2f}x</td><td>{'confirmed' if row['confirmed'][target] else 'measured once'}"
        f"</td><td>{row['macs'] / 1e6:.2f}</td></tr>"
        for row in rows
    )
    figures = "".join(
        f'<figure><img src="{esc(p.file)}" alt="{esc(p.title)}"><figcaption>{esc(p.title)}'
        f"{': ' + esc(p.note) if p.note else ''}</figcaption></figure>"
        for p in plots
    )
    states = ", ".join(f"{count} {state.lower()}" for state, count in sorted(info["trials"].items()))
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>hwprune search {esc(record.name)}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}img{max-width:100%}"
        "td,th{padding:0 .6em;text-align:right}</style></head><body>"
        f"<h1>Search {esc(record.name)}</h1>"
        f"<p>{esc(record.config.objective)}, sampler {esc(record.config.sampler)}, targets "
        f"{esc(', '.join(record.config.targets))}; trials: {esc(states)} (trial 0 is the base model); "
        f"{info['feasible']} feasible, {info['infeasible']} infeasible.</p>"
        f"<h2>Pareto front on {esc(target)}</h2><table><tr><th>trial</th><th>error</th><th>latency us</th>"
        f"<th>speedup</th><th>latency</th><th>MACs (M)</th></tr>{table}</table>"
        f"{figures}</body></html>\n"
    )
