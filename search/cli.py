"""The ``hwprune`` command line. The only module that prints or sets up logging handlers.

Exit status: 0 success, 2 bad usage or input (the error's ``exit_code``), 1 a failure at run
time. Known errors print one red line; anything else is a bug, shown in full under ``--debug``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hardware_profiles import ProfileError, discover, load_profile_file
from latency_models import LatencyError
from search.config import cache_dir, check_backend, profile_dirs, resolve_profile
from search.errors import ConfigError, SearchError

app = typer.Typer(
    name="hwprune",
    help="Hardware-aware pruning search, scored on latency measured on real targets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
profiles_app = typer.Typer(help="List, show and validate hardware profiles.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")

_KNOWN_ERRORS = (ProfileError, LatencyError, SearchError)


@dataclass
class _State:
    debug: bool = False
    profile_dirs: list[Path] = field(default_factory=list)


_state = _State()


def _stdout() -> Console:
    # Off a terminal rich assumes 80 columns and would fold the tables; logs and CI are wider.
    return Console(soft_wrap=True, emoji=False, width=None if sys.stdout.isatty() else 160)


def _stderr() -> Console:
    return Console(stderr=True, soft_wrap=True, emoji=False)


_SQL_NOISE = re.compile(r"\[(SQL|parameters): .*?\](?=\s*(\[|\(Background|$))|\(Background on this error at: [^)]*\)",
                        re.S)


def one_line(message: str, limit: int = 600) -> str:
    """A message fit for one terminal line: SQLAlchemy's statement dumps and links dropped,
    whitespace folded, control characters removed, long text cut."""
    from latency_models.wire import clean_text

    text = " ".join(_SQL_NOISE.sub("", message).split())
    text = clean_text(text, limit + 1)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def _handle_errors() -> Iterator[None]:
    try:
        yield
    except typer.Exit:
        raise
    except _KNOWN_ERRORS as exc:
        if _state.debug:
            raise
        _stderr().print(f"[red]error:[/red] {escape(one_line(str(exc)))}", highlight=False, markup=True)
        raise typer.Exit(getattr(exc, "exit_code", 1)) from None
    except KeyboardInterrupt:
        _stderr().print("[red]interrupted[/red]")
        raise typer.Exit(130) from None
    except Exception as exc:
        if _state.debug:
            raise
        _stderr().print(
            f"[red]internal error:[/red] {type(exc).__name__}: {escape(one_line(str(exc)))} (run with --debug for the "
            "traceback, and please report it)",
            highlight=False,
        )
        raise typer.Exit(1) from None


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, sort_keys=True))


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    profiles_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--profiles-dir",
            help="Folder of extra hardware profiles (repeatable); default $HWPRUNE_PROFILES.",
        ),
    ] = None,
) -> None:
    _state.debug = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    _state.profile_dirs = profile_dirs(profiles_dir)


# --- profiles ---------------------------------------------------------------------------------


@profiles_app.command("list")
def profiles_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List every hardware profile, built-in and the user's."""
    with _handle_errors():
        rows: list[dict[str, Any]] = []
        for name, source in discover(_state.profile_dirs).items():
            profile = load_profile_file(source.path)
            rows.append(
                {
                    "name": name,
                    "backend": profile.backend,
                    "device_class": profile.device_class,
                    "location": profile.location,
                    "precision": profile.precision,
                    "sparsity_patterns": list(profile.sparsity_patterns),
                    "channel_multiple": profile.channel_multiple,
                    "source": "built-in" if source.builtin else str(source.path),
                }
            )
        if as_json:
            _echo_json(rows)
            return
        table = Table("name", "backend", "device", "where", "precision", "N:M", "round to", "source")
        for row in rows:
            table.add_row(
                row["name"],
                row["backend"],
                row["device_class"],
                row["location"],
                row["precision"],
                ",".join(row["sparsity_patterns"]) or "-",
                str(row["channel_multiple"]),
                row["source"],
            )
        _stdout().print(table)


@profiles_app.command("show")
def profiles_show(
    name: Annotated[str, typer.Argument(help="Profile name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show every setting of one profile, defaults included."""
    with _handle_errors():
        profile = resolve_profile(name, _state.profile_dirs)
        data = profile.model_dump(mode="json")
        data["fingerprint"] = profile.fingerprint()
        if as_json:
            _echo_json(data)
            return
        import yaml

        typer.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@profiles_app.command("validate")
def profiles_validate(
    files: Annotated[list[Path], typer.Argument(help="Profile YAML files to check.")],
) -> None:
    """Check profile files against the schema and the known backends."""
    with _handle_errors():
        for path in files:
            profile = load_profile_file(path)
            check_backend(profile)
            typer.echo(f"ok: {path} ({profile.backend} on {profile.device_class}, {profile.location})")


# --- measure ----------------------------------------------------------------------------------


@app.command("measure")
def measure(
    model: Annotated[Path, typer.Argument(help="The ONNX model to time.")],
    profile_name: Annotated[str, typer.Option("--profile", "-p", help="Hardware profile.")],
    vs: Annotated[
        Path | None,
        typer.Option("--vs", help="Reference ONNX model timed interleaved; reports the ratio."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Measure the latency of an ONNX model on a local hardware profile."""
    from latency_models import registry

    with _handle_errors():
        profile = resolve_profile(profile_name, _state.profile_dirs)
        if profile.location == "remote":
            raise ConfigError(
                f"profile {profile.name!r} is measured on a remote device; "
                "pick a local profile (hwprune profiles list)"
            )
        for path in (model, *([vs] if vs is not None else [])):
            _check_input_sizes(path, profile)
        with registry.get(profile.backend)(profile) as backend:
            if vs is None:
                result = backend.measure(model)
                data = result.to_dict()
            else:
                paired = backend.measure_paired(model, vs)
                data = paired.to_dict()
        if as_json:
            _echo_json(data)
            return
        _print_measurement(data)


MAX_INPUT_BYTES = 1 << 30


def _check_input_sizes(model: Path, profile: Any) -> None:
    """Refuse a model whose inputs, with the profile's batch size and dimension values, would
    need more than MAX_INPUT_BYTES of memory: the backend would allocate them before timing."""
    import math

    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    from latency_models import ArtifactError
    from latency_models.ort import resolve_shape

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:
        return  # missing or not ONNX: the backend says so, by name
    initializers = {init.name for init in proto.graph.initializer}
    for node in proto.graph.input:
        if node.name in initializers or not node.type.HasField("tensor_type"):
            continue
        tensor = node.type.tensor_type
        dims: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
        ]
        shape = resolve_shape(node.name, dims, profile)
        try:
            itemsize = tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
        except (KeyError, ValueError, TypeError):
            itemsize = 8
        size = math.prod(shape) * itemsize
        if size > MAX_INPUT_BYTES:
            raise ArtifactError(
                f"{model.name}: input {one_line(node.name, 80)!r} of shape {list(shape)} needs "
                f"{size / 2**30:.3g} GiB, over the {MAX_INPUT_BYTES >> 30} GiB this command allows; "
                "lower the profile's batch_size or dim_values, or export the model with smaller inputs"
            )


def _writable_folder(out: Path) -> None:
    """Refuse an ``--out`` that cannot become a folder before minutes of work (nothing is
    created here: a refused export leaves no folder behind)."""
    import os

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder (it is created if missing)")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create --out folder {str(out)!r}: {str(parent)!r} is a file; "
                          "give a folder you can write to")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create --out folder {str(out)!r}: {str(parent)!r} is not writable; "
                          "give a folder you can write to")


@contextmanager
def output_errors(out: Path) -> Iterator[None]:
    """Writing the export: a file system that refuses (read-only, full, /proc) is the user's to fix."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(f"cannot write to --out {str(out)!r}: {exc.strerror or exc}; "
                          "give a folder you can write to") from None


def _print_measurement(data: dict[str, Any]) -> None:
    out = _stdout()
    out.print(
        f"{data['profile']}: median {data['median_us']:.1f} us "
        f"(95% CI {data['ci_low_us']:.1f}-{data['ci_high_us']:.1f}), "
        f"p10 {data['p10_us']:.1f}, p90 {data['p90_us']:.1f}, n={data['n']}"
        + ("" if data["converged"] else " [yellow](precision target not reached)[/yellow]"),
        highlight=False,
    )
    if "ratio" in data:
        low, high = data["ratio_ci"]
        out.print(
            f"ratio to reference: {data['ratio']:.4f} (95% CI {low:.4f}-{high:.4f}), "
            f"reference median {data['reference']['median_us']:.1f} us",
            highlight=False,
        )
    out.print(
        f"{data['backend']} {data['backend_version']} on {data['device']}, "
        f"threads={data['threads']}",
        highlight=False,
        style="dim",
    )


# --- space and export -------------------------------------------------------------------------

ExampleOpt = Annotated[
    str | None, typer.Option("--example", help="Built-in example model: digits.")
]
ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Model plugin as package.module:function.")
]
ProfilesOpt = Annotated[
    list[str] | None,
    typer.Option("--profile", "-p", help="Target profile (repeatable); default cpu-ort-fp32."),
]
IgnoreOpt = Annotated[
    list[str] | None, typer.Option("--ignore", help="Layer never to prune (repeatable).")
]


def _bundle(example: str | None, model: str | None) -> Any:
    from search.bundle import load_bundle

    if (example is None) == (model is None):
        raise ConfigError("give exactly one of --example NAME or --model package.module:function")
    return load_bundle(example or model or "", cache_dir=cache_dir())


def _profiles(names: list[str] | None) -> list[Any]:
    return [resolve_profile(n, _state.profile_dirs) for n in (names or ["cpu-ort-fp32"])]


@app.command("space")
def space_command(
    example: ExampleOpt = None,
    model: ModelOpt = None,
    profile: ProfilesOpt = None,
    ignore: IgnoreOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the pruning space of a model for the given targets."""
    with _handle_errors():
        from search.space import build_space

        bundle = _bundle(example, model)
        profiles = _profiles(profile)
        space = build_space(bundle.model, bundle.example_input, profiles, ignored=ignore or ())
        if as_json:
            _echo_json(space.to_dict() | {"fingerprint": space.fingerprint()})
            return
        nm = {s.layer: ",".join(s.patterns) for s in space.sparsity}
        table = Table("group", "kind", "size", "kept options", "MAC share", "members")
        for g in space.groups:
            table.add_row(g.name, g.kind, str(g.size), " ".join(map(str, g.kept)),
                          f"{100 * g.mac_share:.1f}%", " ".join(g.members))
        out = _stdout()
        out.print(table)
        out.print(
            f"{len(space.groups)} groups, rounded to multiples of {space.channel_multiple}; "
            f"output layer {space.output_layer!r} kept; base {space.base_macs / 1e6:.2f} M MACs, "
            f"{space.base_params / 1e6:.3f} M params",
            highlight=False,
        )
        if nm:
            out.print("N:M eligible: " + ", ".join(f"{k} ({v})" for k, v in nm.items()), highlight=False)
        else:
            out.print("N:M: no target runs N:M faster, so none is offered", highlight=False)
        for name, why in space.fixed.items():
            out.print(f"fixed: {name}: {why}", highlight=False, style="dim")


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    search_name: Annotated[
        str | None, typer.Argument(metavar="[SEARCH]", help="A stored search to export trials of.")
    ] = None,
    trial: Annotated[int | None, typer.Option("--trial", help="With SEARCH: the trial number.")] = None,
    pareto: Annotated[bool, typer.Option("--pareto", help="With SEARCH: every Pareto trial.")] = False,
    db: Annotated[str | None, typer.Option("--db", help="With SEARCH: database URL.")] = None,
    plan_file: Annotated[Path | None, typer.Option("--plan", help="Plan YAML/JSON to materialise.")] = None,
    example: ExampleOpt = None,
    model: ModelOpt = None,
    profile: ProfilesOpt = None,
    ignore: IgnoreOpt = None,
    importance: Annotated[str, typer.Option(help="magnitude, taylor, lamp or bn-scale.")] = "magnitude",
    finetune_steps: Annotated[int, typer.Option(help="Recovery fine-tuning steps.", min=0)] = 0,
    dynamo: Annotated[bool, typer.Option(help="Use the dynamo ONNX exporter.")] = False,
) -> None:
    """Write ONNX, a reloadable PyTorch state, the plan and a manifest: for a stored search's
    trial(s) (SEARCH --trial K | --pareto), or for a plan file on a model (--plan)."""
    with _handle_errors():
        _writable_folder(out)
        if search_name is not None:
            from search.cli_search import export_from_search

            export_from_search(search_name, trial=trial, pareto=pareto, out=out,
                               finetune_steps=finetune_steps, db=db)
            return
        if plan_file is None:
            raise ConfigError("give a SEARCH name (with --trial or --pareto) or a --plan file")
        from search.config import RecoverySettings
        from search.export import export_onnx
        from search.materialize import write_model_dir
        from search.plan import Plan
        from search.recovery import RecoveryConfig, recover
        from search.space import apply, build_space

        plan = Plan.load(plan_file)
        bundle = _bundle(example, model)
        profiles = _profiles(profile)
        space = build_space(bundle.model, bundle.example_input, profiles, ignored=ignore or ())
        pruned = apply(bundle.model, bundle.example_input, space, plan, importance=importance,
                       calibration=bundle.train_loader)
        # The search's default recovery (adaptive BN, held-out choice) with the asked step count.
        settings = RecoverySettings()
        recover(pruned.model, bundle, RecoveryConfig(
            steps=finetune_steps, lr=settings.lr, optimizer=settings.optimizer, warmup=settings.warmup,
            distill=settings.distill, bn_batches=settings.bn_batches,
            holdout_batches=settings.holdout_batches, threads=settings.threads), masks=pruned.masks)
        error = bundle.error_fn(pruned.model, bundle.val_loader)
        with tempfile.TemporaryDirectory() as tmp:
            artifact = export_onnx(pruned.model, bundle.example_input, Path(tmp),
                                   batch_size=profiles[0].batch_size, dynamo=dynamo)
            with output_errors(out):
                write_model_dir(out, bundle=bundle, plan=plan, pruned=pruned, artifact=artifact,
                                importance=importance,
                                extra={"error": error, "finetune_steps": finetune_steps})
        _stdout().print(
            f"wrote {out}: {pruned.macs / 1e6:.2f} M MACs ({100 * pruned.macs / space.base_macs:.0f}% "
            f"of base), {pruned.params / 1e6:.3f} M params, error {error:.4f}, onnx {artifact.sha256[:12]}",
            highlight=False,
        )


# The search commands register themselves on ``app``.
from search import cli_agents as _cli_agents  # noqa: E402,F401
from search import cli_search as _cli_search  # noqa: E402,F401


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())  # typer handles its own usage errors with status 2
