"""The ``casebridge`` command line.

Commands read a file (or ``-`` for standard input), call a use case in ``service.services`` and print
JSON. A problem with the input is printed as ``error: <message>`` followed by one ``  <path>: <message>``
line per problem, with exit status 1; anything unexpected is an ``internal error`` with status 70.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, BinaryIO, NoReturn, TypeVar

import click
import orjson

from service.errors import CasebridgeError

#: exit statuses: the input is wrong (1), casebridge is wrong (70, EX_SOFTWARE)
EXIT_INVALID = 1
EXIT_INTERNAL = 70

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, lines: list[str], status: int) -> NoReturn:
    click.echo(message, err=True)
    for line in lines:
        click.echo(f"  {line}", err=True)
    raise SystemExit(status)


def reports_errors(command: F) -> F:
    """Turn casebridge's errors into a readable list on standard error, never a traceback."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CasebridgeError as error:
            _fail(f"error: {error.message}", [str(problem) for problem in error.problems], EXIT_INVALID)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as error:  # noqa: BLE001 - the last line of defence: report, don't trace
            _fail(f"internal error: {type(error).__name__}: {error}", [], EXIT_INTERNAL)

    return run  # type: ignore[return-value]


def _write_json(document: object) -> None:
    click.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="casebridge", message="%(prog)s %(version)s")
def cli() -> None:
    """casebridge: case records to and from FHIR R4."""


@cli.group()
def convert() -> None:
    """Convert between case records and FHIR R4, without storing anything."""


@convert.command("to-fhir")
@click.argument("source", type=click.File("rb"), default="-", metavar="[FILE|-]")
@click.option("--bundle-type", type=click.Choice(["collection", "transaction"]), default="collection",
              show_default=True, help="The kind of FHIR Bundle to write.")
@click.option("--validate", is_flag=True, help="Also validate the resources against FHIR R4.")
@reports_errors
def to_fhir(source: BinaryIO, bundle_type: str, validate: bool) -> None:
    """Convert a case record (JSON) to a FHIR R4 Bundle."""
    raw = source.read()
    try:
        case_json = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        _fail(f"error: input is not valid JSON: {error}", [], EXIT_INVALID)
    from service import services

    _write_json(services.convert_to_fhir(case_json, bundle_type=bundle_type, validate=validate))


@convert.command("from-fhir")
@click.argument("source", type=click.File("rb"), default="-", metavar="[FILE|-]")
@click.option("--validate", is_flag=True, help="Validate the FHIR input against R4 before converting.")
@reports_errors
def from_fhir(source: BinaryIO, validate: bool) -> None:
    """Convert FHIR R4 (a Bundle or a single resource) to case records."""
    raw = source.read()
    from service import services

    _write_json(services.convert_from_fhir(raw, validate=validate))


# -- running the service -------------------------------------------------------------------------
database_option = click.option(
    "--database-url", envvar="CASEBRIDGE_DATABASE_URL", default=None, metavar="URL",
    help="The database (default: SQLite in $CASEBRIDGE_HOME, else ./instance).")


def _settings(database_url: str | None):
    from service.config import Settings

    return Settings.from_env({"database_url": database_url} if database_url else None)


def _migrated_store(database_url: str | None):
    """The store, its schema brought up to date first."""
    from service import migrations
    from service.store import Store

    store = Store(_settings(database_url).database_url)
    migrations.upgrade(store)
    return store


def _shown_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="The port.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1), help="Worker processes.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="The least severe message logged.")
@click.option("--sync/--no-sync", default=True, show_default=True,
              help="Also run a partner sync worker and its schedule in this process group.")
@database_option
@reports_errors
def serve(host: str, port: int, workers: int, log_level: str, database_url: str | None, sync: bool) -> None:
    """Run the service (JSON and FHIR APIs) with gunicorn, and a sync worker with its schedule.

    The database is migrated once, before the workers start; each worker then builds its own app.
    With no broker configured the sync worker uses the embedded one (SQLite), so partner sync works
    with nothing else installed; ``--no-sync`` leaves it to separate ``casebridge worker`` processes."""
    import os
    import subprocess
    import sys

    from service import logging as casebridge_logging

    casebridge_logging.configure(log_level)
    url = _settings(database_url).database_url
    store = _migrated_store(database_url)
    store.engine.dispose()  # no connection crosses the fork
    click.echo(f"casebridge: database {_shown_url(url)} is up to date; listening on http://{host}:{port}", err=True)
    worker = None
    if sync:
        worker = subprocess.Popen([sys.executable, "-m", "service.worker", "--beat", "--pool", "threads",
                                   "--concurrency", "2", "--loglevel", "WARNING"],
                                  env={**os.environ, "CASEBRIDGE_DATABASE_URL": url})
        click.echo("casebridge: sync worker and schedule started", err=True)
    try:
        _gunicorn_app({"database_url": url, "migrate": False}, {
            "bind": f"{host}:{port}", "workers": workers, "loglevel": log_level,
            # gunicorn's access log would carry query strings (client data): casebridge logs requests itself
            "accesslog": None, "errorlog": "-", "proc_name": "casebridge",
            "control_socket_disable": True,  # several servers on one host must not share ~/.gunicorn/gunicorn.ctl
        }).run()
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()


@cli.command()
@click.option("--concurrency", default=2, show_default=True, type=click.IntRange(1), help="Tasks run at once.")
@click.option("--beat/--no-beat", default=False, show_default=True,
              help="Also run the schedule (outbox dispatch, partner pulls): in exactly one process.")
@click.option("--pool", default="prefork", show_default=True, type=click.Choice(["prefork", "threads", "solo"]))
@click.option("--log-level", default="info", show_default=True)
def worker(concurrency: int, beat: bool, pool: str, log_level: str) -> None:
    """Run a sync worker against CASEBRIDGE_BROKER_URL (Redis or RabbitMQ) to scale out.

    Several workers on several machines share the work; a push is idempotent, so a task that runs
    twice (a worker killed mid-task) sends nothing twice."""
    from service.worker import run_worker

    run_worker(concurrency, beat, log_level.upper(), pool)


def _gunicorn_app(app_config: dict, options: dict):
    """gunicorn driven from code: its settings from ``options``, each worker's app from ``create_app``."""
    from gunicorn.app.base import BaseApplication

    class CasebridgeServer(BaseApplication):
        def load_config(self) -> None:
            for name, value in options.items():
                self.cfg.set(name, value)

        def load(self):
            import gc

            from service import create_app

            app = create_app(dict(app_config))
            # What the worker has built by now (modules, the FHIR models, the app) lives as long as it
            # does: keep it out of the garbage collector's full passes, which would otherwise walk
            # it all again and again, a pause each request in flight waits out.
            gc.collect()
            gc.freeze()
            return app

    return CasebridgeServer()


@cli.group()
def db() -> None:
    """The database."""


@db.command("upgrade")
@database_option
@reports_errors
def db_upgrade(database_url: str | None) -> None:
    """Bring the database to the newest schema (creating it when it is new)."""
    store = _migrated_store(database_url)
    click.echo(f"database {_shown_url(store.url)} is up to date")


@cli.group()
def keys() -> None:
    """API keys: each bound to one organization and some scopes."""


@keys.command("create")
@click.option("--org", "organization", required=True, help="The organization the key belongs to.")
@click.option("--scopes", required=True,
              help="Comma-separated: cases:read, cases:write, fhir:read, fhir:write, admin.")
@click.option("--label", default=None, help="A note saying who or what uses the key.")
@database_option
@reports_errors
def keys_create(organization: str, scopes: str, label: str | None, database_url: str | None) -> None:
    """Create a key and print it: the only time it is shown."""
    from service import auth

    try:
        scope_list = auth.parse_scopes(scopes)
        if not organization.strip():
            raise ValueError("name the organization the key belongs to")
    except ValueError as error:
        _fail(f"error: {error}", [], EXIT_INVALID)
    key = auth.create_key(_migrated_store(database_url), organization.strip(), scope_list, label)
    click.echo(key)
    click.echo(f"created key {key.split('_')[1]} for {organization.strip()} ({', '.join(sorted(set(scope_list)))}); "
               "it is not shown again: keep it now", err=True)


@keys.command("list")
@click.option("--org", "organization", required=True, help="The organization whose keys to list.")
@database_option
@reports_errors
def keys_list(organization: str, database_url: str | None) -> None:
    """List an organization's keys (never their secrets), revoked ones included."""
    from dataclasses import asdict

    from service import auth

    _write_json([asdict(k) for k in auth.list_keys(_migrated_store(database_url), organization)])


@keys.command("revoke")
@click.argument("key_id")
@database_option
@reports_errors
def keys_revoke(key_id: str, database_url: str | None) -> None:
    """Revoke a key by its id (the part after ``cb_``); its next request gets a 401."""
    from service import auth

    if key_id.startswith("cb_"):  # the whole key pasted: take its id, never echo the secret
        key_id = key_id.split("_", 2)[1]
    if not auth.revoke_key(_migrated_store(database_url), key_id):
        _fail(f"error: there is no key {key_id}", [], EXIT_INVALID)
    click.echo(f"revoked key {key_id}", err=True)


@cli.group()
def partners() -> None:
    """The partners casebridge syncs with (EHRs and payers)."""


def _app(database_url: str | None):
    """The app (for its store and its task queue), as configured by CASEBRIDGE_* variables."""
    from service import create_app

    return create_app({"database_url": database_url} if database_url else None)


@partners.command("add")
@click.argument("source", type=click.File("rb"), default="-", metavar="[FILE|-]")
@database_option
@reports_errors
def partners_add(source: BinaryIO, database_url: str | None) -> None:
    """Add or replace a partner from its JSON description (secrets are stored encrypted)."""
    from service import partners as registry

    try:
        data = orjson.loads(source.read())
    except orjson.JSONDecodeError as error:
        _fail(f"input is not valid JSON: {error}", [], EXIT_INVALID)
    _write_json(registry.save_partner(_migrated_store(database_url), data))


@partners.command("list")
@database_option
@reports_errors
def partners_list(database_url: str | None) -> None:
    """Every partner, without secrets."""
    from service import partners as registry

    _write_json(registry.list_partners(_migrated_store(database_url)))


@partners.command("show")
@click.argument("partner_id")
@database_option
@reports_errors
def partners_show(partner_id: str, database_url: str | None) -> None:
    """One partner with its sync status: backlog, last success, watermark, dead letters, route."""
    from service import partners as registry, sync_admin

    store = _migrated_store(database_url)
    _write_json({**registry.get_partner(store, partner_id), "status": sync_admin.partner_status(store, partner_id)})


@partners.command("check")
@click.argument("partner_id")
@database_option
@reports_errors
def partners_check(partner_id: str, database_url: str | None) -> None:
    """Read the partner's /metadata and decide what is written there (its route)."""
    from service import partners as registry

    _write_json(registry.check_capabilities(_migrated_store(database_url), partner_id))


@partners.command("pull")
@click.argument("partner_id")
@database_option
@reports_errors
def partners_pull(partner_id: str, database_url: str | None) -> None:
    """Queue a pull from the partner now."""
    from service import sync_admin

    app = _app(database_url)
    with app.app_context():
        sync_admin.enqueue_pull(partner_id)
    click.echo(f"pull from {partner_id} queued", err=True)


@partners.command("remove")
@click.argument("partner_id")
@database_option
@reports_errors
def partners_remove(partner_id: str, database_url: str | None) -> None:
    from service import partners as registry

    registry.delete_partner(_migrated_store(database_url), partner_id)


@cli.group("dead-letters")
def dead_letters() -> None:
    """Work a partner refused for good, kept with the partner's OperationOutcome."""


@dead_letters.command("list")
@click.option("--partner", default=None, help="Only this partner's.")
@database_option
@reports_errors
def dead_letters_list(partner: str | None, database_url: str | None) -> None:
    from service import sync_admin

    _write_json(sync_admin.dead_letters(_migrated_store(database_url), partner))


@dead_letters.command("replay")
@click.argument("letter_id", type=int)
@database_option
@reports_errors
def dead_letters_replay(letter_id: int, database_url: str | None) -> None:
    """Send the work again (after the partner or the data was put right)."""
    from service import sync_admin

    app = _app(database_url)
    with app.app_context():
        _write_json(sync_admin.replay(app.extensions["casebridge"].store, letter_id))


def main() -> None:
    """The ``casebridge`` console script."""
    cli(prog_name="casebridge")


if __name__ == "__main__":
    main()
