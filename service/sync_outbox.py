"""The outbox: which partners a case goes to, an outbox row for each written in the same transaction
as the case save, and the dispatcher that turns waiting rows into push tasks (ids and versions only).
"""
from __future__ import annotations

from typing import Any, Callable

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from service.store import Store, StoredCase, now
from service.sync_ledger import set_state
from service.sync_store import outbox, partners


def shared_with(partner: Any, organization_id: str, data: dict) -> bool:
    if not partner.active or partner.direction == "pull" or organization_id not in (partner.organizations or ()):
        return False
    if partner.programs and data.get("program") not in partner.programs:
        return False
    if partner.high_risk_only and (data.get("risk") or {}).get("level") != "high":
        return False
    return True


_ACTIVE_PARTNERS = select(partners).where(partners.c.active.is_(True))  # built once: every case save runs it


def on_case_saved(conn: Connection, stored: StoredCase) -> None:
    """Store save hook: an outbox row (and a pending sync state) per partner the case goes to."""
    stamp = now()
    for partner in conn.execute(_ACTIVE_PARTNERS):
        if not shared_with(partner, stored.organization_id, stored.data):
            continue
        conn.execute(insert(outbox).values(case_id=stored.id, partner_id=partner.id, case_version=stored.version,
                                           created_at=stamp))
        set_state(conn, stored.id, partner.id, status="pending", wanted_version=stored.version)


#: at most this many cases one push task carries (a task costs the broker and the worker about as much as
#: a small push: carrying several makes a backlog drain faster), and a dispatch of few cases still gives
#: each of ``SPREAD`` workers some
BATCH_CASES = 20
SPREAD = 8


def dispatch(store: Store, enqueue: Callable[[str, list[tuple[str, int]]], None], limit: int = 500,
             pages: int = 20) -> int:
    """Turn waiting outbox rows into push tasks, each carrying a partner id and some (case id, version)
    pairs; ``limit`` rows at a time, until none wait or ``pages`` times. Rows are claimed first (one
    dispatcher wins each), so several dispatchers never enqueue a row twice (a case enqueued twice is
    harmless anyway); rows whose task could not be enqueued (the broker is down) wait again. Returns
    how many cases were enqueued."""
    enqueued = 0
    for _ in range(pages):
        rows = _claim(store, limit)
        enqueued += _enqueue(store, rows, enqueue)
        if len(rows) < limit:
            break
    return enqueued


def _claim(store: Store, limit: int) -> list:
    with store.engine.begin() as conn:
        query = select(outbox.c.id, outbox.c.case_id, outbox.c.partner_id, outbox.c.case_version) \
            .where(outbox.c.dispatched_at.is_(None)).order_by(outbox.c.id).limit(limit)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        rows = conn.execute(query).all()
        if rows:
            conn.execute(update(outbox).where(outbox.c.id.in_([r.id for r in rows])).values(dispatched_at=now()))
    return rows


def _enqueue(store: Store, rows: list, enqueue: Callable[[str, list[tuple[str, int]]], None]) -> int:
    latest: dict[str, dict[str, int]] = {}
    for row in rows:  # several versions of one case waiting: the newest push covers them all
        waiting = latest.setdefault(row.partner_id, {})
        waiting[row.case_id] = max(waiting.get(row.case_id, 0), row.case_version)
    tasks = []
    for partner_id, waiting in latest.items():
        items = list(waiting.items())
        size = min(BATCH_CASES, max(1, -(-len(items) // SPREAD)))
        tasks += [(partner_id, items[start:start + size]) for start in range(0, len(items), size)]
    for done, (partner_id, items) in enumerate(tasks):
        try:
            enqueue(partner_id, items)
        except Exception:
            left = {(p, case_id) for p, batch in tasks[done:] for case_id, _ in batch}
            _unclaim(store, [r.id for r in rows if (r.partner_id, r.case_id) in left])
            raise
    return sum(len(waiting) for waiting in latest.values())


def _unclaim(store: Store, ids: list[int]) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(outbox).where(outbox.c.id.in_(ids)).values(dispatched_at=None))
