"""``hwprune latency-model build|eval`` and ``hwprune predict``: latency models that predict a plan's
latency ratio on a profile, with their held-out error (``latency_models.predictors``)."""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from search.cli._app import (
    DbOpt,
    ExampleOpt,
    IgnoreOpt,
    JsonOpt,
    ModelOpt,
    app,
    bundle_from_options,
    echo_json,
    handle_errors,
    state,
    stdout,
)
from search.config import artifacts_url, db_url, resolve_profile
from search.errors import ConfigError

latency_model_app = typer.Typer(help="Latency models: build a lookup table, evaluate on held-out data.",
                                no_args_is_help=True)
app.add_typer(latency_model_app, name="latency-model")

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="Hardware profile.")]


def _held_out_dict(held: Any) -> dict[str, Any] | None:
    return None if held is None else held.to_dict()


@latency_model_app.command("build")
def build(
    profile_name: ProfileOpt,
    example: ExampleOpt = None,
    model: ModelOpt = None,
    ignore: IgnoreOpt = None,
    samples: Annotated[int, typer.Option(help="Random plans measured whole to fit the correction.", min=0,
                                         max=10_000)] = 20,
    name: Annotated[str | None, typer.Option(help="Model name; default lookup-table-<base>-<profile>.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random plans.")] = 0,
    timeout: Annotated[float | None, typer.Option(
        help="Remote profile: seconds to wait for the agent's batch job; default the profile's timeout_s "
             "per measurement in the batch.", min=0.1)] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Time every prunable layer at each kept-channel option (NetAdapt's lookup table), fit its
    correction on random plans measured whole, and store it. On a remote profile every
    measurement is one batch job, which one agent makes in one lease."""
    with handle_errors():
        from latency_models.predictors import variants
        from search.pipeline.features import architecture_features
        from search.pipeline.onnx_export import export_onnx
        from search.pipeline.space import apply, build_space
        from search.storage import Repository
        from search.storage.queue import LIVE_S

        profile = resolve_profile(profile_name, state.profile_dirs)
        repo = Repository(db_url(db or state.db), artifacts=artifacts_url(db_url(db or state.db)))
        try:
            if profile.location != "local" and not repo.jobs.live_agents(profile.name, LIVE_S):
                raise ConfigError(f"no live agent serves remote profile {profile.name!r}: start one on the device "
                                  f"(`hwprune agents add NAME --profile {profile.name}`, then `hwprune agent`)")
            bundle = bundle_from_options(example, model)
            space = build_space(bundle.model, bundle.example_input, [profile], ignored=ignore or ())
            base = architecture_features(bundle.model, bundle.example_input)
            layers = variants(base, {k: (ins or (base.by_name()[k].in_channels,),
                                         outs or (base.by_name()[k].out_channels,))
                                     for k, (ins, outs) in space.layer_widths().items() if k in base.by_name()})
            rng = random.Random(seed)
            with tempfile.TemporaryDirectory() as tmp:
                base_artifact = export_onnx(bundle.model, bundle.example_input, Path(tmp) / "base",
                                            batch_size=profile.batch_size)
                plans = []
                for _ in range(samples):
                    pruned = apply(bundle.model, bundle.example_input, space, space.random_plan(rng),
                                   calibration=bundle.train_loader)
                    features = architecture_features(pruned.model, bundle.example_input, pruned.patterns)
                    plans.append((features, export_onnx(pruned.model, bundle.example_input, Path(tmp) / "plans",
                                                        batch_size=profile.batch_size)))
                artifacts = [artifact for _, artifact in plans]
                if profile.location == "local":
                    figures = _measure_here(profile, base_artifact, layers, artifacts)
                else:
                    wait_s = timeout if timeout is not None else profile.timeout_s * (len(layers) + samples + 1)
                    figures = _measure_remote(repo, profile, base_artifact, layers, artifacts, wait_s)
            lut, stored = fit_and_store(repo, base, layers, figures, [f for f, _ in plans], name=name,
                                        profile=profile, base_fingerprint=bundle.fingerprint())
        finally:
            repo.close()
        data = {"name": stored.name, "version": stored.version, "kind": stored.kind, "profile": profile.name,
                "location": profile.location, "layers_timed": len(lut.table), "samples": len(lut.samples),
                "held_out": _held_out_dict(lut.held_out)}
        if as_json:
            echo_json(data)
            return
        where = "here" if profile.location == "local" else "by one agent in one lease"
        stdout().print(f"stored {stored.name} v{stored.version}: {len(lut.table)} layer shapes timed, correction "
                       f"fitted on {len(lut.samples)} measured plans (measured {where})", highlight=False)
        _print_held_out(lut.held_out)


def fit_and_store(repo: Any, base: Any, layers: Sequence[Any], figures: Any, plan_features: Sequence[Any], *,
                  name: str | None, profile: Any, base_fingerprint: str) -> tuple[Any, Any]:
    """The lookup table from a batch's figures (``layers`` and ``plan_features`` in the batch's
    order), its correction fitted on the plans' measured ratios, saved as a new version: the
    one way a table is made, whether the batch was measured here or by an agent."""
    from latency_models.predictors import LookupTableModel
    from latency_models.predictors.lookup import entry_key
    from search.storage.predictor_store import LatencyModelStore
    from search.study.screening import model_name

    table = {entry_key(layer): us for layer, us in zip(layers, figures.layers_us, strict=True)}
    lut = LookupTableModel(base, table)
    lut.fit([(features, figure.ratio) for features, figure in zip(plan_features, figures.plans, strict=True)])
    stored = LatencyModelStore(repo.engine).save(
        name or model_name(lut.kind, base_fingerprint, profile.name), lut, profile=profile.name,
        profile_fingerprint=profile.fingerprint(), base_fingerprint=base_fingerprint)
    return lut, stored


def _measure_here(profile: Any, base: Any, layers: Sequence[Any], plans: Sequence[Any]) -> Any:
    from latency_models import registry
    from latency_models.batch import measure_batch
    from search import progress

    what = f"timing {len(layers)} layer shapes and {len(plans)} plans"
    with registry.get(profile.backend)(profile) as backend, progress.task(what, len(layers) + len(plans)) as advance:
        seen = 0

        def told(done: int) -> None:
            nonlocal seen
            advance(done - seen)
            seen = done

        return measure_batch(backend, base.path, layers, [a.path for a in plans], progress=told)


def _measure_remote(repo: Any, profile: Any, base: Any, layers: Sequence[Any], plans: Sequence[Any],
                    timeout_s: float, poll_s: float = 0.25) -> Any:
    """One batch job for the profile's agents; its figures once done. Failure or timeout raise
    (the job is then cancelled, so no agent measures it for nobody)."""
    from latency_models import JobStatus, MeasurementError, MeasurementTimeout
    from latency_models.wire import BatchSpec
    from search import progress

    for artifact in (base, *plans):
        repo.put_artifact_file(artifact.path, artifact.sha256)
    job_id = repo.jobs.submit_batch(profile=profile.name, profile_fingerprint=profile.fingerprint(),
                                    base_sha256=base.sha256,
                                    batch=BatchSpec(layers=list(layers), plans=[a.sha256 for a in plans]))
    total, seen = len(layers) + len(plans), 0
    deadline = time.monotonic() + timeout_s
    finished = False
    try:
        with progress.task(f"batch job {job_id} on {profile.name}: {len(layers)} layer shapes, {len(plans)} plans",
                           total) as advance:
            while True:
                job = repo.jobs.get(job_id)
                if job is None:
                    raise MeasurementError(f"batch job {job_id} vanished from the queue")
                if job.progress is not None and job.progress > seen:
                    advance(job.progress - seen)
                    seen = job.progress
                if job.status is JobStatus.DONE and job.batch_result is not None:
                    finished = True
                    return job.batch_result.figures()
                if job.status is JobStatus.FAILED:
                    finished = True
                    raise MeasurementError(f"batch job {job_id} on {profile.name!r} failed: {job.last_error}")
                if time.monotonic() > deadline:
                    raise MeasurementTimeout(
                        f"no agent finished batch job {job_id} on {profile.name!r} within {timeout_s:g} s (status "
                        f"{job.status.value}, {seen} of {total} measured); nothing stored, the job is cancelled; "
                        "check `hwprune agents list`, or give a longer --timeout")
                time.sleep(poll_s)
    finally:
        if not finished:
            repo.jobs.cancel(job_id, "the build that submitted this batch stopped waiting (timeout or interrupt)")


def _print_held_out(held: Any) -> None:
    if held is None:
        stdout().print("held-out error: too few samples to say (it predicts with an infinite interval)",
                       highlight=False)
        return
    stdout().print(
        f"held-out ({held.n} samples, {5}-fold): {100 * held.within_5:.1f}% within +-5%, "
        f"{100 * held.within_10:.1f}% within +-10%, MAPE {100 * held.mape:.2f}%, worst {100 * held.worst:.1f}%",
        highlight=False)


@latency_model_app.command("eval")
def evaluate(
    name: Annotated[str, typer.Argument(help="A stored latency model.")],
    profile_name: ProfileOpt,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cross-validate a stored model on its own samples, now: each sample predicted by a model
    fitted without it (share within +-5% / +-10%, MAPE, worst case)."""
    with handle_errors():
        from latency_models.predictors import from_state
        from search.storage import Repository
        from search.storage.predictor_store import LatencyModelStore
        from search.storage.repository import require_database

        profile = resolve_profile(profile_name, state.profile_dirs)
        url = db_url(db or state.db)
        require_database(url)
        repo = Repository(url, artifacts=artifacts_url(url))
        try:
            stored = LatencyModelStore(repo.engine).get(name, profile=profile.name)
        finally:
            repo.close()
        fitted = from_state(stored.state)
        samples, fitted.samples = fitted.samples, []
        held = fitted.fit(samples)
        data = {"name": stored.name, "version": stored.version, "kind": stored.kind, "profile": stored.profile,
                "profile_fingerprint_matches": stored.profile_fingerprint == profile.fingerprint(),
                "samples": len(samples), "held_out": _held_out_dict(held)}
        if as_json:
            echo_json(data)
            return
        stdout().print(f"{stored.name} v{stored.version} ({stored.kind}, {stored.profile})", highlight=False)
        _print_held_out(held)
        if not data["profile_fingerprint_matches"]:
            stdout().print("note: fitted on other settings of this profile (its fingerprint changed)",
                           style="yellow", highlight=False)


@app.command("predict")
def predict(
    plan_file: Annotated[Path, typer.Option("--plan", help="Plan YAML/JSON.")],
    profile_name: ProfileOpt,
    example: ExampleOpt = None,
    model: ModelOpt = None,
    ignore: IgnoreOpt = None,
    name: Annotated[str | None, typer.Option(help="Latency model; default the best stored one for this "
                                                  "model and profile.")] = None,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Predict a plan's latency ratio to the base model with a stored latency model."""
    with handle_errors():
        from search.pipeline.features import architecture_features
        from search.pipeline.plan import Plan
        from search.pipeline.space import apply, build_space
        from search.storage import Repository
        from search.storage.predictor_store import LatencyModelStore
        from search.storage.repository import require_database

        profile = resolve_profile(profile_name, state.profile_dirs)
        plan = Plan.load(plan_file)
        url = db_url(db or state.db)
        require_database(url)
        bundle = bundle_from_options(example, model)
        repo = Repository(url, artifacts=artifacts_url(url))
        try:
            store = LatencyModelStore(repo.engine)
            if name is not None:
                stored = store.get(name, profile=profile.name)
            else:
                found = [s for s in store.for_target(profile_fingerprint=profile.fingerprint(),
                                                     base_fingerprint=bundle.fingerprint())]
                if not found:
                    raise ConfigError(f"no latency model for this model on {profile.name!r}; build one with "
                                      "`hwprune latency-model build` or run a search with --latency hybrid")
                stored = min(found, key=lambda s: s.held_out.mape if s.held_out else float("inf"))
        finally:
            repo.close()
        if stored.base_fingerprint != bundle.fingerprint():
            raise ConfigError(f"latency model {stored.name!r} was fitted for another base model")
        space = build_space(bundle.model, bundle.example_input, [profile], ignored=ignore or ())
        pruned = apply(bundle.model, bundle.example_input, space, plan, calibration=bundle.train_loader)
        features = architecture_features(pruned.model, bundle.example_input, pruned.patterns)
        prediction = stored.model().predict(features)
        data = {"model": stored.name, "version": stored.version, "ratio": prediction.ratio,
                "interval": [prediction.low, prediction.high], "coverage": 0.9,
                "held_out": _held_out_dict(stored.held_out)}
        if as_json:
            echo_json(data)
            return
        interval = (f"90% interval {prediction.low:.4f}-{prediction.high:.4f}" if prediction.high != float("inf")
                    else "interval unknown (too few samples)")
        stdout().print(f"ratio to the base model on {profile.name}: {prediction.ratio:.4f} ({interval}); "
                       f"{stored.name} v{stored.version}", highlight=False)
