"""Shared fixtures: small models built in code and exported to real ONNX files."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hardware_profiles import HardwareProfile, load_profile_file
from search.cli._app import EXTRA_OF_MODULE


def export_model(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export with the TorchScript exporter (fast) and a dynamic batch dimension."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    return path


def tiny_convnet(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def onnx_artifact(onnx_dir: Path) -> Path:
    """A small CNN (16 channels, 32x32 input) exported to ONNX."""
    return export_model(tiny_convnet(16), torch.randn(1, 3, 32, 32), onnx_dir / "tiny16.onnx")


@pytest.fixture(scope="session")
def onnx_artifact_wide(onnx_dir: Path) -> Path:
    """The same CNN four times as wide: clearly slower than ``onnx_artifact``."""
    return export_model(tiny_convnet(64), torch.randn(1, 3, 32, 32), onnx_dir / "tiny64.onnx")


@pytest.fixture
def write_profile(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a YAML profile into a fresh folder and return its path."""
    folder = tmp_path / "profiles"
    folder.mkdir(exist_ok=True)

    def write(name: str, text: str) -> Path:
        path = folder / f"{name}.yaml"
        path.write_text(text)
        return path

    return write


FAST_PROFILE = """\
backend: onnxruntime
device_class: cpu
threads: 1
warmup: {runs: 2, min_seconds: 0}
repeat: {min_runs: 10, max_runs: 200, max_seconds: 0.3, check_every: 5, target_rel_precision: 0.05}
channel_multiple: 8
"""


@pytest.fixture
def fast_profile_path(write_profile: Callable[[str, str], Path]) -> Path:
    """A local ONNX Runtime profile with short warm-up and timing, for tests."""
    return write_profile("fast", FAST_PROFILE)


@pytest.fixture
def fast_profile(fast_profile_path: Path) -> HardwareProfile:
    return load_profile_file(fast_profile_path)


@pytest.fixture(scope="session")
def hwprune_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder shared by the session: the digits example trains once per test run."""
    return tmp_path_factory.mktemp("hwprune-cache")


@pytest.fixture(scope="session")
def digits_bundle(hwprune_cache: Path) -> Any:
    from search.examples.digits import digits

    return digits(cache_dir=hwprune_cache)


# --- databases ----------------------------------------------------------------------------------


def _postgres_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server for the session: ``TEST_POSTGRES_URL``, else a throwaway cluster.

    The cluster lives in a temporary folder and listens on a free loopback port; as root it runs
    as the ``postgres`` user (initdb refuses root). Without a server the PostgreSQL tests skip,
    unless ``REQUIRE_POSTGRES=1`` (CI), where they fail.
    """
    if os.environ.get("TEST_POSTGRES_URL"):
        yield os.environ["TEST_POSTGRES_URL"]
        return
    required = os.environ.get("REQUIRE_POSTGRES") == "1"
    bindir = _postgres_bindir()
    if bindir is None:
        if required:
            pytest.fail("REQUIRE_POSTGRES=1 but no PostgreSQL server binaries (initdb) are installed")
        pytest.skip("no PostgreSQL server installed (apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="hwprune-pg-"))
    user: str | None = None
    if os.geteuid() == 0:
        user = "postgres"
        shutil.chown(folder, user=user)
    data, port = folder / "data", _free_port()
    run = functools.partial(subprocess.run, check=True, capture_output=True, user=user)
    try:
        run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "start", "-o",
             f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"])
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        message = f"could not start PostgreSQL: {exc} {detail.decode(errors='replace')[-500:]}"
        shutil.rmtree(folder, ignore_errors=True)
        if required:
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, user=user)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hwprune.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    from sqlalchemy import create_engine, text

    name = f"hwprune_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --- the hub on loopback, and agents as real subprocesses ----------------------------------------


class HubThread:
    """The hub (real uvicorn) in a thread on 127.0.0.1; ``restart()`` keeps its port."""

    def __init__(self, db_url: str, *, lease_s: float = 2.0, max_result_bytes: int | None = None) -> None:
        from search.hub.app import HubSettings

        self.settings = HubSettings(db_url=db_url, lease_s=lease_s)
        if max_result_bytes is not None:
            self.settings = dataclasses.replace(self.settings, max_result_bytes=max_result_bytes)
        self.port = 0
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubThread:
        import uvicorn

        from search.hub.app import create_app

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = int(sock.getsockname()[1])
        self._socket = sock
        config = uvicorn.Config(create_app(self.settings), log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the hub did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def start_hub(monkeypatch: pytest.MonkeyPatch, hwprune_cache: Path) -> Iterator[Callable[..., HubThread]]:
    # A hub and the searches that tests run beside it (CliRunner with HWPRUNE_CACHE set to this
    # session's cache) must find one artifact store; for a PostgreSQL database its default is
    # under HWPRUNE_CACHE, so this process (the hub's) uses the same cache.
    monkeypatch.setenv("HWPRUNE_CACHE", str(hwprune_cache))
    hubs: list[HubThread] = []

    def start(db_url: str, **kwargs: Any) -> HubThread:
        hub = HubThread(db_url, **kwargs).start()
        hubs.append(hub)
        return hub

    yield start
    for hub in hubs:
        hub.stop()


# Runs ``hwprune`` with every module of the ``search`` extra made unimportable (torch, optuna,
# torch-pruning, SQLAlchemy, FastAPI...): the agent's whole code path (CLI, HTTP client, ONNX checks,
# ONNX Runtime) must work on a device with only ``pip install 'hwprune[agent]'``.
AGENT_LAUNCHER = """
import sys
BLOCKED = {!r}
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ModuleNotFoundError(f'{{name}} is blocked: the agent must not import it', name=name)
        return None
sys.meta_path.insert(0, _Block())
from search.cli.main import main
sys.argv = ['hwprune'] + sys.argv[1:]
main()
""".format(sorted(m for m, extra in EXTRA_OF_MODULE.items() if extra == "search"))


@pytest.fixture
def agent_launcher() -> str:
    return AGENT_LAUNCHER


@pytest.fixture
def spawn_agent(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []

    def spawn(hub_url: str, token: str, profile: str, profiles_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
        work = tmp_path / f"agent-{len(processes)}"
        env = {**os.environ, "HWPRUNE_AGENT_TOKEN": token, "HWPRUNE_PROFILES": str(profiles_dir),
               "HWPRUNE_CACHE": str(work)}
        log = (tmp_path / f"agent-{len(processes)}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-c", AGENT_LAUNCHER, "agent", "--server", hub_url, "--profile", profile,
             "--poll", "0.1", "--heartbeat", "0.3", *extra],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        processes.append(process)
        return process

    yield spawn
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


# A loopback stand-in for a Jetson Orin profile, shared with bench/faults.py.
STANDIN_PROFILE = (Path(__file__).parent / "standin_profile.yaml").read_text()


@pytest.fixture
def standin_profiles(tmp_path: Path) -> Path:
    """A folder whose ``jetson-orin-ort-cpu`` is a fast loopback stand-in (named so above)."""
    folder = tmp_path / "standin-profiles"
    folder.mkdir()
    (folder / "jetson-orin-ort-cpu.yaml").write_text(STANDIN_PROFILE)
    return folder
