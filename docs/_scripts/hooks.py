"""MkDocs hook: the reference pages are generated from the code at every build, never copied.

A page asks for a generated part with a marker on a line of its own:

* ``<!-- hwprune:cli -->``: every command and option of the Typer application;
* ``<!-- hwprune:schema search-config -->``, ``plan``, ``profile``: a pydantic model's JSON schema
  as tables (the plan is a dataclass, read through pydantic's ``TypeAdapter``);
* ``<!-- hwprune:openapi -->``: the hub's OpenAPI document, endpoint by endpoint;
* ``<!-- hwprune:errors -->``: every error class and the exit status it maps to.

A command or option without help text, or an unknown marker, is logged as a warning, which
``mkdocs build --strict`` (``make docs``) turns into a failed build.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

log = logging.getLogger("mkdocs.plugins.hwprune")
MARKER = re.compile(r"^<!-- hwprune:([a-z-]+)(?: ([a-z-]+))? -->$", re.M)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    def expand(match: re.Match[str]) -> str:
        kind, arg = match.group(1), match.group(2)
        maker = GENERATORS.get(kind)
        if maker is None:
            log.warning("%s: unknown generated part %r", page.file.src_path, match.group(0))
            return ""
        return str(maker(arg) if arg else maker())

    return MARKER.sub(expand, markdown)


def _cell(text: Any) -> str:
    """Text fit for one table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


# --- the command line -------------------------------------------------------------------------


def cli_reference() -> str:
    import typer.main

    from search.cli.main import app

    root = typer.main.get_command(app)
    parts: list[str] = []
    _command(root, ["hwprune"], parts, depth=0)
    return "\n".join(parts)


def _command(command: Any, path: list[str], parts: list[str], depth: int) -> None:
    # Typer vendors its own click: duck typing, not isinstance against the click package.
    name = " ".join(path)
    help_text = (command.help or "").strip()
    if not help_text:
        log.warning("CLI command %r has no help text", name)
    heading = "#" * min(2 + depth, 4)
    parts += [f"{heading} `{name}`", "", help_text.replace("\b\n", ""), ""]
    ctx = command.context_class(command, info_name=name)
    usage = " ".join(command.collect_usage_pieces(ctx))
    parts += ["```", f"{name} {usage}".rstrip(), "```", ""]
    rows = [_param_row(name, param, ctx) for param in command.params if not getattr(param, "hidden", False)]
    if rows:
        parts += ["| option or argument | what it does (as `--help` says) |", "|---|---|", *rows, ""]
    for sub_name, sub in getattr(command, "commands", {}).items():
        if not getattr(sub, "hidden", False):
            _command(sub, [*path, sub_name], parts, depth + 1)


def _param_row(command: str, param: Any, ctx: Any) -> str:
    if not (getattr(param, "help", None) or "").strip():
        log.warning("CLI option %s of %r has no help text", "/".join(param.opts), command)
    record = param.get_help_record(ctx) or ("/".join(param.opts), "")
    names, help_text = record
    return f"| `{_cell(names)}` | {_cell(help_text)} |"


# --- schemas ----------------------------------------------------------------------------------


def schema_reference(which: str) -> str:
    from pydantic import TypeAdapter

    if which == "search-config":
        from search.config import SearchConfig

        schema = SearchConfig.model_json_schema()
    elif which == "plan":
        from search.pipeline.plan import Plan

        schema = TypeAdapter(Plan).json_schema()
    elif which == "profile":
        from hardware_profiles import HardwareProfile

        schema = HardwareProfile.model_json_schema()
    else:
        log.warning("no schema %r (search-config, plan, profile)", which)
        return ""
    parts: list[str] = []
    for title, node in [(schema.get("title", which), schema), *sorted(schema.get("$defs", {}).items())]:
        parts += [f"### `{title}`", "", _cell(node.get("description", "")), ""]
        properties = node.get("properties", {})
        required = set(node.get("required", []))
        if properties:
            parts += ["| field | type | default | limits | description |", "|---|---|---|---|---|"]
            for field, spec in properties.items():
                default = "required" if field in required else (
                    f"`{json.dumps(spec['default'])}`" if "default" in spec else "")
                parts.append(f"| `{field}` | {_type(spec)} | {_cell(default)} | {_limits(spec)} | "
                             f"{_cell(spec.get('description', ''))} |")
            parts.append("")
        elif "enum" in node:
            parts += ["One of: " + ", ".join(f"`{v}`" for v in node["enum"]), ""]
    parts += ['??? note "The JSON schema itself"', "", "    ```json",
              *("    " + line for line in json.dumps(schema, indent=2).splitlines()), "    ```", ""]
    return "\n".join(parts)


def _type(spec: dict[str, Any]) -> str:
    if "$ref" in spec:
        name = spec["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "anyOf" in spec:
        return " or ".join(_type(s) for s in spec["anyOf"])
    if "enum" in spec:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in spec["enum"])
    if "const" in spec:
        return f"`{json.dumps(spec['const'])}`"
    kind = spec.get("type", "any")
    if kind == "array":
        return f"list of {_type(spec.get('items', {}))}"
    if kind == "object" and isinstance(spec.get("additionalProperties"), dict):
        return f"mapping of name to {_type(spec['additionalProperties'])}"
    return str(kind)


LIMITS = {"minimum": ">= {}", "maximum": "<= {}", "exclusiveMinimum": "> {}", "exclusiveMaximum": "< {}",
          "minLength": "at least {} characters", "maxLength": "at most {} characters",
          "minItems": "at least {} items", "maxItems": "at most {} items", "pattern": "matches `{}`"}


def _limits(spec: dict[str, Any]) -> str:
    found = [text.format(spec[key]) for key, text in LIMITS.items() if key in spec]
    for option in spec.get("anyOf", []):
        found += [text.format(option[key]) for key, text in LIMITS.items() if key in option]
    return _cell("; ".join(found))


# --- the hub's HTTP API -----------------------------------------------------------------------


def openapi_reference() -> str:
    from search.hub.app import HubSettings, create_app

    # The document is built from the routes alone: no database is opened.
    document = create_app(HubSettings(db_url="sqlite:///unused.db")).openapi()
    parts = [f"OpenAPI {document['openapi']}, API version {document['info']['version']}. "
             "Every endpoint but `/v1/health` needs a bearer token.", ""]
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            parts += [f"### `{method.upper()} {path}`", "", _cell(operation.get("summary", "")), ""]
            if operation.get("description"):
                parts += [operation["description"].strip(), ""]
            params = operation.get("parameters", [])
            if params:
                parts += ["| parameter | in | required | type |", "|---|---|---|---|"]
                parts += [f"| `{p['name']}` | {p['in']} | {'yes' if p.get('required') else 'no'} | "
                          f"{_type(p.get('schema', {}))} |" for p in params]
                parts.append("")
            body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
            if body:
                parts += [f"Request body: {_type(body.get('schema', {}))}", ""]
            parts += ["| status | meaning | body |", "|---|---|---|"]
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {}).get("application/json", {})
                parts.append(f"| {status} | {_cell(response.get('description', ''))} | "
                             f"{_type(content.get('schema', {})) if content else ''} |")
            parts.append("")
    parts += ["## Schemas", ""]
    for name, schema in sorted(document.get("components", {}).get("schemas", {}).items()):
        parts += [f"### {name}", "", _cell(schema.get("description", "")), ""]
        properties = schema.get("properties", {})
        if properties:
            required = set(schema.get("required", []))
            parts += ["| field | type | required | limits |", "|---|---|---|---|"]
            parts += [f"| `{field}` | {_type(spec)} | {'yes' if field in required else 'no'} | {_limits(spec)} |"
                      for field, spec in properties.items()]
            parts.append("")
    return "\n".join(parts)


# --- errors -----------------------------------------------------------------------------------


def errors_reference() -> str:
    import hardware_profiles.errors
    import latency_models.errors
    import search.errors

    parts = ["| error | is a | exit status | raised when |", "|---|---|---|---|"]
    for module in (search.errors, latency_models.errors, hardware_profiles.errors):
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == module.__name__:
                base = value.__mro__[1].__name__
                doc = (value.__doc__ or "").strip()
                if not doc:
                    log.warning("error class %s.%s has no docstring", module.__name__, name)
                parts.append(f"| `{module.__name__}.{name}` | `{base}` | {getattr(value, 'exit_code', 1)} | "
                             f"{_cell(doc)} |")
    return "\n".join(parts) + "\n"


GENERATORS: dict[str, Any] = {
    "cli": cli_reference,
    "schema": schema_reference,
    "openapi": openapi_reference,
    "errors": errors_reference,
}
