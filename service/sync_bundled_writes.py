"""Writing what changed in a case with Bundles: one transaction where the partner has transactions,
batches in rounds where it has batch only (a batch entry cannot refer to another), several of either
where the partner caps a bundle's entries. ``service.sync_bundles`` builds and reads the bundles; here
they are sent and the ledger keeps what each wrote.

The guarantees are those of one request at a time (``service.sync_single_writes``): creates are
conditional or looked for first, updates carry If-Match and are noted before they go. What a bundle
does not settle (a stale If-Match, a create that found our resource there already, a bundle refused
whole) is written one request at a time, with its merge and conflicts.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, Callable, Optional

from sqlalchemy.engine import Connection

from adapters.errors import AmbiguousWrite, PermanentError, TransientError, VersionConflict
from service import sync_bundles as bundles
from service.store import Store
from service.sync_ledger import ledger_row, note_attempt, save_ledger, withdraw_attempts
from service.sync_merge import differs, our_write
from service.sync_outgoing import SYNC_SYSTEM, body_hash, body_to_send, weak_etag
from service.sync_single_writes import PushResult, adopt, push_one

log = logging.getLogger("casebridge.sync")


def push_bundled(store: Store, partner: Any, case_id: str, resources: list[dict], endpoint: Any, by_local: dict,
                 kind: str, result: PushResult, then: Optional[Callable[[Connection], None]] = None) -> bool:
    """Write what changed in one transaction, or in batch rounds (each round what can be written with
    the references known so far: a batch entry cannot refer to another); a partner that caps its
    bundles (``max_bundle_entries`` in its route) gets several, each after what it refers to.

    ``then(conn)`` runs in the ledger write of the last bundle when that bundle settles everything
    left (one write fewer a push); returns whether it ran."""
    conditional = set((partner.route or {}).get("conditional_create") or ())
    for resource in resources:
        key = _key(resource)
        row = by_local.get(key)
        if row is None and key[0] not in conditional:  # no If-None-Exist there: look before creating
            row = adopt(store, partner.id, case_id, key[0], key[1], endpoint)
            if row is not None:
                by_local[key] = row
        elif row is not None and _unanswered(row):
            by_local[key] = _recognise(store, partner.id, case_id, key, row, endpoint)
    waiting = _changed(resources, by_local, result)
    limit = (partner.route or {}).get("max_bundle_entries")
    while waiting:
        sending = bundles.next_bundle(kind, waiting, {_key(r) for r in waiting if _key(r) not in by_local}, limit)
        if not sending:
            break  # they refer to each other: one at a time, below
        chosen = {_key(r) for r in sending}
        waiting = [r for r in waiting if _key(r) not in chosen]
        last = then if not waiting else None
        again = _send_bundle(store, partner, case_id, sending, endpoint, by_local, kind, conditional, result, last)
        if last is not None and again is None:
            return True
        for resource in again or ():
            push_one(store, partner, case_id, resource, endpoint, by_local, result)
    for resource in waiting:
        push_one(store, partner, case_id, resource, endpoint, by_local, result)
    return False


def _key(resource: dict) -> tuple[str, str]:
    return resource["resourceType"], resource["id"]


def _unanswered(row: Any) -> bool:
    """Whether the last update sent was never answered (its answer lost, or the push failed): the
    last body noted is not what the ledger says the partner holds."""
    last = (row.attempts or [None])[-1]
    return last is not None and (row.sent is None or row.sent.keys() != last.keys() or differs(row.sent, last))


def _recognise(store: Store, partner_id: str, case_id: str, key: tuple[str, str], row: Any, endpoint: Any) -> Any:
    """Read the partner's copy of a resource whose last update went unanswered: when it is a write
    of ours (the lost one, say), the ledger takes its version, so the bundle's If-Match is current and
    nothing already there is sent again. Otherwise the row stays, and a stale If-Match is merged."""
    try:
        theirs = endpoint.read(key[0], row.remote_id)
    except PermanentError:
        return row  # gone, or not readable: the write finds out
    ours = our_write(row, theirs.resource)
    if ours is None or not theirs.version_id:
        return row
    save_ledger(store, partner_id, case_id, key[0], key[1], row.remote_id, theirs.version_id, body_hash(ours), ours,
                ours=True)
    note_attempt(store, partner_id, key[0], key[1], ours)  # settled: the last body noted is what it holds
    return ledger_row(store, partner_id, key)


def _changed(resources: list[dict], by_local: dict, result: PushResult) -> list[dict]:
    """The resources whose body is not what the partner last got from us (every new one among them);
    the others are counted unchanged."""
    pending = {_key(r): bundles.placeholder(*_key(r)) for r in resources if _key(r) not in by_local}
    changed = []
    for resource in resources:
        row = by_local.get(_key(resource))
        if row is not None and row.sent_hash == body_hash(body_to_send(resource, by_local, pending)):
            result.unchanged += 1
        else:
            changed.append(resource)
    return changed


def _send_bundle(store: Store, partner: Any, case_id: str, resources: list[dict], endpoint: Any, by_local: dict,
                 kind: str, conditional: set[str], result: PushResult,
                 then: Optional[Callable[[Connection], None]] = None) -> Optional[list[dict]]:
    """One transaction or batch of ``resources``; the ledger keeps what it wrote. Returns what is left
    to write one request at a time; ``None`` when nothing is, and ``then(conn)`` ran in the ledger's
    write. A refused entry fails the push as its own request would have (``TransientError`` for 429
    and 5xx, else ``PermanentError``), after what the others wrote is kept."""
    pending = {_key(r): bundles.placeholder(*_key(r)) for r in resources if _key(r) not in by_local}
    writes = []
    noted: dict = {}  # what each update's ledger row remembered before this bundle
    for resource in resources:
        rtype, local_id = _key(resource)
        body = body_to_send(resource, by_local, pending)
        row = by_local.get((rtype, local_id))
        if row is None:
            condition = f"identifier={SYNC_SYSTEM}|{local_id}" if rtype in conditional else None
            writes.append(bundles.Write(rtype, local_id, body, if_none_exist=condition))
        else:
            noted[(rtype, local_id)] = note_attempt(store, partner.id, rtype, local_id, body)
            writes.append(bundles.Write(rtype, local_id, body, row.remote_id, if_match=weak_etag(row.remote_version)))
    try:
        send = endpoint.transaction if kind == "transaction" else endpoint.batch
        response = send(bundles.bundle(kind, writes))
    except AmbiguousWrite:
        raise  # it may have gone through: the bodies stay noted
    except TransientError:
        withdraw_attempts(store, partner.id, noted)  # turned away: nothing was written
        raise
    except PermanentError as refused:  # a stale If-Match, or the bundle itself refused: nothing was written
        withdraw_attempts(store, partner.id, noted)
        level = logging.INFO if isinstance(refused, VersionConflict) else logging.WARNING
        log.log(level, "partner %s refused a %s (%s, HTTP %s): writing one request at a time", partner.id, kind,
                type(refused).__name__, refused.status)
        return resources
    answers = bundles.answers(kind, response, writes)
    withdraw_attempts(store, partner.id, {w.key: noted[w.key] for w, a in zip(writes, answers)
                                          if not a.ok and w.key in noted})  # refused entries wrote nothing
    placed = dict(by_local)  # with the ids the partner gave what it created: the bodies it now holds
    for write, answer in zip(writes, answers):
        if answer.ok and write.creates:
            if answer.remote_id:
                placed[write.key] = SimpleNamespace(remote_id=answer.remote_id)
            else:  # created, but the answer does not say under which id: find it by our identifier
                row = adopt(store, partner.id, case_id, write.rtype, write.local_id, endpoint)
                if row is not None:
                    by_local[write.key] = placed[write.key] = row
    again: list[dict] = []
    failures: list[Exception] = []
    with store.engine.begin() as conn:  # what the partner now holds: one write of the ledger
        for resource, write, answer in zip(resources, writes, answers):
            if not answer.ok:
                if answer.conflict:
                    again.append(resource)  # re-read, merge or record the conflict, as one request does
                else:
                    failures.append(bundles.refused(kind, write, answer))
                continue
            if not answer.remote_id:
                again.append(resource)
                continue
            body = body_to_send(resource, placed)
            if write.if_none_exist and answer.status == 200 and (answer.resource is None
                                                                 or differs(answer.resource, body)):
                # found there already (an earlier answer was lost), but not as we send it now: an update;
                # the copy there is a write of ours, not the partner's change, should a pull read it meanwhile
                by_local[write.key] = save_ledger(store, partner.id, case_id, write.rtype, write.local_id,
                                                  answer.remote_id, answer.version, None, None, ours=True,
                                                  conn=conn)
                again.append(resource)
                continue
            by_local[write.key] = save_ledger(store, partner.id, case_id, write.rtype, write.local_id, answer.remote_id,
                                              answer.version, body_hash(body), body, ours=True,
                                              conn=conn)
            result.written += 1
        if then is not None and not again and not failures:
            then(conn)
            return None
    if failures:
        raise next((f for f in failures if isinstance(f, TransientError)), failures[0])
    return again
