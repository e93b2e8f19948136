"""Models by spec: the built-in examples (``digits``) and user plugins (``package.module:function``).

``digits-distorted`` is the same digits drawn through seeded distortions, noise and occlusion:
hard enough that uniform pruning loses accuracy, so that searches can be told apart.
``efficientnet-lite0`` is a pretrained ImageNet network (from the ``examples`` extra) on real
photographs shipped with scikit-image and scikit-learn, scored by agreement with the dense model;
``efficientnet-lite0@160`` runs it at 160x160 (any resolution from 32 to 512; 224 by default).
The examples train once on data shipped inside a package and are cached. ``zoo`` holds reference
architectures built in code (ResNet-18, MobileNetV2, a timm-style transformer, a small Llama) for
``hwprune doctor``, the tests and the benchmarks: they are not trained and not a model hub.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search.config import PLUGIN_TIMEOUT_ENV, plugin_timeout_s
from search.errors import ModelLoadError

if TYPE_CHECKING:
    from search.pipeline.bundle import ModelBundle

# The built-in examples, by name: the function that builds each, imported on use, so that the
# command line can list them (in its help) without loading torch.
EXAMPLES: dict[str, str] = {
    "digits": "search.examples.digits:digits",
    "digits-distorted": "search.examples.distorted_digits:digits_distorted",
    "efficientnet-lite0": "search.examples.efficientnet_lite:efficientnet_lite0",
}
# Examples that take a resolution after '@' (efficientnet-lite0@160).
_SIZED = ("efficientnet-lite0",)


def load_example(name: str, *, cache_dir: Path) -> ModelBundle:
    """A built-in example by name.

    Raises:
        ModelLoadError: unknown name; the message lists the examples and the plugin syntax.
    """
    base, _, size = name.partition("@")
    if base not in EXAMPLES or (size and base not in _SIZED):
        raise ModelLoadError(
            f"no built-in example {name!r}; known: {', '.join(EXAMPLES)} "
            "(or give a plugin as package.module:function)"
        )
    module, _, function = EXAMPLES[base].partition(":")
    build = getattr(importlib.import_module(module), function)
    if not size:
        bundle: ModelBundle = build(cache_dir=cache_dir)
        return bundle
    if not (size.isdigit() and 32 <= int(size) <= 512):
        raise ModelLoadError(f"example {name!r}: the resolution after '@' must be a whole number "
                             f"from 32 to 512, e.g. {base}@160")
    from search.examples.efficientnet_lite import RECIPE

    sized: ModelBundle = build(cache_dir=cache_dir, recipe=replace(RECIPE, resolution=int(size)))
    return sized


def load_bundle(spec: str, *, cache_dir: Path, timeout_s: float | None = None) -> ModelBundle:
    """Load a bundle from ``package.module:function`` or a built-in example name.

    A plugin's import and its function run in a thread given ``timeout_s`` seconds (default
    ``search.config.plugin_timeout_s()``, ``HWPRUNE_PLUGIN_TIMEOUT_S``): one that hangs is left
    behind in that daemon thread and reported, and one that calls ``sys.exit`` is an error too.

    Raises:
        ModelLoadError: the plugin cannot be imported, is not callable, returns something other
            than a ``ModelBundle``, exits or does not finish in time.
    """
    if ":" not in spec:
        return load_example(spec, cache_dir=cache_dir)
    limit = plugin_timeout_s() if timeout_s is None else timeout_s
    module_name, _, attribute = spec.partition(":")
    module = _bounded(spec, "importing it", limit, lambda: _import_plugin(module_name))
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelLoadError(f"model plugin {spec!r}: {module_name} has no function {attribute!r}")
    bundle = _bounded(spec, "building its bundle", limit, lambda: _call_plugin(spec, factory))
    from search.pipeline.bundle import ModelBundle

    if not isinstance(bundle, ModelBundle):
        raise ModelLoadError(
            f"model plugin {spec!r} returned {type(bundle).__name__}; "
            "it must return search.pipeline.bundle.ModelBundle"
        )
    return bundle


def _bounded(spec: str, what: str, timeout_s: float, work: Callable[[], Any]) -> Any:
    """``work()`` in a daemon thread, waited for ``timeout_s``: a hung plugin cannot be killed
    from Python, but the command can report it and exit."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # SystemExit and KeyboardInterrupt included: the plugin's
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"hwprune-plugin {spec}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ModelLoadError(
            f"model plugin {spec!r} did not finish {what} within {timeout_s:g} s; fix the plugin if it hangs, "
            f"or allow it longer with {PLUGIN_TIMEOUT_ENV}=SECONDS")
    error = outcome.get("error")
    if isinstance(error, SystemExit):
        raise ModelLoadError(f"model plugin {spec!r} called sys.exit({error.code!r}) while {what}; a plugin must "
                             "return a ModelBundle or raise an exception") from None
    if error is not None:
        raise error
    return outcome["value"]


def _import_plugin(module_name: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot import model plugin module {module_name!r}: {exc}; "
            "is it on PYTHONPATH or installed?"
        ) from exc
    except SyntaxError as exc:
        raise ModelLoadError(
            f"model plugin module {module_name!r} has a syntax error at {exc.filename}:{exc.lineno}: {exc.msg}"
        ) from exc
    except Exception as exc:  # the user's module-level code: anything may go wrong there
        raise ModelLoadError(
            f"importing model plugin module {module_name!r} raised {type(exc).__name__}: {exc}; "
            "fix the module (run with --debug for the traceback)"
        ) from exc


def _call_plugin(spec: str, factory: Callable[[], Any]) -> Any:
    try:
        return factory()
    except Exception as exc:  # the user's factory: a bug there is theirs to fix, not ours
        raise ModelLoadError(
            f"model plugin {spec!r} raised {type(exc).__name__}: {exc}; fix the plugin "
            "(run with --debug for the traceback)"
        ) from exc
