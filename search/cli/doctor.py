"""Self-checks: which backends run here, and a dense vs 2:4 comparison on a GPU.

``gpu_check`` is the first thing to run on a machine with an NVIDIA GPU and TensorRT: it builds
and times a ResNet-18 (ImageNet width, 224x224) dense and with 2:4 sparsity on every eligible
layer, and reports which layers TensorRT ran with sparse kernels.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from hardware_profiles import HardwareProfile
from latency_models import LatencyError, registry
from search.cli._app import JsonOpt, app, echo_json, handle_errors, state, stdout


@dataclass(frozen=True, slots=True)
class BackendStatus:
    name: str
    available: bool
    detail: str


def backend_statuses(profiles: list[HardwareProfile]) -> list[BackendStatus]:
    """Open every registered backend with a profile that uses it; report what happened."""
    statuses = []
    by_backend = {p.backend: p for p in profiles}
    for name in registry.names():
        profile = by_backend.get(name)
        if profile is None and profiles:
            # A backend no profile names yet (trtexec): try it with the first profile's settings.
            profile = profiles[0].model_copy(update={"backend": name})
        if profile is None:
            statuses.append(BackendStatus(name, False, "no profile to try it with"))
            continue
        try:
            with registry.get(name)(profile) as backend:
                statuses.append(BackendStatus(name, True, f"{backend.version()} on {backend.device()}"))
        except LatencyError as exc:
            statuses.append(BackendStatus(name, False, str(exc)))
    return statuses


@dataclass(frozen=True, slots=True)
class GpuCheckRow:
    model: str
    median_us: float
    ratio_to_dense: float
    sparse_layers: int
    nm_layers: int


def gpu_check(profile: HardwareProfile, *, resolution: int = 224) -> list[GpuCheckRow]:
    """Time ResNet-18 dense and 2:4 on ``profile``'s GPU backend (raises where it cannot run)."""
    from search.examples.zoo import make_architecture
    from search.pipeline.onnx_export import export_onnx
    from search.pipeline.plan import Plan
    from search.pipeline.space import apply, build_space

    model, example = make_architecture("resnet18-full", resolution=resolution)
    nm_profile = profile if "2:4" in profile.sparsity_patterns else profile.model_copy(
        update={"sparsity_patterns": ("2:4",)})
    space = build_space(model, example, [nm_profile])
    sparse_plan = Plan(sparsity={choice.layer: "2:4" for choice in space.sparsity})
    rows = []
    with tempfile.TemporaryDirectory() as tmp, registry.get(profile.backend)(nm_profile) as backend:
        dense = export_onnx(model, example, Path(tmp), batch_size=profile.batch_size)
        sparse_model = apply(model, example, space, sparse_plan).model
        sparse = export_onnx(sparse_model, example, Path(tmp), batch_size=profile.batch_size)
        dense_result = backend.measure(dense.path)
        paired = backend.measure_paired(sparse.path, dense.path)
        report = getattr(backend, "sparse_report", {})
        sparse_counts = sorted(len(v) for v in report.values())
        rows.append(GpuCheckRow("resnet18 dense", dense_result.median_us, 1.0,
                                sparse_counts[0] if sparse_counts else 0, 0))
        rows.append(GpuCheckRow("resnet18 2:4", paired.candidate.median_us, paired.ratio,
                                sparse_counts[-1] if sparse_counts else 0, len(sparse_plan.sparsity)))
    return rows


@app.command("doctor", short_help="Show versions, devices and which latency backends run here.")
def doctor(
    gpu: Annotated[bool, typer.Option("--gpu", help="Build and time ResNet-18 dense and 2:4 with TensorRT.")] = False,
    profile: Annotated[str, typer.Option("--profile", "-p", help="GPU profile for --gpu.")] = "ampere-trt-fp16",
    as_json: JsonOpt = False,
) -> None:
    """Show versions, the devices model work can run on and which latency backends run here;
    with --gpu, verify TensorRT and 2:4."""
    with handle_errors():
        from hardware_profiles import discover, load_profile_file
        from search.pipeline.device import available_devices
        from search.study.runtime import package_versions

        profiles = [load_profile_file(s.path) for s in discover(state.profile_dirs).values()]
        if not gpu:
            devices = available_devices()
            if as_json:
                echo_json({"versions": package_versions(), "devices": [asdict(device) for device in devices],
                           "backends": [asdict(status) for status in backend_statuses(profiles)]})
                return
            out = stdout()
            for package, version in package_versions().items():
                out.print(f"{package}: {version}", highlight=False)
            devices_table = Table("device (--device)", "detail", title="Model work: recovery, calibration, scoring")
            for device in devices:
                devices_table.add_row(device.name, escape(device.detail))
            out.print(devices_table)
            table = Table("backend", "runs here", "detail", title="Measurement")
            for status in backend_statuses(profiles):
                table.add_row(status.name, "yes" if status.available else "no", escape(status.detail))
            out.print(table)
            return
        from hardware_profiles import load_profile

        rows = gpu_check(load_profile(profile, state.profile_dirs))
        if as_json:
            echo_json({"versions": package_versions(), "profile": profile, "gpu_check": [asdict(r) for r in rows]})
            return
        table = Table("model", "median us", "ratio to dense", "layers on sparse kernels", "2:4 layers",
                      title=f"TensorRT self-check on {profile}")
        for row in rows:
            table.add_row(row.model, f"{row.median_us:.1f}", f"{row.ratio_to_dense:.3f}",
                          str(row.sparse_layers), str(row.nm_layers))
        stdout().print(table)
