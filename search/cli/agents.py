"""``hwprune serve``, ``hwprune agents ...`` and ``hwprune agent``: the remote-profiler commands.

``hwprune agent`` runs on the device: its path imports neither torch nor optuna.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from latency_models.wire import clean_text
from search.cli._app import HELP, DbOpt, JsonOpt, app, echo_json, handle_errors, state, stderr, stdout
from search.config import artifacts_url, cache_dir, check_backend, db_url
from search.errors import ConfigError

agents_app = typer.Typer(help="Register, list and revoke remote profiler agents.", no_args_is_help=True, **HELP)  # type: ignore[arg-type]
app.add_typer(agents_app, name="agents")

TOKEN_ENV = "HWPRUNE_AGENT_TOKEN"


def _queue(db: str | None) -> tuple[object, object]:
    from search.storage import Repository
    from search.storage.queue import JobQueue

    repo = Repository(db_url(db or state.db), artifacts=artifacts_url(db_url(db or state.db)))
    return repo, JobQueue(repo.engine)


@agents_app.command("add")
def agents_add(
    name: Annotated[str, typer.Argument(help="Agent name, e.g. the device's host name.")],
    profile: Annotated[str | None, typer.Option("--profile", "-p", help="The profile this agent serves.")] = None,
    reader: Annotated[bool, typer.Option("--reader", help="A token that may only read searches "
                                         "through the hub (/v1/searches...), for dashboards and scripts.")] = False,
    db: DbOpt = None,
) -> None:
    """Register an agent (or a reader) and print its token (shown once; only its hash is stored)."""
    with handle_errors():
        from hardware_profiles import load_profile
        from latency_models.wire import AGENT_NAME
        from search.storage.queue import AGENT, READER

        if reader == (profile is not None):
            raise ConfigError("give --profile PROFILE for an agent, or --reader for a read-only token")
        if not AGENT_NAME.match(name):  # checked before the database is opened or created
            raise ConfigError(f"agent name {clean_text(name, 40)!r} must be 1-100 letters, digits, '.', '_' "
                              "or '-', starting with a letter or digit (e.g. the device's host name)")
        if profile is not None:
            served = load_profile(profile, state.profile_dirs)
            check_backend(served)
            if served.location != "remote":
                raise ConfigError(f"profile {profile!r} is measured locally (location: local), so no job ever goes to "
                                  "an agent; register the agent for a profile with location: remote")
        repo, queue = _queue(db)
        try:
            token = queue.add_agent(name, profile or "", role=READER if reader else AGENT)  # type: ignore[attr-defined]
        finally:
            repo.close()  # type: ignore[attr-defined]
        typer.echo(token)
        what = "may read searches" if reader else f"serves {profile}"
        stderr().print(f"{name!r} {what}; keep the token above, it is not shown again", highlight=False)


@agents_app.command("list")
def agents_list(db: DbOpt = None, as_json: JsonOpt = False) -> None:
    """Registered agents: profile, last seen, jobs done, state."""
    with handle_errors():
        from search.storage.repository import require_database

        require_database(db_url(db or state.db))
        repo, queue = _queue(db)
        try:
            agents = queue.list_agents()  # type: ignore[attr-defined]
        finally:
            repo.close()  # type: ignore[attr-defined]
        rows = [{
            "name": a.name, "profile": a.profile, "role": a.role, "jobs_done": a.jobs_done,
            "last_seen": a.last_seen.isoformat() if a.last_seen else None,
            "state": "revoked" if a.revoked else ("live" if a.is_live(60) else "idle"),
            "environment": a.environment,
        } for a in agents]
        if as_json:
            echo_json(rows)
            return
        table = Table("name", "profile", "state", "last seen (UTC)", "jobs done", "device")
        for row in rows:
            # What an agent said about itself reaches a terminal: no escapes, no rich markup.
            device = clean_text(str((row["environment"] or {}).get("device", "")), 80)
            table.add_row(escape(clean_text(row["name"], 100)), row["profile"] or f"({row['role']})", row["state"],
                          (row["last_seen"] or "never")[:19], str(row["jobs_done"]), escape(device))
        stdout().print(table)


@agents_app.command("revoke")
def agents_revoke(name: Annotated[str, typer.Argument(help="The agent to revoke.")], db: DbOpt = None) -> None:
    """Revoke an agent's token; its leased jobs go back to the queue."""
    with handle_errors():
        from search.storage.repository import require_database

        require_database(db_url(db or state.db))
        repo, queue = _queue(db)
        try:
            queue.revoke_agent(name)  # type: ignore[attr-defined]
        finally:
            repo.close()  # type: ignore[attr-defined]
        typer.echo(f"revoked {name}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command("serve")
def serve(
    db: DbOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind; loopback unless told otherwise.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.", min=0, max=65535)] = 8787,
    lease_seconds: Annotated[float, typer.Option(help="A lease lasts this long without a heartbeat.", min=1)] = 60.0,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    workers: Annotated[int, typer.Option(help="Hub worker processes (they share the database).", min=1)] = 1,
) -> None:
    """Run the hub: the HTTP API agents pull measurement jobs from."""
    with handle_errors():
        import uvicorn

        from search.hub.app import HubSettings, create_app
        from search.storage import Repository

        _check_tls_files(ssl_certfile, ssl_keyfile)
        _check_port(host, port)
        # Open (and migrate) the database here, so that an unusable one is one line, not a
        # traceback from uvicorn's lifespan.
        Repository(db_url(db or state.db), artifacts=artifacts_url(db_url(db or state.db))).close()
        if not _is_loopback(host) and ssl_certfile is None:
            logging.getLogger("hwprune.serve").warning(
                "binding %s without TLS: tokens and models cross the network in clear; put the hub "
                "behind a TLS proxy or pass --ssl-certfile/--ssl-keyfile", host)
            stderr().print(f"[yellow]warning:[/yellow] hub on {host} without TLS; see README "
                            "(TLS proxy)", highlight=False)
        options = {"host": host, "port": port, "log_level": "debug" if state.debug else "warning",
                   "ssl_certfile": str(ssl_certfile) if ssl_certfile else None,
                   "ssl_keyfile": str(ssl_keyfile) if ssl_keyfile else None}
        if workers == 1:
            url = db_url(db or state.db)
            hub = create_app(HubSettings(db_url=url, lease_s=lease_seconds, artifacts_url=artifacts_url(url)))
            uvicorn.run(hub, **options)  # type: ignore[arg-type]
            return
        from search.hub.app import DB_ENV, LEASE_ENV

        os.environ[DB_ENV] = db_url(db or state.db)
        os.environ[LEASE_ENV] = str(lease_seconds)
        uvicorn.run("search.hub.app:app_from_env", factory=True, workers=workers, **options)  # type: ignore[arg-type]


def _check_port(host: str, port: int) -> None:
    """Refuse an address this machine cannot bind (in use, not its own, privileged) by name, in
    one line, before the database is opened; uvicorn would print its own lines and exit 3."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {clean_text(host, 100)!r} cannot be resolved ({exc.strerror}); "
                          "give an address of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {clean_text(host, 100)}:{port}: {exc.strerror}; stop what "
                              "holds it or give another --port (or --host)") from None


def _check_tls_files(certfile: Path | None, keyfile: Path | None) -> None:
    """Refuse missing, unreadable or mismatched TLS files by name, before uvicorn starts."""
    import ssl

    if certfile is None and keyfile is None:
        return
    if certfile is None:
        raise ConfigError("--ssl-keyfile needs --ssl-certfile")
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag} {str(path)!r}: no such file; give the PEM file's path")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            str(certfile), str(keyfile) if keyfile else None)
    except (ssl.SSLError, OSError) as exc:
        names = str(certfile) + (f" and {keyfile}" if keyfile else "")
        raise ConfigError(f"cannot use {names} as the TLS certificate and key: {exc}; give PEM files that "
                          "belong together (the key unencrypted)") from None


def check_server_url(server: str) -> str:
    """The hub's URL, checked: http(s), a host, no query; else a one-line ConfigError."""
    import httpx

    try:
        url = httpx.URL(server)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigError(f"--server {clean_text(server, 100)!r} is not a URL ({exc}); "
                          "e.g. https://hub.example:8443") from None
    if url.scheme not in ("http", "https") or not url.host or url.query or url.fragment:
        raise ConfigError(f"--server {clean_text(server, 100)!r} must be an http:// or https:// URL with a host "
                          "and nothing after the path, e.g. https://hub.example:8443")
    return server


@app.command("agent")
def agent(
    server: Annotated[str, typer.Option(help="The hub's URL, e.g. https://hub.example:8787.")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="The profile this device serves.")],
    token: Annotated[str | None, typer.Option(help=f"Bearer token; default ${TOKEN_ENV}.")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="Where downloaded models are kept.")] = None,
    poll: Annotated[float, typer.Option(help="Seconds between polls when idle.", min=0.01)] = 1.0,
    heartbeat: Annotated[float, typer.Option(help="Seconds between heartbeats during a job.", min=0.1)] = 2.0,
    max_jobs: Annotated[int | None, typer.Option(help="Exit after this many jobs.", min=1)] = None,
) -> None:
    """Serve measurement jobs on this device (runs until SIGTERM or Ctrl-C)."""
    with handle_errors():
        from hardware_profiles import load_profile
        from latency_models.agent import Agent

        check_server_url(server)
        secret = token or os.environ.get(TOKEN_ENV)
        if not secret:
            raise ConfigError(f"give --token or set {TOKEN_ENV} (from `hwprune agents add`)")
        resolved = load_profile(profile, state.profile_dirs)
        check_backend(resolved)
        worker = Agent(server=server, token=secret, profile=resolved,
                       work_dir=work_dir or cache_dir() / "agent", poll_s=poll, heartbeat_s=heartbeat,
                       max_jobs=max_jobs)
        worker.install_signal_handlers()
        logging.getLogger("latency_models").setLevel(logging.INFO)
        stderr().print(f"agent serving {profile} from {server}", highlight=False)
        done = worker.run()
        failed = f", {worker.jobs_failed} failed" if worker.jobs_failed else ""
        stderr().print(f"agent stopped after {done} jobs measured{failed}", highlight=False)
