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
from dataclasses import replace
from pathlib import Path

from search.errors import ModelLoadError
from search.examples.digits import digits
from search.examples.distorted_digits import NAME as DISTORTED
from search.examples.distorted_digits import digits_distorted
from search.examples.efficientnet_lite import NAME as EFFICIENTNET
from search.examples.efficientnet_lite import RECIPE as EFFICIENTNET_RECIPE
from search.examples.efficientnet_lite import efficientnet_lite0
from search.pipeline.bundle import ModelBundle

EXAMPLES = ("digits", DISTORTED, EFFICIENTNET)


def load_example(name: str, *, cache_dir: Path) -> ModelBundle:
    """A built-in example by name.

    Raises:
        ModelLoadError: unknown name; the message lists the examples and the plugin syntax.
    """
    if name == "digits":
        return digits(cache_dir=cache_dir)
    if name == DISTORTED:
        return digits_distorted(cache_dir=cache_dir)
    if name == EFFICIENTNET or name.startswith(f"{EFFICIENTNET}@"):
        return _efficientnet(name, cache_dir=cache_dir)
    raise ModelLoadError(
        f"no built-in example {name!r}; known: {', '.join(EXAMPLES)} "
        "(or give a plugin as package.module:function)"
    )


def _efficientnet(name: str, *, cache_dir: Path) -> ModelBundle:
    _, _, size = name.partition("@")
    if size and not (size.isdigit() and 32 <= int(size) <= 512):
        raise ModelLoadError(f"example {name!r}: the resolution after '@' must be a whole number "
                             f"from 32 to 512, e.g. {EFFICIENTNET}@160")
    recipe = replace(EFFICIENTNET_RECIPE, resolution=int(size)) if size else EFFICIENTNET_RECIPE
    return efficientnet_lite0(cache_dir=cache_dir, recipe=recipe)


def load_bundle(spec: str, *, cache_dir: Path) -> ModelBundle:
    """Load a bundle from ``package.module:function`` or a built-in example name.

    Raises:
        ModelLoadError: the plugin cannot be imported, is not callable, or returns something
            other than a ``ModelBundle``.
    """
    if ":" not in spec:
        return load_example(spec, cache_dir=cache_dir)
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
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
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelLoadError(f"model plugin {spec!r}: {module_name} has no function {attribute!r}")
    try:
        bundle = factory()
    except Exception as exc:  # the user's factory: a bug there is theirs to fix, not ours
        raise ModelLoadError(
            f"model plugin {spec!r} raised {type(exc).__name__}: {exc}; fix the plugin "
            "(run with --debug for the traceback)"
        ) from exc
    if not isinstance(bundle, ModelBundle):
        raise ModelLoadError(
            f"model plugin {spec!r} returned {type(bundle).__name__}; "
            "it must return search.pipeline.bundle.ModelBundle"
        )
    return bundle
