"""``hwprune profiles``: list, show and validate hardware profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from hardware_profiles import discover, load_profile_file
from search.cli._app import HELP, app, echo_json, handle_errors, state, stdout
from search.config import check_backend, resolve_profile

profiles_app = typer.Typer(help="List, show and validate hardware profiles.", no_args_is_help=True, **HELP)  # type: ignore[arg-type]
app.add_typer(profiles_app, name="profiles")


@profiles_app.command("list")
def profiles_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List every hardware profile, built-in and the user's."""
    with handle_errors():
        rows: list[dict[str, Any]] = []
        for name, source in discover(state.profile_dirs).items():
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
            echo_json(rows)
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
        stdout().print(table)


@profiles_app.command("show", short_help="Every setting of one profile, as a file that validates.")
def profiles_show(
    name: Annotated[str, typer.Argument(help="Profile name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show every setting of one profile, defaults included, as a profile file that
    `hwprune profiles validate` accepts (--json adds the name and fingerprint)."""
    with handle_errors():
        profile = resolve_profile(name, state.profile_dirs)
        data = profile.model_dump(mode="json")
        data["fingerprint"] = profile.fingerprint()
        if as_json:
            echo_json(data)
            return
        import yaml

        # As a profile file that validates as is: the name is the file's stem and the fingerprint
        # is computed, so both go into a comment.
        body = {k: v for k, v in data.items() if k not in ("name", "fingerprint")}
        typer.echo(f"# profile {profile.name} (fingerprint {data['fingerprint']}); a profile's name is its "
                   f"file name: save as {profile.name}.yaml, or as NEW-NAME.yaml for a profile of your own")
        typer.echo(yaml.safe_dump(body, sort_keys=False).rstrip())


@profiles_app.command("validate")
def profiles_validate(
    files: Annotated[list[Path], typer.Argument(help="Profile YAML files to check.")],
) -> None:
    """Check profile files against the schema and the known backends."""
    with handle_errors():
        for path in files:
            profile = load_profile_file(path)
            check_backend(profile)
            typer.echo(f"ok: {path} ({profile.backend} on {profile.device_class}, {profile.location})")


