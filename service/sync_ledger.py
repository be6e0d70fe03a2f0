"""What sync remembers between pushes and pulls, read and written over the ``service.sync_store``
tables: the identity ledger (which partner resource each of ours is, what we last sent it, the bodies
of writes whose answer may be lost), the sync state of each case per partner, conflicts and dead
letters; and the case a push or a pull works on.
"""
from __future__ import annotations

from collections import namedtuple
from contextlib import nullcontext

from typing import Any, Optional

from sqlalchemy import and_, insert, select, update
from sqlalchemy.engine import Connection

from service.errors import NotFound
from service.store import Store, StoredCase, cases, now
from service.sync_store import conflicts, dead_letters, ledger, sync_state

#: how many attempted bodies the ledger keeps per resource (a lost answer leaves its write unknown)
ATTEMPTS_KEPT = 5
#: how many of the partner's version ids of our own writes the ledger remembers per resource
WRITTEN_VERSIONS_KEPT = 50


# -- the identity ledger -------------------------------------------------------------------------
def ledger_row(store: Store, partner_id: str, key: tuple[str, str]) -> Any:
    with store.reader.connect() as conn:
        return conn.execute(select(ledger).where(ledger.c.partner_id == partner_id, ledger.c.resource_type == key[0],
                                                 ledger.c.local_id == key[1])).first()


def ledger_rows(store: Store, partner_id: str, local_ids: list[str]) -> list[Any]:
    with store.reader.connect() as conn:
        return conn.execute(select(ledger).where(ledger.c.partner_id == partner_id,
                                                 ledger.c.local_id.in_(local_ids))).all()


def ledger_by_remote(store: Store, partner_id: str, rtype: Optional[str], remote_id: Optional[str]) -> Optional[Any]:
    if not rtype or not remote_id:
        return None
    with store.reader.connect() as conn:
        return conn.execute(select(ledger).where(ledger.c.partner_id == partner_id, ledger.c.resource_type == rtype,
                                                 ledger.c.remote_id == remote_id)).first()


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
    key = and_(ledger.c.partner_id == partner_id, ledger.c.resource_type == rtype, ledger.c.local_id == local_id)
    with (nullcontext(conn) if conn is not None else store.engine.begin()) as conn:
        current = conn.execute(select(ledger).where(key)).first()
        written = list((current.written_versions or []) if current is not None else [])
        if ours and remote_version and remote_version not in written:
            written = (written + [remote_version])[-WRITTEN_VERSIONS_KEPT:]
        values["written_versions"] = written
        if current is None:
            conn.execute(insert(ledger).values(partner_id=partner_id, resource_type=rtype, local_id=local_id, **values))
        else:
            conn.execute(update(ledger).where(key).values(**values))
    before = current._asdict() if current is not None else dict.fromkeys(LedgerRow._fields)
    return LedgerRow(**{**before, **values, "partner_id": partner_id, "resource_type": rtype, "local_id": local_id})


def note_attempt(store: Store, partner_id: str, rtype: str, local_id: str, body: dict) -> Optional[list]:
    """Remember a body before sending it: if the answer is lost, the partner may hold it without our
    knowing its version, and it must not later look like the partner's own change. Returns the bodies
    remembered before (``None`` without a ledger row)."""
    key = and_(ledger.c.partner_id == partner_id, ledger.c.resource_type == rtype, ledger.c.local_id == local_id)
    with store.engine.begin() as conn:
        row = conn.execute(select(ledger.c.attempts).where(key)).first()
        if row is None:
            return None
        attempts = [a for a in (row.attempts or []) if a != body][-(ATTEMPTS_KEPT - 1):] + [body]
        conn.execute(update(ledger).where(key).values(attempts=attempts))
        return list(row.attempts or [])


def withdraw_attempts(store: Store, partner_id: str, before: dict) -> None:
    """A bundle that certainly did not go through (turned away, refused whole): the bodies noted for
    it are forgotten again, so a later push does not take them for unanswered writes."""
    if not before:
        return
    with store.engine.begin() as conn:
        for (rtype, local_id), attempts in before.items():
            conn.execute(update(ledger).where(ledger.c.partner_id == partner_id, ledger.c.resource_type == rtype,
                                              ledger.c.local_id == local_id).values(attempts=attempts))


# -- sync state, conflicts, dead letters ---------------------------------------------------------
def state_of(store: Store, case_id: str, partner_id: str) -> Optional[Any]:
    with store.reader.connect() as conn:
        return conn.execute(select(sync_state).where(sync_state.c.case_id == case_id,
                                                     sync_state.c.partner_id == partner_id)).first()


def set_state(conn: Connection, case_id: str, partner_id: str, **values: Any) -> None:
    values["updated_at"] = now()
    key = and_(sync_state.c.case_id == case_id, sync_state.c.partner_id == partner_id)
    if conn.execute(update(sync_state).where(key).values(**values)).rowcount == 0:
        conn.execute(insert(sync_state).values(case_id=case_id, partner_id=partner_id,
                                               **{"status": "pending", **values}))


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
    with store.reader.connect() as conn:
        row = conn.execute(select(cases.c.organization_id).where(cases.c.id == case_id)).first()
    if row is None:
        raise NotFound(f"no case {case_id}")
    return store.get_case(row.organization_id, case_id)
