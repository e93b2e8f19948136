"""Commands on one model: ``measure`` an ONNX file, show a model's pruning ``space``, ``export`` a plan
or a stored search's trials."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from search.cli._app import (
    HELP,
    DbOpt,
    DeviceOpt,
    ExampleOpt,
    IgnoreOpt,
    JsonOpt,
    ModelOpt,
    ProfilesOpt,
    api_settings,
    app,
    bundle_from_options,
    echo_json,
    handle_errors,
    model_spec_from_options,
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
    from latency_models.ort import example_shapes, resolve_shape

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:
        return  # missing or not ONNX: the backend says so, by name
    initializers = {init.name for init in proto.graph.initializer}
    # hwprune's exports record the shapes they were traced at, as the backends read them
    recorded = example_shapes({entry.key: entry.value for entry in proto.metadata_props})
    for node in proto.graph.input:
        if node.name in initializers or not node.type.HasField("tensor_type"):
            continue
        tensor = node.type.tensor_type
        dims: list[int | str | None] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
        ]
        shape = resolve_shape(node.name, dims, profile, recorded.get(node.name))
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
    sensitivity: Annotated[bool, typer.Option(
        "--sensitivity", help="Each group cut alone at each option: error without recovery and latency "
                              "saved (a stored search's scan with --search, else scanned now, error only).")] = False,
    search_name: Annotated[str | None, typer.Option("--search", help="With --sensitivity: a stored search.")] = None,
    db: Annotated[str | None, typer.Option("--db", help="With --search: database URL.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the pruning space of a model for the given targets."""
    with handle_errors():
        from search.pipeline.space import build_space

        if sensitivity:
            _show_sensitivity(example, model, profile, ignore, search_name, db, as_json)
            return
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


def _show_sensitivity(example: str | None, model: str | None, profile: list[str] | None,
                      ignore: list[str] | None, search_name: str | None, db: str | None, as_json: bool) -> None:
    from search.pipeline.bundle import seeded_error
    from search.pipeline.space import build_space
    from search.study import sensitivity

    if search_name is not None:
        from search.api import sensitivity_scan

        found = sensitivity_scan(search_name, settings=api_settings(db))
        if found is None:
            raise ConfigError(f"search {search_name!r} has no sensitivity scan: searches scan when started with "
                              "--sensitivity-start or --sampler netadapt")
    else:
        bundle = bundle_from_options(example, model)
        space = build_space(bundle.model, bundle.example_input, profiles_from_options(profile),
                            ignored=ignore or ())
        found = sensitivity.scan(bundle, space, seed=0, base_error=seeded_error(bundle, bundle.model, 0))
    if as_json:
        echo_json(found.to_dict())
        return
    table = Table("group", "kept", "ratio", "error", "error added (pts)", "latency / base", "saved per pt",
                  title=f"sensitivity: each group cut alone, no recovery (base error {found.base_error:.4f})")
    for cut in found.cuts:
        added = cut.error - found.base_error
        saved = None if cut.latency_ratio is None else 1 - cut.latency_ratio
        table.add_row(cut.group, str(cut.kept), f"{cut.ratio:g}", f"{cut.error:.4f}", f"{100 * added:+.2f}",
                      "-" if cut.latency_ratio is None else f"{cut.latency_ratio:.3f}",
                      "-" if saved is None else f"{saved / max(0.1, 100 * added):.3f}")
    out = stdout()
    out.print(table)
    if found.latency_source == "none":
        out.print("latency skipped: no measurement cache for a model outside a search (give --search NAME of a "
                  "search started with --sensitivity-start)", highlight=False, style="dim")
    else:
        out.print(f"latency on {found.target} from {found.latency_source}; scan took {found.elapsed_s:.1f} s",
                  highlight=False, style="dim")


plan_app = typer.Typer(help="Plan files: one point of a pruning space.", no_args_is_help=True, **HELP)  # type: ignore[arg-type]
app.add_typer(plan_app, name="plan")


@plan_app.command("template", short_help="A plan file with every group, layer and option, to edit.")
def plan_template(
    example: ExampleOpt = None,
    model: ModelOpt = None,
    profile: ProfilesOpt = None,
    ignore: IgnoreOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write to this file instead of printing.")] = None,
) -> None:
    """A plan file naming every group and N:M layer of a model, dense, with the options as comments:
    edit the values and give it to `hwprune export --plan`."""
    with handle_errors():
        from search.api import build_space

        spec = model_spec_from_options(example, model)
        targets = profiles_from_options(profile)
        space = build_space(spec, targets, ignored=ignore or (), settings=api_settings())
        text = space.template(f"hwprune plan for {spec} on {', '.join(p.name for p in targets)}")
        if out is None:
            typer.echo(text.rstrip())
            return
        with output_errors(out):
            out.write_text(text)
        stdout().print(f"wrote {out}: {len(space.groups)} groups, {len(space.sparsity)} N:M layers", highlight=False)


@app.command("export", short_help="Write a pruned model (ONNX, weights, model.pt2, plan, manifest) to a folder.")
def export_command(
    out: Annotated[Path, typer.Option("--out", help="Output folder (must be empty or new, unless --force).")],
    search_name: Annotated[
        str | None, typer.Argument(metavar="[SEARCH]", help="A stored search to export trials of.")
    ] = None,
    trial: Annotated[int | None, typer.Option("--trial", help="With SEARCH: the trial number.")] = None,
    pareto: Annotated[bool, typer.Option("--pareto", help="With SEARCH: every Pareto trial.")] = False,
    db: DbOpt = None,
    plan_file: Annotated[Path | None, typer.Option("--plan", help="Plan YAML/JSON to materialise.")] = None,
    example: ExampleOpt = None,
    model: ModelOpt = None,
    profile: ProfilesOpt = None,
    ignore: IgnoreOpt = None,
    importance: Annotated[str, typer.Option(help="magnitude, taylor, lamp or bn-scale.")] = "magnitude",
    compensation: Annotated[str, typer.Option(
        help="With --plan: none, or mean (removed channels' average output goes back into their consumers).")
    ] = "none",
    finetune_steps: Annotated[int, typer.Option(
        "--finetune-steps", "--final-steps", min=0,
        help="Fine-tuning steps: with --plan, the recovery's; with SEARCH, extra steps after the trial's own "
             "(default the search's --final-steps); the manifest holds the error after them beside the "
             "search-time error.")] = 0,
    dynamo: Annotated[bool, typer.Option(help="Use the dynamo ONNX exporter.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty --out folder.")] = False,
    device: DeviceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write ONNX, the pruned weights, a self-contained model.pt2, the plan and a manifest: for a
    stored search's trial(s) (SEARCH --trial K | --pareto), or for a plan file on a model (--plan).

    Reload in Python with ``search.load(FOLDER)``, or without hwprune with
    ``torch.export.load(FOLDER + "/model.pt2").module()``."""
    with handle_errors():
        writable_folder(out)
        settings = api_settings(db)
        if search_name is not None:
            from search.cli.searches import export_from_search

            export_from_search(search_name, trial=trial, pareto=pareto, out=out,
                               finetune_steps=finetune_steps, force=force, as_json=as_json, settings=settings,
                               device=device)
            return
        if plan_file is None:
            raise ConfigError("give a SEARCH name (with --trial or --pareto) or a --plan file")
        from search.api import check_output_folder, export_plan
        from search.pipeline.plan import Plan

        check_output_folder(out, force=force)
        spec = model_spec_from_options(example, model)
        plan = Plan.load(plan_file)  # a bad plan file is refused before the model loads (or trains)
        with output_errors(out):
            manifest = export_plan(spec, plan, out, targets=profile, ignored=ignore or (),
                                   importance=importance, finetune_steps=finetune_steps, force=force,
                                   dynamo=dynamo, device=device or "cpu", compensation=compensation,
                                   settings=settings)
        if as_json:
            echo_json(manifest | {"folder": str(out)})
            return
        stdout().print(
            f"wrote {out}: {manifest['macs'] / 1e6:.2f} M MACs ({100 * manifest['macs'] / manifest['base_macs']:.0f}% "
            f"of base), {manifest['params'] / 1e6:.3f} M params, error {manifest['error']:.4f}, "
            f"onnx {manifest['onnx_sha256'][:12]}",
            highlight=False,
        )
