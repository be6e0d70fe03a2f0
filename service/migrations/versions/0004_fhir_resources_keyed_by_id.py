"""Key fhir_resources by (organization, type, id, case), and lead its search index with the patient.

A case save wrote each of its resources into three B-trees ordered by the resource id (the rowid
table's key, ``ix_fhir_resources_id`` and the primary key): each a page at random in a large file.
Now the primary key is the look-up by id, and on SQLite the table itself (``WITHOUT ROWID``).
``ix_fhir_resources_search`` becomes (organization, patient, type, last updated), so the resources
of one case, which share a patient, go into one page of it rather than one page per type.

Revision ID: 0004
Revises: 0003
"""
from alembic import op
from sqlalchemy import (
    Boolean, Column, DateTime, ForeignKey, Index, Integer, MetaData, String, Table, Text, inspect,
)
from sqlalchemy.schema import CreateTable

from service.store import fhir_resources as keyed_by_id

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_COLUMNS = ("resource_type", "resource_id", "case_id", "organization_id", "patient_id", "version",
            "last_updated", "deleted", "status", "date_lo", "date_hi", "name", "gender")
_OLD_SEARCH = ("organization_id", "resource_type", "patient_id", "last_updated")
_NEW_SEARCH = ("organization_id", "patient_id", "resource_type", "last_updated")
_OLD_KEY = ("resource_type", "resource_id", "case_id")
_NEW_KEY = ("organization_id", "resource_type", "resource_id", "case_id")


def _old_shape() -> Table:
    """fhir_resources as revision 0003 left it."""
    metadata = MetaData()
    Table("cases", metadata, Column("id", String(64), primary_key=True))
    return Table(
        "fhir_resources", metadata,
        Column("resource_type", String(32), primary_key=True),
        Column("resource_id", String(64), primary_key=True),
        Column("case_id", String(64), ForeignKey("cases.id"), primary_key=True),
        Column("organization_id", String(64), nullable=False),
        Column("patient_id", String(64)),
        Column("version", Integer, nullable=False),
        Column("last_updated", DateTime(timezone=True), nullable=False),
        Column("deleted", Boolean, nullable=False, default=False),
        Column("status", String(32)),
        Column("date_lo", String(40)),
        Column("date_hi", String(40)),
        Column("name", Text),
        Column("gender", String(16)),
        Index("ix_fhir_resources_search", *_OLD_SEARCH),
        Index("ix_fhir_resources_id", "organization_id", "resource_type", "resource_id"),
        Index("ix_fhir_resources_case", "case_id"),
    )


def _is_keyed_by_id(bind) -> bool:
    """True when the table already has the new key (a database that 0001 made after this change)."""
    return inspect(bind).get_pk_constraint("fhir_resources")["constrained_columns"][:1] == ["organization_id"]


def _sqlite_rebuild(bind, target: Table) -> None:
    """SQLite cannot change a table's key in place: copy the rows into the table as ``target`` has it."""
    for index in inspect(bind).get_indexes("fhir_resources"):
        op.execute(f"DROP INDEX {index['name']}")
    op.execute("ALTER TABLE fhir_resources RENAME TO fhir_resources_before_0004")
    bind.execute(CreateTable(target))
    columns = ", ".join(_COLUMNS)
    key = ", ".join(c.name for c in target.primary_key.columns)
    op.execute(f"INSERT INTO fhir_resources ({columns}) SELECT {columns} FROM fhir_resources_before_0004 "
               f"ORDER BY {key}")
    op.execute("DROP TABLE fhir_resources_before_0004")
    for index in target.indexes:
        index.create(bind)


def _postgresql_rekey(bind, key: tuple, search: tuple, id_index: bool) -> None:
    name = inspect(bind).get_pk_constraint("fhir_resources")["name"]
    op.execute(f"ALTER TABLE fhir_resources DROP CONSTRAINT {name}")
    op.execute(f"ALTER TABLE fhir_resources ADD CONSTRAINT {name} PRIMARY KEY ({', '.join(key)})")
    op.execute("DROP INDEX IF EXISTS ix_fhir_resources_search")
    op.execute(f"CREATE INDEX ix_fhir_resources_search ON fhir_resources ({', '.join(search)})")
    if id_index:
        op.execute("CREATE INDEX ix_fhir_resources_id ON fhir_resources (organization_id, resource_type, resource_id)")
    else:
        op.execute("DROP INDEX IF EXISTS ix_fhir_resources_id")


def upgrade() -> None:
    bind = op.get_bind()
    if _is_keyed_by_id(bind):
        return
    if bind.dialect.name == "sqlite":
        _sqlite_rebuild(bind, keyed_by_id)
    else:
        _postgresql_rekey(bind, _NEW_KEY, _NEW_SEARCH, id_index=False)


def downgrade() -> None:
    bind = op.get_bind()
    if not _is_keyed_by_id(bind):
        return
    if bind.dialect.name == "sqlite":
        _sqlite_rebuild(bind, _old_shape())
    else:
        _postgresql_rekey(bind, _OLD_KEY, _OLD_SEARCH, id_index=True)
