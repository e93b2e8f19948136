"""hwprune's Alembic migrations on real SQLite and PostgreSQL databases, beside Optuna's tables."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from sqlalchemy import create_engine, inspect, text

from search.errors import SchemaError
from search.storage import Repository, current_revision, ensure_schema, head_revision, upgrade
from search.storage.artifacts import ArtifactStore
from search.storage.migrate import _config

OUR_TABLES = {"hwprune_searches", "hwprune_artifacts", "hwprune_measurements", "hwprune_agents", "hwprune_jobs"}


def _optuna_storage(url: str) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.storages.RDBStorage(url)


def test_upgrade_from_empty(db_url: str) -> None:
    upgrade(db_url)
    engine = create_engine(db_url)
    names = set(inspect(engine).get_table_names())
    assert OUR_TABLES <= names
    assert "hwprune_alembic_version" in names
    assert "alembic_version" not in names  # Optuna's version table is not ours to create
    assert current_revision(engine) == head_revision()
    engine.dispose()


@pytest.mark.parametrize("optuna_first", [True, False])
def test_coexists_with_optuna_either_order(db_url: str, optuna_first: bool) -> None:
    if optuna_first:
        _optuna_storage(db_url)
        Repository(db_url).close()
    else:
        Repository(db_url).close()
        _optuna_storage(db_url)
    storage = _optuna_storage(db_url)  # Optuna's own schema check passes
    study = optuna.create_study(storage=storage, study_name="s")
    assert study.study_name == "s"
    engine = create_engine(db_url)
    with engine.connect() as connection:
        ours = connection.execute(text("SELECT version_num FROM hwprune_alembic_version")).scalar_one()
        theirs = connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    assert ours == head_revision() and theirs != ours
    engine.dispose()


def test_alembic_check_is_clean(db_url: str) -> None:
    from alembic import command

    _optuna_storage(db_url)  # Optuna's 13 tables must not show up as "to be dropped"
    upgrade(db_url)
    command.check(_config(db_url))  # type: ignore[arg-type]  # raises on any difference


def test_unknown_revision_is_refused_and_data_kept(db_url: str) -> None:
    upgrade(db_url)
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("INSERT INTO hwprune_artifacts (sha256, size_bytes, created_at) "
                                "VALUES ('abc', 1, CURRENT_TIMESTAMP)"))
        connection.execute(text("UPDATE hwprune_alembic_version SET version_num = 'ffff'"))
    with pytest.raises(SchemaError, match="schema at ffff, which this hwprune does not know.*upgrade hwprune"):
        ensure_schema(engine, db_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM hwprune_artifacts")).scalar_one() == 1
    engine.dispose()


def test_tables_without_version_are_refused(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE hwprune_searches (id INTEGER PRIMARY KEY)"))
    with pytest.raises(SchemaError, match="has hwprune tables but no schema version"):
        ensure_schema(engine, db_url)
    engine.dispose()


ASSETS = Path(__file__).with_name("assets")


def test_older_schema_is_refused_then_upgraded_with_trials_kept(tmp_path: Path) -> None:
    """A database written by the released 0001 schema (a finished 6-trial search, checked in)."""
    from typer.testing import CliRunner

    from search.cli.main import app

    db = tmp_path / "old.db"
    shutil.copyfile(ASSETS / "schema_0001.db", db)
    url = f"sqlite:///{db}"
    with pytest.raises(SchemaError, match=rf"schema at 0001, this hwprune expects {head_revision()}: "
                       r"run `hwprune db upgrade --db "):
        Repository(url)
    runner = CliRunner()
    refused = runner.invoke(app, ["search", "status", "t1", "--db", url])
    assert refused.exit_code == 2 and "run `hwprune db upgrade" in refused.stderr
    upgraded = runner.invoke(app, ["db", "upgrade", "--db", url])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"schema 0001 -> {head_revision()}" in upgraded.stdout
    # 0004 moved its ONNX blobs (base model and trials) into the store beside the database file.
    moved = ArtifactStore(str(tmp_path / "old.artifacts")).names()
    with create_engine(url).connect() as connection:
        named = set(connection.execute(text("SELECT sha256 FROM hwprune_artifacts")).scalars())
    assert moved and moved == named
    status = runner.invoke(app, ["search", "status", "t1", "--db", url, "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["completed"] == 6
    pareto = runner.invoke(app, ["pareto", "t1", "--db", url, "--json"])
    assert pareto.exit_code == 0 and json.loads(pareto.stdout)


def test_trials_stored_by_the_previous_release_read_unchanged(tmp_path: Path, start_hub: Callable[..., Any]) -> None:
    """A search written by hwprune at commit 06f14df (before the typed trial record; checked in
    with what that version's `search trials/status --json` and `pareto --json` printed) reads
    back through the record as it did then, through the CLI and the hub alike."""
    import httpx
    from typer.testing import CliRunner

    from search.cli.main import app
    from search.storage.queue import JobQueue
    from search.storage.record import read_trials

    db = tmp_path / "old.db"
    shutil.copyfile(ASSETS / "trials_06f14df.db", db)
    url = f"sqlite:///{db}"
    expected = json.loads((ASSETS / "trials_06f14df.json").read_text())
    runner = CliRunner()
    for command, key in ((["search", "trials"], "trials"), (["search", "status"], "status"), (["pareto"], "pareto")):
        result = runner.invoke(app, [*command, "old", "--db", url, "--json"])
        assert result.exit_code == 0, result.output
        assert _as_then(key, json.loads(result.stdout)) == expected[key], command
    records = read_trials(_load_study(url, "hwprune:old"))
    assert {r.version for r in records} == {1}  # stored before records were versioned
    done = [r for r in records if r.state == "COMPLETE"]
    assert done and all(r.error is not None and r.latency and r.plan for r in done)
    assert all(f.source == "measured" and f.ratio > 0 for r in done for f in r.latency.values())
    repo = Repository(url)
    token = JobQueue(repo.engine).add_agent("reader", "", role="reader")
    repo.close()
    hub = start_hub(url)
    with httpx.Client(base_url=hub.url + "/v1", headers={"Authorization": f"Bearer {token}"}) as reader:
        assert reader.get("/searches/old/trials").json() == expected["trials"]
        assert reader.get("/searches/old").json() == expected["status"]
        assert _as_then("pareto", reader.get("/searches/old/pareto").json()) == expected["pareto"]


# Keys a document gained after 06f14df, with the values they must have for a search stored then:
# the front names the trials that reached a row (issue 34), and what its error measures (a search
# stored before that was recorded says only "error", with no 1 - error figure of its own).
ADDED_SINCE: dict[str, dict[str, Callable[[dict[str, Any]], bool]]] = {
    "pareto": {"error_name": lambda row: row["error_name"] == "error",
               "score_name": lambda row: row["score_name"] is None,
               "trials": lambda row: row["trials"][0] == row["trial"]}}


def _as_then(key: str, document: Any) -> Any:
    """``document`` without the keys added since, after checking what they hold."""
    added = ADDED_SINCE.get(key)
    if not added:
        return document
    for row in document:
        for name, holds in added.items():
            assert holds(row), (name, row[name])
    return [{k: v for k, v in row.items() if k not in added} for row in document]


def _load_study(url: str, name: str) -> optuna.Study:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.load_study(study_name=name, storage=url)


def test_upgrade_from_0001_moves_artifacts_into_the_store(db_url: str, tmp_path: Path) -> None:
    """0004 moves each stored blob into the artifact store (checked by its sha256), drops a blob
    whose bytes do not match its name, and removes the column; the downgrade brings them back."""
    upgrade(db_url, "0001")
    engine = create_engine(db_url)
    good = b"onnx bytes of some trial"
    good_sha = hashlib.sha256(good).hexdigest()
    with engine.begin() as connection:
        for sha, content in ((good_sha, good), ("f" * 64, b"torn")):
            connection.execute(text("INSERT INTO hwprune_artifacts (sha256, size_bytes, content, created_at) "
                                    "VALUES (:s, :n, :b, CURRENT_TIMESTAMP)"),
                               {"s": sha, "n": len(content), "b": content})
    with pytest.raises(SchemaError, match="schema at 0001"):
        ensure_schema(engine, db_url)
    store = ArtifactStore(str(tmp_path / "store"))
    upgrade(db_url, artifacts=store.url)
    assert current_revision(engine) == head_revision()
    assert "content" not in {c["name"] for c in inspect(engine).get_columns("hwprune_artifacts")}
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT sha256, size_bytes FROM hwprune_artifacts")).all()
        assert [tuple(r) for r in rows] == [(good_sha, len(good))]
        assert connection.execute(text("SELECT count(*) FROM hwprune_jobs")).scalar_one() == 0
    assert store.read_bytes(good_sha) == good and store.names() == {good_sha}
    from alembic import command

    command.downgrade(_config(db_url, store.url), "0003")  # type: ignore[arg-type]
    with engine.connect() as connection:
        assert connection.execute(text("SELECT content FROM hwprune_artifacts")).scalar_one() == good
    engine.dispose()


def test_upgrade_from_0002_keeps_agents_and_jobs(db_url: str) -> None:
    """0003 adds agent roles and flagged results: existing agents stay agents, jobs stay put."""
    upgrade(db_url, "0002")
    engine = create_engine(db_url)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO hwprune_agents (name, profile, token_hash, revoked, jobs_done, created_at) "
            "VALUES ('orin-1', 'p', 'h', false, 3, CURRENT_TIMESTAMP)"))
        connection.execute(text(
            "INSERT INTO hwprune_jobs (status, profile, profile_fingerprint, signature, artifact_sha256, "
            "reference_sha256, attempts, max_attempts, created_at, updated_at) "
            "VALUES ('queued', 'p', 'f', 's', 'a', '', 0, 3, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
    upgrade(db_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT role, jobs_done FROM hwprune_agents")).one() == ("agent", 3)
        assert connection.execute(text("SELECT status, flagged_json FROM hwprune_jobs")).one() == ("queued", None)
    engine.dispose()


def test_empty_part_migrated_database_is_finished_not_refused(db_url: str) -> None:
    """A process SIGKILLed while it created a database leaves it at an older revision, empty."""
    upgrade(db_url, "0001")
    engine = create_engine(db_url)
    ensure_schema(engine, db_url)
    assert current_revision(engine) == head_revision()
    engine.dispose()
