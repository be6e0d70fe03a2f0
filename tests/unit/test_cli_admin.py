"""``casebridge keys create|list|revoke`` and ``casebridge db upgrade`` against a fresh SQLite database."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect, select

from service import auth
from service.cli import EXIT_INVALID, cli
from service.store import Store, api_keys


@pytest.fixture
def database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'nested' / 'casebridge.db'}"  # the folder does not exist yet
    monkeypatch.setenv("CASEBRIDGE_DATABASE_URL", url)
    return url


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _create(runner: CliRunner, *args: str):
    return runner.invoke(cli, ["keys", "create", *args])


def test_db_upgrade_creates_the_database_and_its_folder(runner: CliRunner, database_url: str) -> None:
    result = runner.invoke(cli, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert "is up to date" in result.stdout
    tables = set(inspect(Store(database_url).engine).get_table_names())
    assert {"cases", "api_keys", "audit_events", "alembic_version"} <= tables
    assert runner.invoke(cli, ["db", "upgrade"]).exit_code == 0  # again: nothing to do


def test_keys_create_prints_a_working_key_once_and_stores_only_its_hash(runner: CliRunner,
                                                                         database_url: str) -> None:
    result = _create(runner, "--org", "org-1", "--scopes", "cases:read,cases:write", "--label", "intake app")
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("cb_") and "\n" not in key
    assert "not shown again" in result.stderr
    store = Store(database_url)
    actor = auth.authenticate(store, key)
    assert actor.organization_id == "org-1"
    assert actor.scopes == frozenset({"cases:read", "cases:write"})
    with store.engine.connect() as conn:
        row = conn.execute(select(api_keys)).one()
    assert key.split("_", 2)[2] not in (row.secret_hash, row.scopes, row.label)
    assert row.label == "intake app"


@pytest.mark.parametrize("args, message", [
    (["--org", "org-1", "--scopes", "cases:read,cases:delete"], "unknown scopes: cases:delete"),
    (["--org", "org-1", "--scopes", ","], "name at least one scope"),
    (["--org", " ", "--scopes", "admin"], "name the organization"),
])
def test_keys_create_refuses_bad_input(runner: CliRunner, database_url: str, args: list[str], message: str) -> None:
    result = _create(runner, *args)
    assert result.exit_code == EXIT_INVALID
    assert message in result.stderr
    assert result.stdout == "" and "Traceback" not in result.output


def test_keys_create_needs_an_organization_and_scopes(runner: CliRunner, database_url: str) -> None:
    assert _create(runner, "--scopes", "admin").exit_code == 2
    assert _create(runner, "--org", "org-1").exit_code == 2


def test_keys_list_shows_an_organizations_keys_without_secrets(runner: CliRunner, database_url: str) -> None:
    first = _create(runner, "--org", "org-1", "--scopes", "admin").stdout.strip()
    _create(runner, "--org", "org-1", "--scopes", "fhir:read fhir:write")
    _create(runner, "--org", "org-2", "--scopes", "cases:read")
    result = runner.invoke(cli, ["keys", "list", "--org", "org-1"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [k["scopes"] for k in listed] == [["admin"], ["fhir:read", "fhir:write"]]
    assert listed[0]["id"] == first.split("_")[1]
    assert all(k["organization_id"] == "org-1" and k["revoked"] is False for k in listed)
    assert set(listed[0]) == {"id", "organization_id", "scopes", "label", "created_at", "revoked"}
    assert first.split("_", 2)[2] not in result.stdout
    assert json.loads(runner.invoke(cli, ["keys", "list", "--org", "org-3"]).stdout) == []


def test_keys_revoke_stops_a_key(runner: CliRunner, database_url: str) -> None:
    key = _create(runner, "--org", "org-1", "--scopes", "cases:read").stdout.strip()
    key_id = key.split("_")[1]
    result = runner.invoke(cli, ["keys", "revoke", key_id])
    assert result.exit_code == 0, result.output
    with pytest.raises(auth.Unauthenticated):
        auth.authenticate(Store(database_url), key)
    assert json.loads(runner.invoke(cli, ["keys", "list", "--org", "org-1"]).stdout)[0]["revoked"] is True


def test_keys_revoke_takes_a_whole_key_without_echoing_its_secret(runner: CliRunner, database_url: str) -> None:
    key = _create(runner, "--org", "org-1", "--scopes", "cases:read").stdout.strip()
    result = runner.invoke(cli, ["keys", "revoke", key])
    assert result.exit_code == 0
    assert key.split("_", 2)[2] not in result.output
    with pytest.raises(auth.Unauthenticated):
        auth.authenticate(Store(database_url), key)


def test_keys_revoke_of_an_unknown_key_is_an_error(runner: CliRunner, database_url: str) -> None:
    result = runner.invoke(cli, ["keys", "revoke", "0123456789abcdef"])
    assert result.exit_code == EXIT_INVALID
    assert "there is no key 0123456789abcdef" in result.stderr


def test_database_url_option_wins_over_the_environment(runner: CliRunner, database_url: str,
                                                       tmp_path: Path) -> None:
    other = f"sqlite:///{tmp_path / 'other.db'}"
    _create(runner, "--org", "org-1", "--scopes", "admin", "--database-url", other)
    assert json.loads(runner.invoke(cli, ["keys", "list", "--org", "org-1"]).stdout) == []
    listed = runner.invoke(cli, ["keys", "list", "--org", "org-1", "--database-url", other]).stdout
    assert len(json.loads(listed)) == 1


def test_serve_and_its_options_are_there(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--host", "--port", "--workers", "--database-url"):
        assert option in result.stdout
    assert "127.0.0.1" in result.stdout and "8000" in result.stdout


def test_db_upgrade_brings_a_database_of_an_earlier_release_to_the_newest_schema(runner: CliRunner,
                                                                                   database_url: str) -> None:
    from alembic import command

    from service import migrations
    from service.sync_store import partner_pace

    store = Store(database_url)
    command.upgrade(migrations.config(database_url), "0002")
    with store.engine.begin() as conn:  # as 0001 made it before the pace table was part of the schema
        partner_pace.drop(conn)
    assert "partner_pace" not in inspect(store.engine).get_table_names()

    result = runner.invoke(cli, ["db", "upgrade"])

    assert result.exit_code == 0, result.output
    assert "partner_pace" in inspect(Store(database_url).engine).get_table_names()
