"""The artifact store: content-addressed ONNX files in a folder or at an fsspec URL."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

import pytest

from search.config import artifacts_url
from search.errors import ConfigError, StorageError
from search.storage.artifacts import ArtifactStore


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@pytest.fixture(params=["folder", "fsspec-memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "folder":
        return ArtifactStore(str(tmp_path / "store"))
    pytest.importorskip("fsspec")
    return ArtifactStore(f"memory://hwprune-{uuid.uuid4().hex}")


def test_put_read_names_and_checks(store: ArtifactStore, tmp_path: Path) -> None:
    first, second = b"model one", b"model two"
    assert store.put_bytes(first) == _sha(first)
    path = tmp_path / "two.onnx"
    path.write_bytes(second)
    assert store.put_file(path, _sha(second)) == _sha(second)
    assert store.put_bytes(first, _sha(first)) == _sha(first)  # twice is harmless
    assert store.names() == {_sha(first), _sha(second)}
    assert store.read_bytes(_sha(first)) == first and store.size_bytes() == len(first) + len(second)
    assert store.read_bytes("0" * 64) is None
    out = tmp_path / "out" / "fetched.onnx"
    assert store.fetch_to(_sha(second), out) and out.read_bytes() == second
    with pytest.raises(StorageError, match="expected 000000000000"):
        store.put_bytes(b"other", "0" * 64)
    with pytest.raises(StorageError, match="is not a sha256"):
        store.read_bytes("../../etc/passwd")


def test_prune_keeps_what_is_needed_and_what_is_young(store: ArtifactStore) -> None:
    kept, young, old = b"on a front", b"just stored", b"no longer needed"
    for content in (kept, young, old):
        store.put_bytes(content)
    report = store.prune({_sha(kept)}, min_age_s=3600)
    assert report.removed == 0 and report.kept == 3  # all younger than an hour
    report = store.prune({_sha(kept)}, min_age_s=0)
    assert (report.removed, report.freed_bytes, report.kept) == (2, len(young) + len(old), 1)
    assert store.names() == {_sha(kept)}


def test_a_tampered_file_is_never_served(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    sha = store.put_bytes(b"the real model")
    path = store.local_path(sha)
    assert path is not None
    path.write_bytes(b"the real modem")
    assert store.read_bytes(sha) is None and not store.exists(sha)  # removed: re-made when needed


def test_old_files_are_pruned_by_age(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    sha = store.put_bytes(b"an old trial")
    path = store.local_path(sha)
    assert path is not None
    hour_ago = time.time() - 3600
    os.utime(path, (hour_ago, hour_ago))
    assert store.prune(set(), min_age_s=600).removed == 1


def test_default_location_beside_sqlite_else_under_the_cache(tmp_path: Path) -> None:
    env = {"HWPRUNE_CACHE": str(tmp_path / "cache")}
    assert artifacts_url(f"sqlite:///{tmp_path / 'runs.db'}", env) == str(tmp_path / "runs.artifacts")
    elsewhere = artifacts_url("postgresql+psycopg://me:secret@db/hwprune", env)
    assert elsewhere.startswith(str(tmp_path / "cache" / "artifacts")) and "secret" not in elsewhere
    assert elsewhere != artifacts_url("postgresql+psycopg://me@db/other", env)
    assert artifacts_url("sqlite:///x.db", {**env, "HWPRUNE_ARTIFACTS": "s3://bucket/p"}) == "s3://bucket/p"


def test_an_unknown_url_scheme_is_a_config_error() -> None:
    pytest.importorskip("fsspec")
    with pytest.raises(ConfigError, match="artifact store 'nosuchscheme://x' cannot be used"):
        ArtifactStore("nosuchscheme://x")
