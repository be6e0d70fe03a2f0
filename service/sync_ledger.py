"""What sync remembers between pushes and pulls, read and written over the ``service.sync_store``
tables: the identity ledger (which partner resource each of ours is, what we last sent it, the bodies
of writes whose answer may be lost), the sync state of each case per partner, conflicts and dead
letters; and the case a push or a pull works on.
"""
from __future__ import annotations

from collections import namedtuple
from contextlib import nullcontext
from functools import lru_cache
from typing import Any, Optional

from sqlalchemy import and_, bindparam, insert, or_, select, update
from sqlalchemy.engine import Connection

from service.store import Store, StoredCase, now, read, write
from service.sync_store import conflicts, dead_letters, ledger, sync_state

#: how many attempted bodies the ledger keeps per resource (a lost answer leaves its write unknown)
ATTEMPTS_KEPT = 5
#: how many of the partner's version ids of our own writes the ledger remembers per resource
WRITTEN_VERSIONS_KEPT = 50


# -- the identity ledger -------------------------------------------------------------------------
# Statements are built once and run through ``store.fetch`` / ``read`` / ``write``: a push runs a
# dozen of them, and building and executing each through SQLAlchemy cost more than the push's wait
# for the partner.
_LEDGER_KEY = (ledger.c.partner_id == bindparam("key_partner"), ledger.c.resource_type == bindparam("key_type"),
               ledger.c.local_id == bindparam("key_local"))
_LEDGER_ROW = select(ledger).where(*_LEDGER_KEY)
_LEDGER_BY_REMOTE = select(ledger).where(ledger.c.partner_id == bindparam("key_partner"),
                                         ledger.c.resource_type == bindparam("key_type"),
                                         ledger.c.remote_id == bindparam("key_remote"))
#: what ``save_ledger`` writes of a row (besides its key)
_SAVED = ("remote_id", "remote_version", "sent_hash", "sent", "case_id", "updated_at", "written_versions")
_LEDGER_INSERT = insert(ledger).values({c.name: bindparam(c.name) for c in ledger.columns if c.name != "attempts"})
_LEDGER_SAVE = update(ledger).where(*_LEDGER_KEY).values({name: bindparam(name) for name in _SAVED})
_LEDGER_ATTEMPTS = update(ledger).where(*_LEDGER_KEY).values(attempts=bindparam("attempts"))


def _key(partner_id: str, rtype: str, local_id: str) -> dict:
    return {"key_partner": partner_id, "key_type": rtype, "key_local": local_id}


@lru_cache(maxsize=64)
def _ledger_rows_of(count: int):
    """The ledger rows at one partner of ``count`` resources (bound as type0, id0, type1, id1, ...). Each
    term names the whole key, so each is one look-up in the primary key (a ``local_id IN (...)``
    would read every row of the partner)."""
    return select(ledger).where(or_(*[
        and_(ledger.c.partner_id == bindparam("key_partner"), ledger.c.resource_type == bindparam(f"type{i}"),
             ledger.c.local_id == bindparam(f"id{i}")) for i in range(count)]))


def ledger_row(store: Store, partner_id: str, key: tuple[str, str]) -> Any:
    return store.lookup(_LEDGER_ROW, _key(partner_id, *key))


def ledger_rows(store: Store, partner_id: str, keys: list[tuple[str, str]]) -> list[Any]:
    """The ledger rows of these (type, local id) at the partner, for those it has."""
    if not keys:
        return []
    params = {"key_partner": partner_id}
    for i, (rtype, local_id) in enumerate(keys):
        params[f"type{i}"], params[f"id{i}"] = rtype, local_id
    return store.fetch(_ledger_rows_of(len(keys)), params)


def ledger_by_remote(store: Store, partner_id: str, rtype: Optional[str], remote_id: Optional[str]) -> Optional[Any]:
    if not rtype or not remote_id:
        return None
    return store.lookup(_LEDGER_BY_REMOTE, {"key_partner": partner_id, "key_type": rtype, "key_remote": remote_id})


#: a ledger row as ``save_ledger`` leaves it (what a read of the row would give)
LedgerRow = namedtuple("LedgerRow", [column.name for column in ledger.columns])


def save_ledger(store: Store, partner_id: str, case_id: str, rtype: str, local_id: str, remote_id: str,
                remote_version: Optional[str], digest: Optional[str], body: Optional[dict],
                ours: bool = False, conn: Optional[Connection] = None) -> Any:
    """Record what the partner holds; with ``ours``, the version is one we wrote (so a pull that reads
    it back, even after we wrote again, knows it for an echo and not for the partner's change). In
    ``conn``'s transaction when given (several rows, one write)."""
    values = dict(remote_id=remote_id, remote_version=remote_version, sent_hash=digest, sent=body, case_id=case_id,
                  updated_at=now())
    key = _key(partner_id, rtype, local_id)
    with (nullcontext(conn) if conn is not None else store.engine.begin()) as conn:
        found = read(conn, _LEDGER_ROW, key)
        current = found[0] if found else None
        written = list((current.written_versions or []) if current is not None else [])
        if ours and remote_version and remote_version not in written:
            written = (written + [remote_version])[-WRITTEN_VERSIONS_KEPT:]
        values["written_versions"] = written
        if current is None:
            write(conn, _LEDGER_INSERT, {"partner_id": partner_id, "resource_type": rtype, "local_id": local_id,
                                         **values})
        else:
            write(conn, _LEDGER_SAVE, {**key, **values})
    before = current._asdict() if current is not None else dict.fromkeys(LedgerRow._fields)
    return LedgerRow(**{**before, **values, "partner_id": partner_id, "resource_type": rtype, "local_id": local_id})


def note_attempt(store: Store, partner_id: str, rtype: str, local_id: str, body: dict) -> Optional[list]:
    """Remember a body before sending it: if the answer is lost, the partner may hold it without our
    knowing its version, and it must not later look like the partner's own change. Returns the bodies
    remembered before (``None`` without a ledger row)."""
    key = _key(partner_id, rtype, local_id)
    with store.engine.begin() as conn:
        found = read(conn, _LEDGER_ROW, key)
        if not found:
            return None
        before = found[0].attempts or []
        attempts = [a for a in before if a != body][-(ATTEMPTS_KEPT - 1):] + [body]
        write(conn, _LEDGER_ATTEMPTS, {**key, "attempts": attempts})
        return list(before)


def withdraw_attempts(store: Store, partner_id: str, before: dict) -> None:
    """A bundle that certainly did not go through (turned away, refused whole): the bodies noted for
    it are forgotten again, so a later push does not take them for unanswered writes."""
    if not before:
        return
    with store.engine.begin() as conn:
        write(conn, _LEDGER_ATTEMPTS, [{**_key(partner_id, rtype, local_id), "attempts": attempts}
                                       for (rtype, local_id), attempts in before.items()])


# -- sync state, conflicts, dead letters ---------------------------------------------------------
#: a case's sync state at a partner, bound as key_case and key_partner
STATE_KEY = (sync_state.c.case_id == bindparam("key_case"), sync_state.c.partner_id == bindparam("key_partner"))
_STATE_OF = select(sync_state).where(*STATE_KEY)


@lru_cache(maxsize=64)
def _state_update(names: tuple[str, ...]):
    return update(sync_state).where(*STATE_KEY).values({name: bindparam(name) for name in names})


@lru_cache(maxsize=64)
def _state_insert(names: tuple[str, ...]):
    return insert(sync_state).values({name: bindparam(name) for name in names})


def state_of(store: Store, case_id: str, partner_id: str, conn: Optional[Connection] = None) -> Optional[Any]:
    """The case's sync state at the partner (in ``conn``'s transaction when given)."""
    key = {"key_case": case_id, "key_partner": partner_id}
    if conn is None:
        return store.lookup(_STATE_OF, key)
    found = read(conn, _STATE_OF, key)
    return found[0] if found else None


def set_state(conn: Connection, case_id: str, partner_id: str, **values: Any) -> None:
    values["updated_at"] = now()
    if write(conn, _state_update(tuple(sorted(values))), {**values, "key_case": case_id, "key_partner": partner_id}):
        return
    row = {"status": "pending", **values, "case_id": case_id, "partner_id": partner_id}
    write(conn, _state_insert(tuple(sorted(row))), row)


def update_state(store: Store, case_id: str, partner_id: str, **values: Any) -> None:
    with store.engine.begin() as conn:
        set_state(conn, case_id, partner_id, **values)


def record_conflict(store: Store, partner_id: str, case_id: str, rtype: str, local_id: str, fields: list[str],
                    ours: dict, theirs: dict) -> None:
    with store.engine.begin() as conn:
        conn.execute(insert(conflicts).values(case_id=case_id, partner_id=partner_id, resource_type=rtype,
                                              local_id=local_id, fields=fields, ours=ours, theirs=theirs,
                                              created_at=now()))


def record_failure(store: Store, partner_id: str, case_id: Optional[str], version: Optional[int], operation: str,
                   error: Exception) -> int:
    """A permanent failure becomes a dead letter holding the partner's OperationOutcome."""
    status = getattr(error, "status", None)
    outcome = getattr(error, "outcome", None)
    with store.engine.begin() as conn:
        letter = conn.execute(insert(dead_letters).values(
            partner_id=partner_id, case_id=case_id, case_version=version, operation=operation, status=status,
            error=str(error), outcome=outcome, created_at=now())).inserted_primary_key[0]
        if case_id:
            set_state(conn, case_id, partner_id, status="failed", last_error=str(error))
    return letter


# -- the case ------------------------------------------------------------------------------------
def current_case(store: Store, case_id: str) -> StoredCase:
    """The case's latest version, whichever organization holds it."""
    return store.current_case(case_id)
