"""Use cases for watching and steering sync: status per partner and per case, dead letters and their
replay, conflicts and their resolution, starting pulls and taking notifications."""
from __future__ import annotations

from typing import Any, Optional

from sqlalchemy import func, select, update

from service.auth import Actor
from service.errors import NotFound
from service.store import Store, now
from service.sync_pull import notified_references
from service.sync_store import conflicts, dead_letters as letters, ledger, outbox, partners, sync_state


def _iso(stamp: Any) -> Optional[str]:
    from service.partners import iso

    return iso(stamp)


def partner_status(store: Store, partner_id: str) -> dict:
    with store.reader.connect() as conn:
        partner = conn.execute(select(partners).where(partners.c.id == partner_id)).first()
        if partner is None:
            raise NotFound(f"no partner {partner_id}")
        waiting = conn.execute(select(func.count()).select_from(outbox).where(
            outbox.c.partner_id == partner_id, outbox.c.dispatched_at.is_(None))).scalar()
        by_status = dict(conn.execute(select(sync_state.c.status, func.count()).where(
            sync_state.c.partner_id == partner_id).group_by(sync_state.c.status)).all())
        dead = conn.execute(select(func.count()).select_from(letters).where(
            letters.c.partner_id == partner_id, letters.c.replayed_at.is_(None))).scalar()
    return {"partner": partner_id, "backlog": waiting + by_status.get("pending", 0), "outbox_waiting": waiting,
            "cases": by_status, "dead_letters": dead, "last_success_at": _iso(partner.last_success_at),
            "last_pull_at": _iso(partner.last_pull_at), "watermark": partner.watermark, "route": partner.route}


def case_sync_status(store: Store, who: Actor, case_id: str) -> dict:
    store.get_case(who.organization_id, case_id)  # 404 for another organization's case
    with store.reader.connect() as conn:
        states = conn.execute(select(sync_state).where(sync_state.c.case_id == case_id)).all()
        rows = conn.execute(select(ledger).where(ledger.c.case_id == case_id)).all()
    remote: dict[str, list] = {}
    for row in rows:
        remote.setdefault(row.partner_id, []).append(
            {"resource_type": row.resource_type, "id": row.local_id, "remote_id": row.remote_id,
             "remote_version": row.remote_version})
    return {"case": case_id, "partners": [
        {"partner": s.partner_id, "status": s.status, "wanted_version": s.wanted_version,
         "synced_version": s.synced_version, "member_id": s.member_id, "last_error": s.last_error,
         "updated_at": _iso(s.updated_at), "resources": remote.get(s.partner_id, [])} for s in states]}


def dead_letters(store: Store, partner_id: Optional[str] = None) -> list[dict]:
    query = select(letters).order_by(letters.c.id.desc()).limit(500)
    if partner_id:
        query = query.where(letters.c.partner_id == partner_id)
    with store.reader.connect() as conn:
        return [{"id": r.id, "partner": r.partner_id, "case": r.case_id, "case_version": r.case_version,
                 "operation": r.operation, "status": r.status, "error": r.error, "outcome": r.outcome,
                 "created_at": _iso(r.created_at), "replayed_at": _iso(r.replayed_at)}
                for r in conn.execute(query)]


def replay(store: Store, letter_id: int) -> dict:
    """Send a dead letter's work again (after the partner or the data was fixed)."""
    from service import tasks

    with store.engine.begin() as conn:
        row = conn.execute(select(letters).where(letters.c.id == letter_id)).first()
        if row is None:
            raise NotFound(f"no dead letter {letter_id}")
        conn.execute(update(letters).where(letters.c.id == letter_id).values(replayed_at=now()))
        if row.case_id:
            conn.execute(update(sync_state).where(sync_state.c.case_id == row.case_id,
                                                  sync_state.c.partner_id == row.partner_id)
                         .values(status="pending", last_error=None, synced_version=0, updated_at=now()))
    if row.operation == "push" and row.case_id:
        tasks.push_case.delay(row.case_id, row.partner_id, row.case_version or 0)
    else:
        tasks.pull_partner.delay(row.partner_id)
    return {"id": letter_id, "status": "queued"}


def enqueue_pull(partner_id: str) -> None:
    from service import tasks

    tasks.pull_partner.delay(partner_id)


NOTIFICATION_TYPES = ("Bundle", "SubscriptionStatus", "Parameters")


def accept_notification(partner_id: str, payload: Any) -> list[str]:
    from service import tasks
    from service.errors import Invalid, Problem

    message = "a notification is a FHIR Bundle, SubscriptionStatus or Parameters"
    if not isinstance(payload, dict):
        raise Invalid(message, [Problem("", "expected a JSON object")])
    if payload.get("resourceType") not in NOTIFICATION_TYPES:
        raise Invalid(message, [Problem("resourceType", f"expected one of {', '.join(NOTIFICATION_TYPES)}")])
    try:
        references = notified_references(payload)
    except (AttributeError, TypeError):  # an element of the wrong JSON type (an entry that is not an object, ...)
        raise Invalid(message, [Problem("", "not a well-formed notification: an element has the wrong JSON type")]) \
            from None
    if references:
        tasks.notify.delay(partner_id, references)
    return references


def conflicts_of(store: Store, who: Actor, case_id: Optional[str], only_open: bool) -> list[dict]:
    from service.store import cases

    query = select(conflicts).join(cases, cases.c.id == conflicts.c.case_id).where(
        cases.c.organization_id == who.organization_id).order_by(conflicts.c.id)
    if case_id:
        query = query.where(conflicts.c.case_id == case_id)
    if only_open:
        query = query.where(conflicts.c.resolved_at.is_(None))
    with store.reader.connect() as conn:
        return [{"id": r.id, "case": r.case_id, "partner": r.partner_id, "resource_type": r.resource_type,
                 "resource_id": r.local_id, "fields": r.fields, "ours": r.ours, "theirs": r.theirs,
                 "created_at": _iso(r.created_at), "resolved_at": _iso(r.resolved_at)} for r in conn.execute(query)]


def resolve_conflict(store: Store, who: Actor, conflict_id: int) -> dict:
    """The case manager has decided (by editing the case, or accepting it as it is): mark the
    conflict resolved and sync the case again; the next push compares with the partner anew."""
    from service import tasks

    found = [c for c in conflicts_of(store, who, None, False) if c["id"] == conflict_id]
    if not found:
        raise NotFound(f"no conflict {conflict_id}")
    conflict = found[0]
    with store.engine.begin() as conn:
        conn.execute(update(conflicts).where(conflicts.c.id == conflict_id).values(resolved_at=now()))
        conn.execute(update(ledger).where(ledger.c.partner_id == conflict["partner"],
                                          ledger.c.resource_type == conflict["resource_type"],
                                          ledger.c.local_id == conflict["resource_id"])
                     .values(sent=conflict["theirs"], sent_hash=None, remote_version=(
                         (conflict["theirs"] or {}).get("meta") or {}).get("versionId")))
        conn.execute(update(sync_state).where(sync_state.c.case_id == conflict["case"],
                                              sync_state.c.partner_id == conflict["partner"])
                     .values(status="pending", updated_at=now()))
    stored = store.get_case(who.organization_id, conflict["case"])
    tasks.push_case.delay(conflict["case"], conflict["partner"], stored.version)
    return {"id": conflict_id, "status": "resolved"}
