"""Commands on one model: ``measure`` an ONNX file, show a model's pruning ``space``, ``export`` a plan
or a stored search's trials."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from search.cli._app import (
    ExampleOpt,
    IgnoreOpt,
    ModelOpt,
    ProfilesOpt,
    app,
    bundle_from_options,
    echo_json,
    handle_errors,
    one_line,
    output_errors,
    profiles_from_options,
    state,
    stdout,
    writable_folder,
)
from search.config import resolve_profile
from search.errors import ConfigError


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

    with handle_errors():
        profile = resolve_profile(profile_name, state.profile_dirs)
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
            echo_json(data)
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


def _print_measurement(data: dict[str, Any]) -> None:
    out = stdout()
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


@app.command("space")
def space_command(
    example: ExampleOpt = None,
    model: ModelOpt = None,
    profile: ProfilesOpt = None,
    ignore: IgnoreOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the pruning space of a model for the given targets."""
    with handle_errors():
        from search.pipeline.space import build_space

        bundle = bundle_from_options(example, model)
        profiles = profiles_from_options(profile)
        space = build_space(bundle.model, bundle.example_input, profiles, ignored=ignore or ())
        if as_json:
            echo_json(space.to_dict() | {"fingerprint": space.fingerprint()})
            return
        nm = {s.layer: ",".join(s.patterns) for s in space.sparsity}
        table = Table("group", "kind", "size", "kept options", "MAC share", "members")
        for g in space.groups:
            table.add_row(g.name, g.kind, str(g.size), " ".join(map(str, g.kept)),
                          f"{100 * g.mac_share:.1f}%", " ".join(g.members))
        out = stdout()
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
        for name, note in space.notes.items():
            out.print(f"note: {name}: {note}", highlight=False, style="dim")


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
    with handle_errors():
        writable_folder(out)
        if search_name is not None:
            from search.cli.searches import export_from_search

            export_from_search(search_name, trial=trial, pareto=pareto, out=out,
                               finetune_steps=finetune_steps, db=db)
            return
        if plan_file is None:
            raise ConfigError("give a SEARCH name (with --trial or --pareto) or a --plan file")
        from search.config import RecoverySettings
        from search.pipeline.onnx_export import export_onnx
        from search.pipeline.plan import Plan
        from search.pipeline.recovery import RecoveryConfig, recover
        from search.pipeline.space import apply, build_space
        from search.study.materialize import write_model_dir

        plan = Plan.load(plan_file)
        bundle = bundle_from_options(example, model)
        profiles = profiles_from_options(profile)
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
        stdout().print(
            f"wrote {out}: {pruned.macs / 1e6:.2f} M MACs ({100 * pruned.macs / space.base_macs:.0f}% "
            f"of base), {pruned.params / 1e6:.3f} M params, error {error:.4f}, onnx {artifact.sha256[:12]}",
            highlight=False,
        )
