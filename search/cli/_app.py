"""The ``hwprune`` application, its shared options and its error contract. The CLI is the only
package that prints or sets up logging handlers.

Exit status: 0 success, 2 bad usage or input (the error's ``exit_code``), 1 a failure at run
time. Known errors print one red line; anything else is a bug, shown in full under ``--debug``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from hardware_profiles import ProfileError
from latency_models import LatencyError
from search.config import DB_ENV, DEFAULT_DB, DEFAULT_PROFILE, cache_dir, profile_dirs, resolve_profile
from search.errors import ConfigError, SearchError
from search.examples import EXAMPLES

try:  # typer vendors click from 0.2x on; its usage errors are that copy's
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

# Global options a user may also put after the subcommand (`hwprune search status x --debug`);
# each is moved in front of the subcommand before parsing. The value-taking ones take one value.
GLOBAL_FLAGS = ("--debug",)
GLOBAL_OPTIONS = ("--profiles-dir",)


def hoist_global_options(args: list[str]) -> list[str]:
    """``args`` with the global options found after the subcommand moved to the front."""
    front: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            rest.extend(args[index:])
            break
        if arg in GLOBAL_FLAGS:
            front.append(arg)
        elif arg in GLOBAL_OPTIONS and index + 1 < len(args):
            front.extend(args[index:index + 2])
            index += 1
        elif arg.split("=", 1)[0] in GLOBAL_OPTIONS and "=" in arg:
            front.append(arg)
        else:
            rest.append(arg)
        index += 1
    return front + rest


class _OneLineUsageError(click_exceptions.UsageError):
    """A usage error shown as the error contract says: one `error:` line naming the fix."""

    def show(self, file: Any = None) -> None:
        command = self.ctx.command_path if self.ctx is not None else "hwprune"
        message = " ".join(self.format_message().split())
        stderr().print(f"[red]error:[/red] {escape(message)} (see '{escape(command)} --help')", highlight=False)


@contextmanager
def _usage_errors_in_one_line() -> Iterator[None]:
    try:
        yield
    except click_exceptions.NoArgsIsHelpError:
        raise  # a bare group shows its help
    except click_exceptions.UsageError as exc:
        raise _OneLineUsageError(exc.format_message(), exc.ctx) from None


class _Group(typer.core.TyperGroup):
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(list(args)))  # type: ignore[no-any-return]

    # Click prints usage errors (a bad option value, an unknown command) as three lines of its
    # own; every one of them, at any depth of the command tree, passes through these two.
    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _usage_errors_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _usage_errors_in_one_line():
            return super().invoke(ctx)


# Plain (click) help: rich's help panels crop option names and help at 80 columns off a terminal.
HELP = {"rich_markup_mode": None, "context_settings": {
    "max_content_width": 120, "show_default": True, "terminal_width": None if sys.stdout.isatty() else 120}}

app = typer.Typer(
    name="hwprune",
    help="Hardware-aware pruning search, scored on latency measured on real targets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
    **HELP,  # type: ignore[arg-type]
)

_KNOWN_ERRORS = (ProfileError, LatencyError, SearchError)
# Modules that only an extra installs, by the extra: a command that needs one says how to get it.
EXTRA_OF_MODULE = {
    **dict.fromkeys(("torch", "torch_pruning", "optuna", "onnxscript", "sqlalchemy", "alembic", "sklearn",
                     "fastapi", "uvicorn", "starlette"), "search"),
    **dict.fromkeys(("onnx", "onnxruntime", "httpx"), "agent"),
}


@dataclass
class _State:
    debug: bool = False
    profile_dirs: list[Path] = field(default_factory=list)
    db: str | None = None


state = _State()


def stdout() -> Console:
    # Off a terminal rich assumes 80 columns and would fold the tables; logs and CI are wider.
    return Console(soft_wrap=True, emoji=False, width=None if sys.stdout.isatty() else 160)


def stderr() -> Console:
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
def handle_errors() -> Iterator[None]:
    try:
        yield
    except typer.Exit:
        raise
    except _KNOWN_ERRORS as exc:
        if state.debug:
            raise
        stderr().print(f"[red]error:[/red] {escape(one_line(str(exc)))}", highlight=False, markup=True)
        raise typer.Exit(getattr(exc, "exit_code", 1)) from None
    except KeyboardInterrupt:
        stderr().print("[red]interrupted[/red]")
        raise typer.Exit(130) from None
    except Exception as exc:
        if state.debug:
            raise
        missing = exc.name.split(".")[0] if isinstance(exc, ModuleNotFoundError) and exc.name else ""
        if missing in EXTRA_OF_MODULE:
            hint = escape(f"pip install 'hwprune[{EXTRA_OF_MODULE[missing]}]'")
            stderr().print(f"[red]error:[/red] this command needs {missing}, which this installation lacks: {hint}",
                           highlight=False)
            raise typer.Exit(2) from None
        stderr().print(
            f"[red]internal error:[/red] {type(exc).__name__}: {escape(one_line(str(exc)))} (run with --debug for the "
            "traceback, and please report it)",
            highlight=False,
        )
        raise typer.Exit(1) from None


def echo_json(data: Any) -> None:
    """``data`` as RFC 8259 JSON: a figure that is not finite (a conformal quantile fitted on too
    few samples is unbounded) is ``null``, never Python's non-standard ``Infinity`` or ``NaN``."""
    typer.echo(json.dumps(_finite(data), indent=2, sort_keys=True, allow_nan=False))


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(value) for value in data]
    return data


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    profiles_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--profiles-dir",
            help="Folder of extra hardware profiles (repeatable); default $HWPRUNE_PROFILES. "
                 "Accepted after the subcommand too.",
        ),
    ] = None,
    db: Annotated[str | None, typer.Option(
        "--db", help="SQLAlchemy URL for every command; a command's own --db wins.")] = None,
) -> None:
    state.debug = debug
    state.db = db
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    # Libraries warn through Python's warnings (the ONNX exporter's aten::index note, Optuna's
    # experimental features): debug logs under --debug, otherwise kept out of a command's output.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    state.profile_dirs = profile_dirs(profiles_dir)
    # Long steps below the CLI (first-use training, base measurement) show progress on a terminal.
    from search import progress

    progress.install(terminal_progress if stderr().is_terminal else None)


def _ignore(_steps: int = 1) -> None:
    return None


@contextmanager
def terminal_progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr for one long step, removed when it ends."""
    from rich.errors import LiveError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=stderr(), transient=True)
    try:
        bar.start()
    except LiveError:  # another display (a search's own bar) is showing: stay quiet under it
        yield _ignore
        return
    try:
        task = bar.add_task(description, total=total)

        def advance(steps: int = 1) -> None:
            bar.advance(task, steps)

        yield advance
    finally:
        bar.stop()


# --- options and helpers shared by the command groups -----------------------------------------

DbOpt = Annotated[str | None, typer.Option(
    "--db", help=f"SQLAlchemy URL; default ${DB_ENV}, else {DEFAULT_DB} (relative to the working folder).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON; no progress display.")]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", help="Where model work runs (recovery, calibration, scoring): auto (CUDA, then MPS, then "
                     "the CPU), cpu, cuda, cuda:N or mps; `hwprune doctor` lists them. Measurement stays with "
                     "each target's backend. Default: the search's (auto for a new one).")]

ExampleOpt = Annotated[
    str | None, typer.Option("--example", help=f"Built-in example model: {', '.join(EXAMPLES)}.")
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


def model_spec_from_options(example: str | None, model: str | None) -> str:
    if (example is None) == (model is None):
        raise ConfigError("give exactly one of --example NAME or --model package.module:function")
    return example or model or ""


def bundle_from_options(example: str | None, model: str | None) -> Any:
    from search.examples import load_bundle

    return load_bundle(model_spec_from_options(example, model), cache_dir=cache_dir())


def api_settings(db: str | None = None) -> Any:
    """The API's settings from the command line's options."""
    from search.api import Settings

    return Settings(db=db or state.db, profiles_dirs=tuple(state.profile_dirs), cache=cache_dir())


def profiles_from_options(names: list[str] | None) -> list[Any]:
    return [resolve_profile(n, state.profile_dirs) for n in (names or [DEFAULT_PROFILE])]


def writable_folder(out: Path) -> None:
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
