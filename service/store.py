"""Storage: SQLAlchemy tables and the repository over them (SQLite by default, PostgreSQL in production).

Every version of a case is kept (``case_versions``); ``cases`` holds the current one. Writes are
optimistic: an update names the version it read, and exactly one of two writers of the same version
wins (the other gets ``Conflict``), on SQLite and PostgreSQL alike, because the check is the UPDATE's
own WHERE clause. The FHIR search index and the client identifiers are rewritten in the same
transaction as the case, so a search never sees a case half saved. Schema changes go through Alembic
(``service/migrations``).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import threading
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import orjson
from sqlalchemy import (
    JSON, Boolean, Column, DateTime, ForeignKey, Index, Integer, MetaData, String, Table, Text, UniqueConstraint,
    and_, bindparam, create_engine, delete, func, insert, or_, select, update,
)
from sqlalchemy.engine import Connection, Engine

from service.errors import AlreadyExists, Conflict, NotFound
from service.sqlite_engine import sqlite_engine

metadata = MetaData()

cases = Table(
    "cases", metadata,
    Column("id", String(64), primary_key=True),
    Column("organization_id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("status", String(32), nullable=False),
    Column("program", String(32), nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("data", Text, nullable=False),
    Index("ix_cases_org_updated", "organization_id", "updated_at", "id"),
)

case_versions = Table(
    "case_versions", metadata,
    Column("case_id", String(64), ForeignKey("cases.id"), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("action", String(16), nullable=False),  # create | update | delete
    Column("actor", String(64)),
    Column("data", Text, nullable=False),
)

client_identifiers = Table(
    "client_identifiers", metadata,
    Column("case_id", String(64), ForeignKey("cases.id"), primary_key=True),
    Column("system", String(255), primary_key=True),
    Column("value", String(255), primary_key=True),
    Column("organization_id", String(64), nullable=False),
    Index("ix_client_identifiers_lookup", "organization_id", "system", "value"),
)

#: one row per FHIR resource a case converts to, with the values its search parameters need
#: (written by ``service.fhir_index`` inside each case save). A resource shared by several cases of
#: one organization (a client's Patient) has a row per case; the current one is the newest.
#: On SQLite the rows are kept in key order (no rowid): the table, its key and the look-up of a
#: resource by id are then one B-tree, where they were three that every save wrote into.
#: ``ix_fhir_resources_search`` leads with the patient, so a case's resources (which share one) sit
#: together in it; a search without a patient reads the key's (organization, type) range instead.
fhir_resources = Table(
    "fhir_resources", metadata,
    Column("organization_id", String(64), primary_key=True),
    Column("resource_type", String(32), primary_key=True),
    Column("resource_id", String(64), primary_key=True),
    Column("case_id", String(64), ForeignKey("cases.id"), primary_key=True),
    Column("patient_id", String(64)),
    Column("version", Integer, nullable=False),
    Column("last_updated", DateTime(timezone=True), nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("status", String(32)),
    Column("date_lo", String(40)),  # the range of the type's date parameter, UTC, start inclusive
    Column("date_hi", String(40)),  # ... end exclusive
    Column("name", Text),
    Column("gender", String(16)),
    Index("ix_fhir_resources_search", "organization_id", "patient_id", "resource_type", "last_updated"),
    Index("ix_fhir_resources_case", "case_id"),
    sqlite_with_rowid=False,
)

#: token and reference search values (category, code, identifier, focus, goal, ...) of those resources
fhir_tokens = Table(
    "fhir_tokens", metadata,
    Column("resource_type", String(32), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("case_id", String(64), ForeignKey("cases.id"), nullable=False),
    Column("organization_id", String(64), nullable=False),
    Column("param", String(32), nullable=False),
    Column("system", String(255)),
    Column("code", String(255), nullable=False),
    Index("ix_fhir_tokens_lookup", "organization_id", "resource_type", "param", "code", "system"),
    Index("ix_fhir_tokens_case", "case_id"),
)

#: claims that make creates idempotent: the same key twice gives the same case, even at once
create_keys = Table(
    "create_keys", metadata,
    Column("organization_id", String(64), primary_key=True),
    Column("key", String(512), primary_key=True),
    Column("case_id", String(64), nullable=False),
    Column("resource_id", String(64)),
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", String(32), primary_key=True),
    Column("organization_id", String(64), nullable=False),
    Column("secret_hash", String(128), nullable=False, unique=True),
    Column("scopes", String(255), nullable=False),
    Column("label", String(255)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
)

audit_events = Table(
    "audit_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("organization_id", String(64)),  # none when the caller was not authenticated
    Column("key_id", String(32)),
    Column("action", String(16), nullable=False),  # C R U D E (FHIR AuditEvent.action)
    Column("operation", String(64), nullable=False),
    Column("entity_type", String(32)),
    Column("entity_id", String(128)),
    Column("outcome", Integer, nullable=False),  # HTTP status
    Column("detail", JSON),
    Index("ix_audit_events_org_id", "organization_id", "id"),
    Index("ix_audit_events_org_entity", "organization_id", "entity_id"),
    Index("ix_audit_events_org_recorded", "organization_id", "recorded_at"),
)


#: execution option of connections that only read (see ``Store.reader``)
READONLY = "casebridge_readonly"

#: built once: a read on every request should not pay for building its statement each time
_CURRENT_CASE = select(cases).where(cases.c.id == bindparam("case_id"),
                                    cases.c.organization_id == bindparam("organization_id"))


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _json_text(value: Any) -> str:
    """A JSON column's text, by orjson (the standard library's encoder cost a tenth of a sync push)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # what orjson does not take (an integer past 64 bits, say): as the standard library would
        return json.dumps(value)


#: JSON columns are written and read with orjson
_JSON_CODEC = {"json_serializer": _json_text, "json_deserializer": orjson.loads}


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        return sqlite_engine(url, READONLY, **_JSON_CODEC)
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, **_JSON_CODEC)


@dataclass(frozen=True)
class StoredCase:
    id: str
    organization_id: str
    version: int
    deleted: bool
    created_at: dt.datetime
    updated_at: dt.datetime
    data: dict


#: extra writes done inside a case's save transaction (the FHIR index, the outbox, ...)
SaveHook = Callable[[Connection, StoredCase], None]

_CASE_STAMP = select(cases.c.version, cases.c.updated_at).where(cases.c.id == bindparam("case_id"),
                                                               cases.c.organization_id == bindparam("organization_id"))
_CASE_BY_ID = select(cases).where(cases.c.id == bindparam("case_id"))
_CASE_ID = select(cases.c.id).where(cases.c.id == bindparam("id"))
_CLAIMED = select(create_keys.c.case_id).where(create_keys.c.organization_id == bindparam("organization_id"),
                                              create_keys.c.key == bindparam("key"))
_CREATED_AT = select(cases.c.created_at).where(cases.c.id == bindparam("id"))
_UPDATE_CASE = update(cases).where(cases.c.id == bindparam("case_id"),
                                   cases.c.organization_id == bindparam("org"),
                                   cases.c.version == bindparam("expected"))
_INSERT_CASE, _INSERT_VERSION = insert(cases), insert(case_versions)
_INSERT_IDENTIFIERS = insert(client_identifiers)
_DELETE_IDENTIFIERS = delete(client_identifiers).where(client_identifiers.c.case_id == bindparam("case_id"))


class Store:
    def __init__(self, url: str):
        self.url = url
        _make_sqlite_folder(url)
        self.engine = make_engine(url)
        #: the same database for connections that only read: on SQLite they take no write lock
        self.reader = self.engine.execution_options(**{READONLY: True})
        self._hooks: list[tuple[Callable, Optional[Callable[[dict], Any]]]] = []
        self._readers = threading.local()  # on SQLite, each thread's connection for ``fetch``

    def add_save_hook(self, hook: Callable, prepare: Optional[Callable[[dict], Any]] = None) -> None:
        """Run ``hook(conn, stored)`` inside every case save's transaction, after the case is written.

        With ``prepare``, ``prepare(data)`` runs first, on the record alone and before the transaction
        opens (so work that needs no database holds no lock), and the hook is called as
        ``hook(conn, stored, prepared)``."""
        self._hooks.append((hook, prepare))

    def _prepare(self, data: dict) -> list:
        return [prepare(data) if prepare is not None else None for _, prepare in self._hooks]

    def create_all(self) -> None:
        metadata.create_all(self.engine)

    def fetch(self, statement, params: dict) -> list:
        """The rows of a prebuilt SELECT, run straight through the database driver, each a named
        tuple whose values are converted by the columns' types, as SQLAlchemy would.

        For the queries every request makes (its API key, the version of the case it reads, a
        search page): SQLAlchemy's execution layer costs several times what such a query does.
        Its own read, in no larger transaction; the statement must have no expanding parameters."""
        prepared = _prepared(statement, self.engine.dialect)
        if self.engine.dialect.name == "sqlite":  # a lone SELECT: SQLite reads it in a transaction of its own
            return _select(self._own_reader(), prepared, params)
        fairy = self.engine.raw_connection()
        try:
            return _select(fairy, prepared, params)
        finally:
            fairy.close()  # back to the pool, which ends any transaction the driver opened

    def _own_reader(self):
        """This thread's own SQLite connection for ``fetch``, kept open: taking one from the pool and
        handing it back (with its reset) cost more than the queries every request makes."""
        own = self._readers
        if getattr(own, "pid", None) != os.getpid():  # new in this thread, or this process was forked
            fairy = self.engine.raw_connection()
            fairy.detach()  # the pool's connection no more: this thread's, closed when the store goes
            own.connection, own.pid = fairy.dbapi_connection, os.getpid()
        return own.connection

    def lookup(self, statement, params: dict):
        """The first row ``fetch`` gives, or None."""
        rows = self.fetch(statement, params)
        return rows[0] if rows else None

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(select(1))

    # -- cases -------------------------------------------------------------------------------
    def add_case(self, organization_id: str, data: dict, actor: Optional[str] = None,
                 claim: Optional[str] = None, conn: Optional[Connection] = None) -> StoredCase:
        """A new case at version 1. With ``claim``, a second add under the same claim (even one
        running at the same moment) gives back the first case instead of a duplicate."""
        prepared, text = self._prepare(data), _dump(data)
        with self._tx(conn) as c:
            if claim is not None:
                existing = c.execute(_CLAIMED, {"organization_id": organization_id, "key": claim}).scalar()
                if existing is not None:
                    return self.get_case(organization_id, existing, conn=c)
                c.execute(insert(create_keys), {"organization_id": organization_id, "key": claim, "case_id": data["id"]})
            if c.execute(_CASE_ID, {"id": data["id"]}).scalar() is not None:
                raise AlreadyExists(f"case {data['id']} already exists")
            stamp = now()
            write(c, _INSERT_CASE, {"id": data["id"], "organization_id": organization_id, "version": 1,
                                    "status": data["status"], "program": data["program"], "deleted": False,
                                    "created_at": stamp, "updated_at": stamp, "data": text})
            write(c, _INSERT_VERSION, {"case_id": data["id"], "version": 1, "recorded_at": stamp,
                                       "action": "create", "actor": actor, "data": text})
            stored = StoredCase(data["id"], organization_id, 1, False, stamp, stamp, data)
            self._after_save(c, stored, prepared)
            return stored

    def claimed_case(self, organization_id: str, claim: str, conn: Optional[Connection] = None) -> Optional[str]:
        """The id of the case first added under ``claim`` (see ``add_case``), or None."""
        with self._read(conn) as c:
            return c.execute(select(create_keys.c.case_id).where(
                create_keys.c.organization_id == organization_id, create_keys.c.key == claim)).scalar()

    def add_claim(self, organization_id: str, claim: str, case_id: str, conn: Optional[Connection] = None) -> None:
        """Record that ``claim`` names ``case_id``, as ``add_case(claim=...)`` does; an ``IntegrityError``
        when the claim is taken, even by a writer that has not committed yet."""
        with self._tx(conn) as c:
            c.execute(insert(create_keys).values(organization_id=organization_id, key=claim, case_id=case_id))

    def update_case(self, organization_id: str, case_id: str, expected_version: int, data: dict,
                    actor: Optional[str] = None, deleted: bool = False,
                    conn: Optional[Connection] = None) -> StoredCase:
        """The case at ``expected_version + 1``; ``Conflict`` when someone else wrote it first."""
        prepared, text = self._prepare(data), _dump(data)
        with self._tx(conn) as c:
            stamp = now()
            result = c.execute(_UPDATE_CASE, {
                "case_id": case_id, "org": organization_id, "expected": expected_version,
                "version": expected_version + 1, "status": data["status"], "program": data["program"],
                "deleted": deleted, "updated_at": stamp, "data": text})
            if result.rowcount != 1:
                current = self._current(c, organization_id, case_id)
                if current is None:
                    raise NotFound(f"no case {case_id}")
                raise Conflict(f"case {case_id} is at version {current.version}, not {expected_version}")
            write(c, _INSERT_VERSION, {"case_id": case_id, "version": expected_version + 1,
                                       "recorded_at": stamp, "action": "delete" if deleted else "update",
                                       "actor": actor, "data": text})
            created = c.execute(_CREATED_AT, {"id": case_id}).scalar()
            stored = StoredCase(case_id, organization_id, expected_version + 1, deleted, aware(created), stamp, data)
            self._after_save(c, stored, prepared)
            return stored

    def get_case(self, organization_id: str, case_id: str, conn: Optional[Connection] = None) -> StoredCase:
        with self._read(conn) as c:
            current = self._current(c, organization_id, case_id)
        if current is None:
            raise NotFound(f"no case {case_id}")
        return current

    def current_case(self, case_id: str) -> StoredCase:
        """A case's latest version, whichever organization holds it (for sync, which works across them)."""
        row = self.lookup(_CASE_BY_ID, {"case_id": case_id})
        if row is None:
            raise NotFound(f"no case {case_id}")
        return self._row(row)

    def case_stamp(self, organization_id: str, case_id: str) -> tuple[int, dt.datetime]:
        """The current version of a case and when it was written, without reading the record."""
        row = self.lookup(_CASE_STAMP, {"case_id": case_id, "organization_id": organization_id})
        if row is None:
            raise NotFound(f"no case {case_id}")
        return row.version, aware(row.updated_at)

    def get_version(self, organization_id: str, case_id: str, version: int) -> StoredCase:
        with self.reader.connect() as c:
            row = c.execute(
                select(case_versions, cases.c.organization_id, cases.c.created_at)
                .join(cases, cases.c.id == case_versions.c.case_id)
                .where(case_versions.c.case_id == case_id, case_versions.c.version == version,
                       cases.c.organization_id == organization_id)).first()
        if row is None:
            raise NotFound(f"no version {version} of case {case_id}")
        return StoredCase(case_id, row.organization_id, row.version, row.action == "delete", row.created_at,
                          row.recorded_at, orjson.loads(row.data))

    def history(self, organization_id: str, case_id: str) -> list[StoredCase]:
        self.get_case(organization_id, case_id)
        with self.reader.connect() as c:
            rows = c.execute(select(case_versions).where(case_versions.c.case_id == case_id)
                             .order_by(case_versions.c.version.desc())).all()
        created = rows[-1].recorded_at if rows else None
        return [StoredCase(case_id, organization_id, r.version, r.action == "delete", created, r.recorded_at,
                           orjson.loads(r.data)) for r in rows]

    def list_cases(self, organization_id: str, *, status: Optional[str] = None, program: Optional[str] = None,
                   identifier: Optional[tuple[Optional[str], str]] = None,
                   updated_since: Optional[dt.datetime] = None, after: Optional[tuple[dt.datetime, str]] = None,
                   limit: int = 50, include_deleted: bool = False) -> list[StoredCase]:
        """Cases in the order they were last updated (then id), from after the ``after`` cursor."""
        query = select(cases).where(cases.c.organization_id == organization_id)
        if not include_deleted:
            query = query.where(cases.c.deleted.is_(False))
        if status:
            query = query.where(cases.c.status == status)
        if program:
            query = query.where(cases.c.program == program)
        if updated_since:
            query = query.where(cases.c.updated_at >= updated_since)
        if identifier:
            system, value = identifier
            ids = select(client_identifiers.c.case_id).where(
                client_identifiers.c.organization_id == organization_id, client_identifiers.c.value == value)
            if system:
                ids = ids.where(client_identifiers.c.system == system)
            query = query.where(cases.c.id.in_(ids))
        if after:
            stamp, last_id = after
            query = query.where(or_(cases.c.updated_at > stamp, and_(cases.c.updated_at == stamp, cases.c.id > last_id)))
        query = query.order_by(cases.c.updated_at, cases.c.id).limit(limit)
        with self.reader.connect() as c:
            return [self._row(r) for r in c.execute(query)]

    def cases_by_identifier(self, organization_id: str, system: str, value: str,
                            conn: Optional[Connection] = None) -> list[str]:
        with self._read(conn) as c:
            return list(c.execute(select(client_identifiers.c.case_id).where(
                client_identifiers.c.organization_id == organization_id, client_identifiers.c.system == system,
                client_identifiers.c.value == value)).scalars())

    # -- plumbing ------------------------------------------------------------------------------
    def transaction(self):
        """One database transaction for several store calls (pass it as ``conn``)."""
        return self.engine.begin()

    def _tx(self, conn: Optional[Connection]):
        return _Reuse(conn) if conn is not None else self.engine.begin()

    def _read(self, conn: Optional[Connection]):
        return _Reuse(conn) if conn is not None else self.reader.connect()

    def _after_save(self, conn: Connection, stored: StoredCase, prepared: list) -> None:
        if stored.version > 1:  # a new case has none yet
            write(conn, _DELETE_IDENTIFIERS, {"case_id": stored.id})
        keys = dict.fromkeys((i["system"], i["value"]) for i in stored.data.get("client", {}).get("identifiers", ()))
        if keys:
            write(conn, _INSERT_IDENTIFIERS, [
                {"case_id": stored.id, "system": system, "value": value, "organization_id": stored.organization_id}
                for system, value in keys])
        for (hook, prepare), ready in zip(self._hooks, prepared):
            if prepare is None:
                hook(conn, stored)
            else:
                hook(conn, stored, ready)

    def _current(self, conn: Connection, organization_id: str, case_id: str) -> Optional[StoredCase]:
        row = conn.execute(_CURRENT_CASE, {"case_id": case_id, "organization_id": organization_id}).first()
        return self._row(row) if row is not None else None

    @staticmethod
    def _row(row: Any) -> StoredCase:
        return StoredCase(row.id, row.organization_id, row.version, row.deleted, aware(row.created_at),
                          aware(row.updated_at), orjson.loads(row.data))


def _select(connection, prepared: "_RawStatement", params: dict) -> list:
    cursor = connection.cursor()
    try:
        cursor.execute(prepared.sql, prepared.values(params))
        rows = cursor.fetchall()
    finally:
        cursor.close()
    return [prepared.row(values) for values in rows]


_PREPARED: dict = {}  # (statement, dialect name) -> _RawStatement


def _prepared(statement, dialect) -> "_RawStatement":
    prepared = _PREPARED.get((statement, dialect.name))
    if prepared is None:
        prepared = _PREPARED[(statement, dialect.name)] = _RawStatement(statement, dialect)
    return prepared


def write(conn: Connection, statement, params) -> int:
    """Run a prebuilt INSERT, UPDATE or DELETE with ``params`` (a dict, or a list of them for one
    row each) inside ``conn``'s transaction; returns how many rows it touched. On SQLite it goes
    straight to the driver: these run while the database's one write lock is held, so SQLAlchemy's
    own cost per statement delays every other writer. Elsewhere SQLAlchemy runs it (it batches many
    rows into one round trip)."""
    dialect = conn.dialect
    if dialect.name != "sqlite":
        return conn.execute(statement, params).rowcount
    prepared = _prepared(statement, dialect)
    cursor = conn.connection.driver_connection.cursor()
    try:
        if isinstance(params, list):
            cursor.executemany(prepared.sql, [prepared.values(p) for p in params])
        else:
            cursor.execute(prepared.sql, prepared.values(params))
        return cursor.rowcount
    finally:
        cursor.close()


def read(conn: Connection, statement, params: dict) -> list:
    """The rows of a prebuilt SELECT inside ``conn``'s transaction, as ``Store.fetch`` gives them."""
    if conn.dialect.name != "sqlite":
        return conn.execute(statement, params).all()
    return _select(conn.connection.driver_connection, _prepared(statement, conn.dialect), params)


class _RawStatement:
    """A statement compiled once for one database, with what turns its driver rows into typed rows."""

    def __init__(self, statement, dialect):
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        self.positions = compiled.positiontup if compiled.positional else None
        binds = compiled.binds
        self.defaults = {name: bind.effective_value for name, bind in binds.items() if not bind.required}
        filled = [(c, c.default) for c in getattr(compiled, "insert_prefetch", ())] + \
            [(c, c.onupdate) for c in getattr(compiled, "update_prefetch", ())]
        for column, default in filled:  # a column default SQLAlchemy's execution would fill in
            if default is None or not default.is_scalar:
                raise ValueError(f"{column}: only scalar column defaults can be filled in without SQLAlchemy")
            self.defaults[column.key] = default.arg
        self.converters = {name: convert for name, convert in (
            (name, bind.type.dialect_impl(dialect).bind_processor(dialect)) for name, bind in binds.items())
            if convert is not None}
        columns = list(getattr(statement, "selected_columns", ()))
        self.processors = [c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns]
        self.tuple = namedtuple("Row", [c.key for c in columns], rename=True)  # type: ignore[misc]

    def values(self, params: dict):
        values = {**self.defaults, **params}
        for name, convert in self.converters.items():
            if values.get(name) is not None:
                values[name] = convert(values[name])
        return [values[name] for name in self.positions] if self.positions is not None else values

    def row(self, values) -> tuple:
        return self.tuple(*[convert(v) if convert is not None and v is not None else v
                            for convert, v in zip(self.processors, values)])


class _Reuse:
    """A context manager over a connection someone else opened (and will commit)."""

    def __init__(self, conn: Connection):
        self.conn = conn

    def __enter__(self) -> Connection:
        return self.conn

    def __exit__(self, *exc) -> None:
        return None


def _make_sqlite_folder(url: str) -> None:
    """The embedded default keeps its SQLite file in ./instance: create the folder when it is missing."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:" \
            and not parsed.database.startswith("file:"):
        try:
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        except OSError:  # connecting will say what is wrong, where it is reported (``/readyz``, the CLI)
            pass


def _dump(data: dict) -> str:
    return orjson.dumps(data).decode()


def aware(stamp: dt.datetime) -> dt.datetime:
    """SQLite gives naive datetimes back; every stamp here is UTC."""
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)


__all__ = ["Store", "StoredCase", "aware", "metadata", "cases", "case_versions", "client_identifiers", "fhir_resources",
           "fhir_tokens", "create_keys", "api_keys", "audit_events", "now", "func", "Sequence", "Iterable",
           "UniqueConstraint", "JSON"]
