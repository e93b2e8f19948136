"""Find, read and validate hardware profiles: the built-in YAML files and the user's folders."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hardware_profiles.errors import InvalidProfileError, ProfileNotFoundError
from hardware_profiles.schema import HardwareProfile

BUILTIN_DIR = Path(__file__).resolve().parent
_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True, slots=True)
class ProfileSource:
    """Where a profile was found: its file and whether it ships with hwprune."""

    name: str
    path: Path
    builtin: bool


def discover(extra_dirs: Sequence[Path] = ()) -> dict[str, ProfileSource]:
    """Map every available profile name to its file.

    A profile in a user folder replaces the built-in one of the same name, so that a user can
    tune a shipped target; two user folders defining one name are ambiguous and refused.

    Raises:
        InvalidProfileError: a user folder does not exist or two of them define one name.
    """
    found = {src.name: src for src in _scan(BUILTIN_DIR, builtin=True)}
    user: dict[str, ProfileSource] = {}
    for folder in extra_dirs:
        if not folder.is_dir():
            raise InvalidProfileError(
                f"profile folder {str(folder)!r} does not exist: "
                "check --profiles-dir or HWPRUNE_PROFILES"
            )
        for src in _scan(folder, builtin=False):
            if src.name in user:
                raise InvalidProfileError(
                    f"profile {src.name!r} is defined twice: {user[src.name].path} and {src.path}; "
                    "remove one"
                )
            user[src.name] = src
    found.update(user)
    return dict(sorted(found.items()))


def _scan(folder: Path, *, builtin: bool) -> Iterable[ProfileSource]:
    for path in sorted(folder.iterdir()):
        if path.suffix in _SUFFIXES and path.is_file():
            yield ProfileSource(name=path.stem, path=path, builtin=builtin)


def names(extra_dirs: Sequence[Path] = ()) -> list[str]:
    """The names of every available profile, sorted."""
    return list(discover(extra_dirs))


def load_profile(name: str, extra_dirs: Sequence[Path] = ()) -> HardwareProfile:
    """Load the profile called ``name``.

    Raises:
        ProfileNotFoundError: no such profile; the message lists the known names.
        InvalidProfileError: the file exists but is malformed.
    """
    sources = discover(extra_dirs)
    try:
        source = sources[name]
    except KeyError:
        known = ", ".join(sources)
        raise ProfileNotFoundError(
            f"no hardware profile {name!r}; known: {known} "
            "(add your own with --profiles-dir or HWPRUNE_PROFILES)"
        ) from None
    return load_profile_file(source.path)


def load_profile_file(path: Path) -> HardwareProfile:
    """Read and validate one profile file; its name must equal the file's stem.

    Raises:
        InvalidProfileError: unreadable file, bad YAML, or a schema violation; the message
            names the file, the field and what is allowed.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidProfileError(f"cannot read profile {str(path)!r}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise InvalidProfileError(f"profile {path.name}: {problem}{where}") from exc
    if not isinstance(data, dict):
        raise InvalidProfileError(
            f"profile {path.name}: expected a mapping of settings, got {type(data).__name__}"
        )
    data.setdefault("name", path.stem)
    if data["name"] != path.stem:
        raise InvalidProfileError(
            f"profile {path.name}: name {data['name']!r} must equal the file name {path.stem!r}"
        )
    return parse_profile(data, origin=path.name)


def parse_profile(data: dict[str, Any], *, origin: str) -> HardwareProfile:
    """Validate a mapping as a profile; ``origin`` names it in error messages."""
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as exc:
        raise InvalidProfileError(f"profile {origin}: {describe_validation_error(exc)}") from exc


def describe_validation_error(exc: ValidationError, schema: type[BaseModel] = HardwareProfile) -> str:
    """All problems on one line, each naming the field and what it accepts."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        if error["type"] == "extra_forbidden":
            problems.append(
                f"unknown field {field!r}; allowed: {_allowed_fields(schema, error['loc'])}"
            )
        elif error["type"] == "missing":
            problems.append(f"field {field!r} is required")
        elif not error["loc"]:
            problems.append(error["msg"].removeprefix("Value error, "))
        else:
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"field {field!r}: {message} (got {error.get('input')!r})")
    return "; ".join(problems)


def _allowed_fields(schema: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    model: Any = schema
    for part in loc[:-1]:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if annotation is None or not hasattr(annotation, "model_fields"):
            break
        model = annotation
    return ", ".join(model.model_fields)
