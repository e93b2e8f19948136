"""Find, read and validate hardware profiles: the built-in YAML files and the user's folders."""

from __future__ import annotations

import reprlib
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

# Profiles, plans and search configs are a few KB; these caps keep a hostile file (an alias
# bomb, a huge or endless file, deep nesting) from exhausting memory or the stack.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 20_000  # counted with every alias expanded, as a consumer would walk them
MAX_YAML_DEPTH = 40


class YamlInputError(ValueError):
    """A YAML file that is unreadable, too big, not UTF-8, malformed or past the caps; the message
    names the file and what to fix. Callers re-raise it as their own error type."""


class _StrictLoader(yaml.SafeLoader):
    """Safe loading that refuses a key given twice in one mapping (YAML says keys are unique;
    PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {short_repr(key)} appears twice in one mapping", mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_node_budget(root: yaml.Node, origin: str) -> None:
    # Iterative, so that neither the expansion of aliases nor deep nesting costs more than the caps.
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise YamlInputError(
                f"{origin}: more than {MAX_YAML_NODES} values once aliases are expanded (an alias bomb?); "
                "write the values out without anchors")
        if depth > MAX_YAML_DEPTH:
            raise YamlInputError(f"{origin}: nested deeper than {MAX_YAML_DEPTH} levels; flatten it")
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))


def read_yaml_file(path: Path, *, what: str, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """Read one YAML (or JSON) document from ``path`` within the size, node and depth caps.

    ``what`` names the kind of file in messages ("profile", "plan", "config").

    Raises:
        YamlInputError: one line naming the file, the problem and the fix.
    """
    origin = f"{what} {path.name}"
    try:
        with path.open("rb") as handle:
            raw = handle.read(max_bytes + 1)  # bounded even for /dev/zero or a FIFO
    except IsADirectoryError:
        raise YamlInputError(f"{what} {str(path)!r} is a folder; give a YAML file") from None
    except OSError as exc:
        raise YamlInputError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from exc
    if len(raw) > max_bytes:
        raise YamlInputError(f"{origin} is larger than {max_bytes // 1024} KiB; is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlInputError(f"{origin} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_node_budget(node, origin)
        return loader.construct_document(node)
    except RecursionError:
        raise YamlInputError(f"{origin}: nested too deeply to read; flatten it") from None
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise YamlInputError(f"{origin}: {problem}{where}") from None
    finally:
        loader.dispose()


_REPR = reprlib.Repr()  # keyword arguments need Python 3.12
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring = _REPR.maxother = 60


def short_repr(value: Any) -> str:
    """A bounded repr for messages: never expands a big or self-similar value."""
    return _REPR.repr(value)


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        data = read_yaml_file(path, what="profile")
    except YamlInputError as exc:
        raise InvalidProfileError(str(exc)) from None
    if not isinstance(data, dict):
        raise InvalidProfileError(
            f"profile {path.name}: expected a mapping of settings, got {type(data).__name__}"
        )
    data.setdefault("name", path.stem)
    if data["name"] != path.stem:
        raise InvalidProfileError(
            f"profile {path.name}: name {short_repr(data['name'])} must equal the file name {path.stem!r}"
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
    # Inputs, field names and messages are shortened: a huge or alias-shared value must never be
    # printed (or even repr'd) whole.
    for error in exc.errors(include_url=False):
        field = _clip(".".join(str(part) for part in error["loc"])) or "(top level)"
        if error["type"] == "extra_forbidden":
            problems.append(
                f"unknown field {field!r}; allowed: {_allowed_fields(schema, error['loc'])}"
            )
        elif error["type"] == "missing":
            problems.append(f"field {field!r} is required")
        elif not error["loc"]:
            problems.append(_clip(error["msg"].removeprefix("Value error, "), 300))
        else:
            message = _clip(error["msg"].removeprefix("Value error, "), 300)
            problems.append(f"field {field!r}: {message} (got {short_repr(error.get('input'))})")
    if len(problems) > 5:
        problems = problems[:5] + [f"and {len(problems) - 5} more"]
    return "; ".join(problems)


def _allowed_fields(schema: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    model: Any = schema
    for part in loc[:-1]:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if annotation is None or not hasattr(annotation, "model_fields"):
            break
        model = annotation
    return ", ".join(model.model_fields)
