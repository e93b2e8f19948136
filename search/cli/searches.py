"""``hwprune search``, ``pareto``, ``db`` and ``demo``: the commands over stored searches.

Registered on the app of ``search.cli._app`` when that module is imported.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from search.cli._app import (
    HELP,
    DbOpt,
    DeviceOpt,
    JsonOpt,
    api_settings,
    app,
    echo_json,
    handle_errors,
    output_errors,
    state,
    stderr,
    stdout,
)
from search.config import DEFAULT_PROFILE, SearchConfig, db_url, load_search_config
from search.examples import EXAMPLES

search_app = typer.Typer(help="Start, resume, join and inspect searches.", no_args_is_help=True, **HELP)  # type: ignore[arg-type]
db_app = typer.Typer(help="Database schema.", no_args_is_help=True, **HELP)  # type: ignore[arg-type]
app.add_typer(search_app, name="search")
app.add_typer(db_app, name="db")

WorkersOpt = Annotated[int, typer.Option("--workers", min=1, max=64, help="Worker processes on this machine.")]


MaxFailuresOpt = Annotated[int | None, typer.Option(
    "--max-failures", min=1, help="Stop after this many trials fail in a row (default 5).")]
WaitOpt = Annotated[bool, typer.Option("--wait-for-agents", help="Start even if no agent serves a remote target yet.")]


def require_database(url: str) -> None:
    # Imported on use: SQLAlchemy is in hwprune[search], and `hwprune agent` runs without it.
    from search.storage.repository import require_database as check

    check(url)


# --- db ---------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(db: DbOpt = None) -> None:
    """Migrate hwprune's tables to this version's schema (Optuna's tables are left alone)."""
    with handle_errors():
        from search.storage import current_revision, head_revision, make_engine, upgrade

        url = db_url(db or state.db)
        engine = make_engine(url)
        before = current_revision(engine)
        upgrade(url)
        after = current_revision(engine)
        engine.dispose()
        typer.echo(f"schema {before or 'empty'} -> {after} (head {head_revision()})")


@db_app.command("prune-artifacts", short_help="Remove ONNX artifacts no job or front needs.")
def db_prune_artifacts(
    db: DbOpt = None,
    min_age: Annotated[float, typer.Option("--min-age", min=0, help="Spare artifacts younger than this "
                                           "many seconds (a worker may be about to queue its job).")] = 600.0,
) -> None:
    """Remove ONNX artifacts that no queued job, base model or Pareto front needs (a trial's
    artifact is re-made from its plan, and checked against its sha256, when needed again)."""
    with handle_errors():
        from search.api import prune_artifacts

        report = prune_artifacts(min_age_s=min_age, settings=api_settings(db))
        typer.echo(f"removed {report.removed} artifacts ({report.freed_bytes / 1e6:.1f} MB), kept {report.kept}")


@db_app.command("current")
def db_current(db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Show the database's schema revision and the one this hwprune expects."""
    with handle_errors():
        from search.storage import current_revision, head_revision, make_engine

        url = db_url(db or state.db)
        require_database(url)  # connecting would create a missing SQLite file
        engine = make_engine(url)
        current = current_revision(engine)
        engine.dispose()
        if as_json:
            echo_json({"database": current, "expected": head_revision(), "current": current == head_revision()})
            return
        typer.echo(f"database {current or 'empty'}, expected {head_revision()}")


# --- running ---------------------------------------------------------------------------------


@contextmanager
def _display(name: str, total: int | None, *, as_json: bool, trials: bool = True) -> Iterator[dict[str, Any]]:
    """A progress bar over a search's trials (``trials``) and a line per confirmation, on a
    terminal: the callbacks ``search.api.run_search`` takes."""
    console = stderr()
    quiet = as_json or not console.is_terminal
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=console, disable=quiet or not trials)
    task = bar.add_task(f"search {name}", total=total, status="")

    def on_trial(now: Any) -> None:
        best = f"best reward {now.best_reward:.4f}" if now.best_reward is not None else "no result yet"
        bar.update(task, completed=now.counted, status=f"{best}, Pareto {now.front_size}")
        if now.asked is not None and now.counted >= now.asked:
            bar.stop()  # the confirmation and the final recovery show progress of their own

    def on_confirmed(trial: int, target: str, verdict: Any) -> None:
        if not quiet:
            console.print(f"trial {trial} on {target}: ratio " + " / ".join(f"{s.ratio:.3f}" for s in verdict.sessions)
                          + f" -> {verdict.ratio:.3f}", highlight=False)

    with bar:
        yield {"on_trial": on_trial, "on_confirmed": on_confirmed}


def _show_result(result: Any, *, as_json: bool) -> None:
    """What a finished run prints: the summary line, feasibility, the front, warnings."""
    if as_json:
        echo_json(result.to_dict())
        return
    info = result.summary.to_dict()
    target = info["targets"][0]
    out = stdout()
    best = "none" if info["best_reward"] is None else f"{info['best_reward']:.4f} (trial {info['best_trial']})"
    out.print(f"search {info['name']}: {info['completed']} trials completed ({_states(info)}; trial 0 is the "
              f"base model), best reward {best}", highlight=False)
    feasibility = _feasibility_line(info)
    if feasibility:
        out.print(feasibility, highlight=False, markup=False)
    _print_pareto([row.to_dict() for row in result.pareto], info["name"], target)
    for warning in result.warnings:
        stderr().print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)


def _states(info: dict[str, Any]) -> str:
    return ", ".join(f"{count} {state.lower()}" for state, count in sorted(info["trials"].items())) or "none"


def _feasibility_line(info: dict[str, Any]) -> str | None:
    """'3 of 6 completed trials feasible; infeasible: latency_budget_ratio <= 0.5 broken by 3', or None
    when the search has no constraints."""
    if not info["constraints"]:
        return None
    limits = ", ".join(f"{k} {v:g}" for k, v in info["constraints"].items())
    why = ", ".join(f"{name} broken by {count}" for name, count in info["infeasible_by_constraint"].items())
    return (f"constraints ({limits}): {info['feasible']} of {info['completed']} completed trials feasible"
            + (f"; infeasible: {why}" if why else "") + "; infeasible trials are never on a front")


@search_app.command("start")
def search_start(
    name: Annotated[str | None, typer.Option("--name", help="Search name (resumes it if it exists).")] = None,
    config_file: Annotated[Path | None, typer.Option(
        "--config", help="Search config YAML (`hwprune search config --schema` lists its fields).")] = None,
    example: Annotated[str | None, typer.Option("--example", help=f"Built-in example: {', '.join(EXAMPLES)}.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Plugin package.module:function.")] = None,
    profile: Annotated[list[str] | None, typer.Option(
        "--profile", "-p", help="Target profile (repeatable; the first is primary). Default: cpu-ort-fp32.")] = None,
    target: Annotated[list[str] | None, typer.Option("--target", hidden=True, help="Old name of --profile.")] = None,
    objective: Annotated[str | None, typer.Option(help="reward or pareto. Default: reward.")] = None,
    sampler: Annotated[str | None, typer.Option(help="tpe, amc, nsga2, random or netadapt. Default: tpe.")] = None,
    sensitivity_start: Annotated[bool | None, typer.Option(
        "--sensitivity-start", help="Scan each group's sensitivity first; enqueue the uniform ladder "
                                    "and greedy plans from it.")] = None,
    final_steps: Annotated[int | None, typer.Option(
        "--final-steps", min=0, help="Fine-tuning steps of the final recovery of the Pareto set. Default: 0.")] = None,
    trial_pruning: Annotated[str | None, typer.Option(
        "--trial-pruning", help="none or median: measure latency first and stop a trial before fine-tuning "
                                "when its reward is below the median of completed trials'. Default: none.")] = None,
    trials: Annotated[int | None, typer.Option(
        help="Trials to reach, trial 0 (the dense base model) included: N trials are the base "
             "and N-1 pruned candidates; a trial stopped by --trial-pruning counts. Default: 20.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Time budget of this run, seconds. Default: none.")] = None,
    latency_budget_us: Annotated[float | None, typer.Option(
        help="Constraint: latency on the primary target, us. Default: none.")] = None,
    latency_budget_ratio: Annotated[float | None, typer.Option(
        help="Constraint: latency over the base model's, in (0, 1]. Default: none.")] = None,
    error_ceiling: Annotated[float | None, typer.Option(
        help="Constraint: highest error allowed. Default: none.")] = None,
    error_floor: Annotated[float | None, typer.Option(
        help="Reward: errors below this count as equal, so the fastest of them wins "
             "(default: the base model's error + 0.01).")] = None,
    recovery_steps: Annotated[int | None, typer.Option(help="Fine-tuning steps per trial. Default: 30.")] = None,
    importance: Annotated[str | None, typer.Option(
        help="magnitude, taylor, lamp, bn-scale, llm-pruner or movement. Default: magnitude.")] = None,
    nm_criterion: Annotated[str | None, typer.Option(
        "--nm-criterion", help="N:M masks: magnitude, wanda or sparsegpt. Default: magnitude.")] = None,
    compensation: Annotated[str | None, typer.Option(
        help="none, or mean: removed channels' average output goes back into the layers they fed. "
             "Default: none (mean for a pretrained built-in example).")] = None,
    ignore: Annotated[list[str] | None, typer.Option(
        "--ignore", help="Layer never to prune (repeatable). Default: none.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampler and recovery seed. Default: 0.")] = None,
    latency: Annotated[str | None, typer.Option(
        "--latency", help="measured (default: every new architecture timed), hybrid (predicted where the "
                          "predictor is trusted and the trial cannot reach a front) or predicted.")] = None,
    max_failures: MaxFailuresOpt = None,
    workers: WorkersOpt = 1,
    wait_for_agents: WaitOpt = False,
    device: DeviceOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a search (or resume it when one of that name exists with a compatible config)."""
    with handle_errors():
        config = load_search_config(config_file, {
            "name": name, "example": example, "model": model, "targets": (profile or []) + (target or []) or None,
            "ignored_layers": ignore,
            "objective": objective, "sampler": sampler, "trials": trials, "timeout_s": timeout, "latency": latency,
            "constraints": {"latency_budget_us": latency_budget_us,
                            "latency_budget_ratio": latency_budget_ratio,
                            "error_ceiling": error_ceiling},
            "recovery": {"steps": recovery_steps}, "importance": importance,
            "nm_criterion": nm_criterion, "compensation": compensation, "seed": seed,
            "max_consecutive_failures": max_failures, "error_floor": error_floor,
            "sensitivity_start": sensitivity_start, "final_steps": final_steps, "trial_pruning": trial_pruning,
            "device": device,
        })
        from search.api import run_search

        with _display(config.name, config.trials, as_json=as_json) as shown:
            result = run_search(config, workers=workers, settings=api_settings(db), wait_for_agents=wait_for_agents,
                                debug=state.debug, **shown)
        _show_result(result, as_json=as_json)


@search_app.command("resume")
def search_resume(
    name: Annotated[str, typer.Argument(help="Search name.")],
    trials: Annotated[int | None, typer.Option(
        help="New number of completed trials to reach, trial 0 (the base model) included. Default: as stored.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Time budget of this run, seconds.")] = None,
    max_failures: MaxFailuresOpt = None,
    workers: WorkersOpt = 1,
    wait_for_agents: WaitOpt = False,
    device: DeviceOpt = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Resume a stored search with its stored configuration."""
    with handle_errors():
        from search.api import resume_search

        with _display(name, trials, as_json=as_json) as shown:
            result = resume_search(name, trials=trials, timeout_s=timeout, max_consecutive_failures=max_failures,
                                   workers=workers, settings=api_settings(db), wait_for_agents=wait_for_agents,
                                   debug=state.debug, device=device, **shown)
        _show_result(result, as_json=as_json)


@search_app.command("worker")
def search_worker(
    name: Annotated[str, typer.Argument(help="Search name.")],
    db: DbOpt = None,
    worker_index: Annotated[int, typer.Option(help="Distinct per worker: seeds its sampler.")] = 0,
    device: DeviceOpt = None,
) -> None:
    """Join a search as one more worker (PostgreSQL for workers on several machines)."""
    with handle_errors():
        from search.api import run_worker

        run_worker(name, worker_index=worker_index, device=device, settings=api_settings(db))


@search_app.command("list")
def search_list(db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """List the searches in the database."""
    with handle_errors():
        from search.api import list_searches

        rows = [info.to_dict() for info in list_searches(settings=api_settings(db))]
        if as_json:
            echo_json(rows)
            return
        table = Table("name", "targets", "objective", "sampler", "completed", "asked", "best reward", "created")
        for row in rows:
            table.add_row(row["name"], ",".join(row["targets"]), row["objective"], row["sampler"],
                          str(row["completed"]), str(row["trials_asked"]),
                          "-" if row["best_reward"] is None else f"{row['best_reward']:.4f}",
                          row["created_at"][:19])
        stdout().print(table)


@search_app.command("status")
def search_status(name: Annotated[str, typer.Argument(help="A stored search.")], db: DbOpt = None,
                  as_json: JsonOpt = False) -> None:
    """One search's progress: trials by state, feasibility, failures, best reward, base figures."""
    with handle_errors():
        from search.api import status

        info = status(name, settings=api_settings(db)).to_dict()
        if as_json:
            echo_json(info)
            return
        _print_status(info)


@search_app.command("confirm")
def search_confirm(name: Annotated[str, typer.Argument(help="Search name.")], db: DbOpt = None,
                   as_json: JsonOpt = False) -> None:
    """Measure the front's unconfirmed trials again (a search does this when it ends)."""
    with handle_errors():
        from search.api import confirm

        with _display(name, None, as_json=as_json, trials=False) as shown:
            result = confirm(name, on_confirmed=shown["on_confirmed"], settings=api_settings(db))
        _show_result(result, as_json=as_json)


def _print_status(info: dict[str, Any]) -> None:
    out = stdout()
    asked = info["trials_asked"] if info["trials_asked"] is not None else "no limit"
    lines = [
        f"search {info['name']} ({info['objective']}, sampler {info['sampler']}, targets "
        f"{', '.join(info['targets'])}; created {info['created_at'][:19]})",
        f"trials: {_states(info)}; asked for {asked} completed{' or pruned' if 'PRUNED' in info['trials'] else ''} "
        "(trial 0 is the base model)",
        _feasibility_line(info) or f"constraints: none ({info['completed']} completed trials, all feasible)",
        f"confirmed by a second session: {info['confirmed_trials']} trials",
        f"base model: error {info['base_error']:.4g}, latency "
        + ", ".join(f"{t} {us:.1f} us" for t, us in info["base_latency_us"].items()),
        f"reward error floor: {info['error_floor']:.4g}; best reward: "
        + ("none" if info["best_reward"] is None else f"{info['best_reward']:.4f} (trial {info['best_trial']})"),
    ]
    for stage, failure in sorted(info["failures_by_stage"].items()):
        lines.append(f"failed at {stage}: {failure['count']} (first: trial {failure['first_trial']}, "
                     f"{failure['first_reason']})")
    if info["stage_median_s"]:
        lines.append("median seconds per trial stage: "
                     + ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in info["stage_median_s"].items()))
    for line in lines:
        out.print(line, highlight=False, markup=False)


@search_app.command("config")
def search_config(
    schema: Annotated[bool, typer.Option("--schema", help="Print the config file's JSON schema.")] = False,
    check: Annotated[Path | None, typer.Option("--check", help="Validate this config file and say so.")] = None,
) -> None:
    """A commented example of a search config file (for --config), its JSON schema, or a check of one."""
    with handle_errors():
        from search.config import CONFIG_EXAMPLE

        if check is not None:
            config = load_search_config(check, {})
            typer.echo(f"ok: {check} (search {config.name}, {config.model_spec}, targets {', '.join(config.targets)})")
        elif schema:
            echo_json(SearchConfig.model_json_schema())
        else:
            typer.echo(CONFIG_EXAMPLE.rstrip())


@search_app.command("trials")
def search_trials(name: Annotated[str, typer.Argument(help="Search name.")], db: DbOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Every trial of a search: state, kept channels, error, latency, feasibility."""
    with handle_errors():
        from search.api import trials

        rows = [row.to_dict() for row in trials(name, settings=api_settings(db))]
        if as_json:
            echo_json(rows)
            return
        table = Table("trial", "state", "error", "latency us", "speedup", "feasible", "MACs (M)", "kept channels")
        for row in rows:
            primary = next(iter(row.get("latency_us", {}) or {}), None)
            kept = row.get("kept") or {}
            table.add_row(
                str(row["trial"]) + (" (base)" if row["base"] else ""), row["state"],
                f"{row['error']:.4f}" if "error" in row else "-",
                f"{row['latency_us'][primary]:.1f}" if primary else "-",
                f"{row['speedup'][primary]:.2f}x" if primary and primary in row["speedup"] else "-",
                ("yes" if row["feasible"] else "no: " + ", ".join(row["violated"])) if "feasible" in row else "-",
                f"{row['macs'] / 1e6:.2f}" if "macs" in row else "-",
                " ".join(str(v) for v in kept.values()) if kept else (row.get("fail_stage") or "-"),
            )
        stdout().print(table)


# --- Pareto -----------------------------------------------------------------------------------


def _print_pareto(rows: list[dict[str, Any]], name: str, target: str) -> None:
    # Columns named after what the error measures; 1 - error only where it is a figure of its own.
    error_name = rows[0].get("error_name", "error") if rows else "error"
    score = rows[0].get("score_name") if rows else None
    scored = [score, f"Δ{score} (pts)"] if score else []
    table = Table("trial", error_name, *scored, f"latency us ({target})", "speedup",
                  "95% range", "latency", "MACs (M)", "params (M)",
                  title=f"Pareto front: {error_name} x latency on {target}")
    final = any(row.get("final_error") is not None for row in rows)
    if final:
        steps = max(row["final_steps"] or 0 for row in rows)
        table.add_column(f"final {score or error_name} ({steps} steps)")
    for row in rows:
        low, high = row["speedup_interval"][target]
        also = row.get("trials", [row["trial"]])[1:]
        figures = [f"{100 * row['accuracy']:.2f}%", f"{100 * row['accuracy_change']:+.2f}"] if score else []
        final_figure = row["final_accuracy"] if score else row["final_error"]
        table.add_row(str(row["trial"]) + (f" (={', '.join(map(str, also))})" if also else ""),
                      f"{row['error']:.4f}", *figures, f"{row['latency_us'][target]:.1f}",
                      f"{row['speedup'][target]:.2f}x", f"{low:.2f}-{high:.2f}x" if high else "-",
                      "confirmed" if row["confirmed"][target] else "[yellow]unconfirmed[/yellow]",
                      f"{row['macs'] / 1e6:.2f}", f"{row['params'] / 1e6:.3f}",
                      *([] if not final else ["-" if final_figure is None
                                              else f"{100 * final_figure:.2f}%" if score else f"{final_figure:.4f}"]))
    stdout().print(table)
    if any(len(row.get("trials", ())) > 1 for row in rows):
        stdout().print("(=N): later trials that reached the same architecture with the same figures",
                       highlight=False)
    if any(not row["confirmed"][target] for row in rows):
        stdout().print(f"unconfirmed: measured in one session only; `hwprune search confirm {name}` "
                        "measures them again", highlight=False)


@app.command("pareto")
def pareto_command(
    name: Annotated[str, typer.Argument(help="Search name.")],
    profile: Annotated[str | None, typer.Option(
        "--profile", "-p", help="Target profile; default the search's primary.")] = None,
    target: Annotated[str | None, typer.Option("--target", hidden=True, help="Old name of --profile.")] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The non-dominated feasible trials of a search on error x latency for one target."""
    with handle_errors():
        from search.api import pareto, status

        settings = api_settings(db)
        info = status(name, settings=settings).to_dict()
        chosen = profile or target or info["targets"][0]
        rows = [row.to_dict() for row in pareto(name, target=chosen, settings=settings)]
        if as_json:
            echo_json(rows)
            return
        _print_pareto(rows, name, chosen)
        feasibility = _feasibility_line(info)
        if feasibility:
            stdout().print(feasibility, highlight=False, markup=False)


def export_from_search(
    name: str, *, trial: int | None, pareto: bool, out: Path, finetune_steps: int, force: bool,
    as_json: bool, settings: Any, device: str | None = None,
) -> None:
    """``hwprune export NAME --trial K | --pareto``: rebuild stored trials and write them out."""
    from search.api import export_trials

    console = stderr()
    quiet = as_json or not console.is_terminal
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=quiet)
    done: list[int] = []

    def written(number: int, folder: Path) -> None:
        done.append(number)
        if not as_json:
            stdout().print(f"trial {number}: wrote {folder}", highlight=False)
        progress.advance(task)

    with progress, output_errors(out):
        task = progress.add_task(f"export {name}", total=1 if trial is not None else None)

        def confirmed(number: int, target: str, verdict: Any) -> None:
            progress.update(task, description=f"confirming trial {number} on {target}")

        def total(count: int) -> None:
            progress.update(task, total=count, description=f"export {name}")

        manifests = export_trials(name, out, trial=trial, front=pareto, finetune_steps=finetune_steps,
                                  force=force, on_trial=written, on_confirmed=confirmed, on_total=total,
                                  device=device, settings=settings)
    if as_json:
        echo_json(manifests)


@app.command("report", short_help="An HTML page with PNG plots of a search.")
def report_command(
    name: Annotated[str, typer.Argument(help="Search name.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (must be empty or new, unless --force).")],
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --out folder.")] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """An HTML page with PNG plots: the front per target, the optimisation history, kept channels
    of the front's trials, latency against MACs."""
    with handle_errors():
        from search.api import report

        with output_errors(out):
            data = report(name, out, force=force, settings=api_settings(db))
        if as_json:
            echo_json({"index": str(out / "index.html"), "plots": data["plots"]})
            return
        stdout().print(f"wrote {out / 'index.html'} with {len(data['plots'])} plots", highlight=False)


# --- demo -------------------------------------------------------------------------------------


@app.command("demo")
def demo(
    db: DbOpt = None,
    trials: Annotated[int, typer.Option(help="Completed trials, trial 0 (the base model) included.", min=2)] = 24,
    name: Annotated[str, typer.Option(help="Search name.")] = "demo-digits",
) -> None:
    """A real search on the built-in digits example, on cpu-ort-fp32, then its Pareto table."""
    with handle_errors():
        from search.api import run_search

        config = load_search_config(None, {
            "name": name, "example": "digits", "targets": [DEFAULT_PROFILE], "trials": trials,
            "sampler": "tpe", "recovery": {"steps": 40}, "timeout_s": 540,
        })
        settings = api_settings(db)
        started = time.perf_counter()
        with _display(config.name, config.trials, as_json=False) as shown:
            result = run_search(config, settings=settings, debug=state.debug, **shown)
        _show_result(result, as_json=False)
        stdout().print(
            f"{time.perf_counter() - started:.0f} s; database {settings.db_url}; "
            f"export the front with `hwprune export {name} --pareto --out models/`",
            highlight=False,
        )
