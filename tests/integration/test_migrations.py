"""Schema migrations keep every stored row: a database of the previous schema, with cases in it,
upgraded to the newest one and back, on SQLite and on PostgreSQL."""
from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect, select

from service import fhir_index, migrations
from service.store import Store, fhir_resources
from tests.integration.test_fhir_search_store import ORG, example_case

pytestmark = pytest.mark.integration


def _rows(store: Store) -> list[tuple]:
    columns = sorted(fhir_resources.c, key=lambda c: c.name)
    with store.engine.connect() as conn:
        return sorted((tuple(row) for row in conn.execute(select(*columns))), key=repr)


def _shape(store: Store) -> tuple[list[str], dict[str, list[str]]]:
    found = inspect(store.engine)
    return (found.get_pk_constraint("fhir_resources")["constrained_columns"],
            {i["name"]: i["column_names"] for i in found.get_indexes("fhir_resources")})


def test_0004_keys_fhir_resources_by_id_and_keeps_every_row(database_url):
    store = Store(database_url)
    store.add_save_hook(fhir_index.write_rows, prepare=fhir_index.rows_of_record)
    migrations.upgrade(store)
    command.downgrade(migrations.config(database_url), "0003")  # the table as the previous release had it
    assert _shape(store)[0] == ["resource_type", "resource_id", "case_id"]
    for n in range(3):
        store.add_case(ORG, example_case(f"case-{n}", f"client-{n}", f"M-{n}"))
    before = _rows(store)
    assert len(before) > 3

    migrations.upgrade(store)

    key, indexes = _shape(store)
    assert key == ["organization_id", "resource_type", "resource_id", "case_id"]
    assert indexes == {"ix_fhir_resources_search": ["organization_id", "patient_id", "resource_type", "last_updated"],
                       "ix_fhir_resources_case": ["case_id"]}
    assert _rows(store) == before
    if store.engine.dialect.name == "sqlite":
        with store.engine.connect() as conn:
            assert "WITHOUT ROWID" in conn.exec_driver_sql(
                "SELECT sql FROM sqlite_master WHERE name = 'fhir_resources'").scalar()
    store.add_case(ORG, example_case("case-after", "client-a", "M-a"))  # the store writes into the new table
    assert len(_rows(store)) > len(before)

    command.downgrade(migrations.config(database_url), "0003")
    assert _shape(store)[0] == ["resource_type", "resource_id", "case_id"]
    assert "ix_fhir_resources_id" in _shape(store)[1]
    assert len(_rows(store)) > len(before)
