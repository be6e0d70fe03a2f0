"""Keeping partners in step with case records: push through the outbox and the identity ledger,
pull with a watermark, and never lose or duplicate an update.

- A case save writes an outbox row per partner the case is shared with, in the same transaction
  (``on_case_saved``, a store save hook). ``dispatch`` turns rows into tasks (ids and versions only).
- ``push_case`` is idempotent. The ledger maps each of our resources to the partner's id, version and
  the hash of what was sent: an unchanged resource is not written again; a resource with no ledger
  row is first looked for at the partner by our sync identifier, so a POST whose answer was lost
  (``AmbiguousWrite``) is found, not repeated. Updates send ``If-Match``; on a version conflict the
  partner's copy is compared with what we last sent: their changes to elements we did not change
  are kept and the update retried; an element both sides changed is recorded as a conflict for the
  case manager and nothing is overwritten.
- How a push writes follows the partner's route: one transaction for what changed where the partner
  has transactions (new resources referred to by placeholders inside it), batches in rounds where it
  has batch only (a batch entry cannot refer to another), else one request per resource. What a
  bundle does not settle (a stale ``If-Match``, a bundle refused whole) is written one request at a
  time, with the merge above (``service.sync_bundles`` builds and reads the bundles).
- ``pull_partner`` searches with a ``_lastUpdated`` watermark and applies what changed: Task status
  of our referrals (closed loop), new referrals (intake cases), and plans and goals we shared.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Optional

import orjson
from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.engine import Connection

from adapters.errors import AmbiguousWrite, PermanentError, TransientError, VersionConflict
from mappings import ids
from mappings.export import case_resources
from service import schemas, sync_bundles as bundles
from service.domain import Case, shareable
from service.errors import NotFound
from service.store import Store, StoredCase, now
from service.sync_store import conflicts, dead_letters, ledger, outbox, partners, sync_state

log = logging.getLogger("casebridge.sync")

#: the identifier every resource we send carries, so we can find it at the partner again
SYNC_SYSTEM = f"{ids.BASE}/sid/resource"
#: the order resources are written in: each one's references before it
WRITE_ORDER = ("Organization", "Practitioner", "Patient", "Condition", "Goal", "ServiceRequest", "Task",
               "CareTeam", "CarePlan")
#: elements the partner keeps on its copy (its id, version, timestamps); never compared
SERVER_ELEMENTS = ("id", "meta")
#: elements derived from the rest, always ours: a partner re-rendering the narrative is no conflict
DERIVED_ELEMENTS = ("text",)


class CaseBusy(TransientError):
    """Another push holds the case for this partner: try again shortly (this is no failure)."""


class ConflictRecorded(Exception):
    """Both sides changed the same element: recorded for the case manager, nothing overwritten."""


# -- the outbox --------------------------------------------------------------------------------
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
        _set_state(conn, stored.id, partner.id, status="pending", wanted_version=stored.version)


def dispatch(store: Store, enqueue: Callable[[str, str, int], None], limit: int = 500) -> int:
    """Turn waiting outbox rows into push tasks. Rows are claimed first (one dispatcher wins each),
    so several dispatchers never enqueue a row twice; a task enqueued twice is harmless anyway."""
    with store.engine.begin() as conn:
        query = select(outbox.c.id, outbox.c.case_id, outbox.c.partner_id, outbox.c.case_version) \
            .where(outbox.c.dispatched_at.is_(None)).order_by(outbox.c.id).limit(limit)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        rows = conn.execute(query).all()
        if not rows:
            return 0
        conn.execute(update(outbox).where(outbox.c.id.in_([r.id for r in rows])).values(dispatched_at=now()))
    latest: dict[tuple[str, str], int] = {}
    for row in rows:  # several versions of one case waiting: the newest push covers them all
        key = (row.case_id, row.partner_id)
        latest[key] = max(latest.get(key, 0), row.case_version)
    for (case_id, partner_id), version in latest.items():
        enqueue(case_id, partner_id, version)
    return len(latest)


# -- push ----------------------------------------------------------------------------------------
@dataclass
class PushResult:
    written: int = 0
    unchanged: int = 0
    skipped: str = ""


#: how long one push holds a case (for one partner) before another may take it over
LEASE_SECONDS = 30


def push_case(store: Store, case_id: str, partner_id: str, version: int, endpoint: Any) -> PushResult:
    """Push a case to a partner; one push of a case to a partner at a time (a lease in its sync
    state), so two workers never both create the same resource at a partner without conditional
    create. A push that finds the case taken is retried later (``TransientError``)."""
    lease = _take_lease(store, case_id, partner_id)
    try:
        return _push_case(store, case_id, partner_id, version, endpoint)
    finally:
        _release_lease(store, case_id, partner_id, lease)


def _take_lease(store: Store, case_id: str, partner_id: str) -> str:
    import uuid

    token, stamp = uuid.uuid4().hex, now()
    key = and_(sync_state.c.case_id == case_id, sync_state.c.partner_id == partner_id)
    with store.engine.begin() as conn:
        if conn.execute(select(sync_state.c.case_id).where(key)).first() is None:
            _set_state(conn, case_id, partner_id, status="pending")
        taken = conn.execute(update(sync_state).where(
            key, or_(sync_state.c.lease_until.is_(None), sync_state.c.lease_until < stamp))
            .values(lease=token, lease_until=stamp + dt.timedelta(seconds=LEASE_SECONDS))).rowcount
    if not taken:
        raise CaseBusy("another push of this case to this partner is under way", retry_after=2.0)
    return token


def _release_lease(store: Store, case_id: str, partner_id: str, token: str) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(sync_state).where(sync_state.c.case_id == case_id, sync_state.c.partner_id == partner_id,
                                              sync_state.c.lease == token).values(lease=None, lease_until=None))


def _push_case(store: Store, case_id: str, partner_id: str, version: int, endpoint: Any) -> PushResult:
    partner = _partner(store, partner_id)
    stored = _current_case(store, case_id)
    state = _state(store, case_id, partner_id)
    if state is not None and state.synced_version >= stored.version and state.status == "synced":
        return PushResult(skipped="already synced")
    if not shared_with(partner, stored.organization_id, stored.data) or stored.deleted:
        _update_state(store, case_id, partner_id, status="synced", synced_version=stored.version)
        return PushResult(skipped="not shared")
    case = shareable(schemas.load_case(stored.data))
    if partner.route is None:  # not yet read the partner's /metadata: do it now
        from service.partners import check_capabilities

        check_capabilities(store, partner_id, endpoint)
        partner = _partner(store, partner_id)
    writable = set(partner.route.get("writable") or ())
    if not writable:
        _update_state(store, case_id, partner_id, status="synced", synced_version=stored.version)
        return PushResult(skipped="pull only: the partner takes no writes")
    if partner.kind == "payer" and not _member_matched(store, partner, case, endpoint):
        return PushResult(skipped="member not matched")
    result = PushResult()
    resources = _ordered(case_resources(case))
    known = _ledger_rows(store, partner_id, [r["id"] for r in resources])
    by_local: dict[tuple[str, str], Any] = {(r.resource_type, r.local_id): r for r in known}
    try:
        to_write = _to_write(store, partner, case, resources, writable, endpoint, by_local)
        method = partner.route.get("write_method") or "single"
        if method in ("transaction", "batch"):
            _push_bundled(store, partner, case_id, to_write, endpoint, by_local, method, result)
        else:
            for resource in to_write:
                _push_one(store, partner, case_id, resource, endpoint, by_local, result)
    except ConflictRecorded as conflict:
        _update_state(store, case_id, partner_id, status="conflict", last_error=str(conflict))
        return result
    _update_state(store, case_id, partner_id, status="synced", synced_version=stored.version, last_error=None)
    with store.engine.begin() as conn:
        conn.execute(update(partners).where(partners.c.id == partner_id).values(last_success_at=now()))
    return result


def _to_write(store: Store, partner: Any, case: Case, resources: list[dict], writable: set[str], endpoint: Any,
              by_local: dict) -> list[dict]:
    """The case's resources the partner takes, in write order; a client the partner does not take
    from us (or a payer's member) is found there instead, and referred to."""
    out = []
    for resource in resources:
        rtype = resource["resourceType"]
        if rtype == "Patient" and rtype not in writable:
            _resolve_patient(store, partner, case, resource, endpoint, by_local)
            continue
        if rtype == "Patient" and partner.kind == "payer":
            try:  # the payer has the member ($member-match found them): refer to theirs, write no copy
                _resolve_patient(store, partner, case, resource, endpoint, by_local)
                continue
            except PermanentError:
                pass  # not findable by identifier there: send ours
        if rtype in writable:
            out.append(resource)
    return out


def _push_one(store: Store, partner: Any, case_id: str, resource: dict, endpoint: Any, by_local: dict,
              result: PushResult) -> None:
    """One resource in a request of its own."""
    if _push_resource(store, partner, case_id, resource, endpoint, by_local) is None:
        result.unchanged += 1
    else:
        result.written += 1


def _ordered(resources: Iterable[dict]) -> list[dict]:
    rank = {t: i for i, t in enumerate(WRITE_ORDER)}
    return sorted(resources, key=lambda r: rank.get(r["resourceType"], len(rank)))


def outgoing(resource: dict, by_local: dict, pending: Optional[dict] = None) -> Optional[dict]:
    """The resource as the partner gets it: references to our resources turned into the partner's
    ids, references to what the partner does not hold reduced to their display, our sync identifier
    added. ``pending``: ``(type, id)`` of resources written in the same transaction, each with the
    placeholder it is referred to by there. ``_MissingTarget`` when something it cannot do without
    (its subject) is not at the partner yet."""
    local_id = resource["id"]
    body = _rewrite(resource, by_local, pending or {})
    if body is None:
        return None
    body = {k: v for k, v in body.items() if k != "id"}
    identifiers = [i for i in body.get("identifier", ()) if i.get("system") != SYNC_SYSTEM]
    body["identifier"] = identifiers + [{"system": SYNC_SYSTEM, "value": local_id}]
    return body


_REQUIRED_REFERENCES = {"subject", "for", "focus", "beneficiary"}


def _rewrite(value: Any, by_local: dict, pending: dict, key: str = "") -> Any:
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and "/" in ref and not ref.startswith("#"):
            rtype, _, rid = ref.partition("/")
            row = by_local.get((rtype, rid))
            if row is not None:
                return {**value, "reference": f"{rtype}/{row.remote_id}"}
            if (rtype, rid) in pending:
                return {**value, "reference": pending[(rtype, rid)]}
            if key in _REQUIRED_REFERENCES:
                raise _MissingTarget(ref)
            rest = {k: v for k, v in value.items() if k != "reference"}
            return rest or _DROP
        out = {}
        for k, v in value.items():
            new = _rewrite(v, by_local, pending, k)
            if new is not _DROP:
                out[k] = new
        if "url" in value and _has_value(value) and not (_has_value(out) or "extension" in out):
            return _DROP  # an extension whose value was a reference the partner cannot resolve
        return out if out or not value else _DROP
    if isinstance(value, list):
        items = [_rewrite(v, by_local, pending, key) for v in value]
        items = [i for i in items if i is not _DROP]
        return items if items or not value else _DROP
    return value


_DROP = object()


def _has_value(element: dict) -> bool:
    return any(k.startswith("value") and k[5:6].isupper() for k in element)


class _MissingTarget(Exception):
    pass


def body_hash(body: dict) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _push_resource(store: Store, partner: Any, case_id: str, resource: dict, endpoint: Any,
                   by_local: dict) -> Optional[Any]:
    rtype, local_id = resource["resourceType"], resource["id"]
    body = _body(resource, by_local)
    digest = body_hash(body)
    row = by_local.get((rtype, local_id))
    if row is not None and row.sent_hash == digest:
        return None
    conditional = rtype in set((partner.route or {}).get("conditional_create") or ())
    if row is None and not conditional:  # no If-None-Exist there: look before creating
        row = _adopt(store, partner.id, case_id, rtype, local_id, endpoint)
        if row is not None:
            by_local[(rtype, local_id)] = row
    if row is None:
        condition = f"identifier={SYNC_SYSTEM}|{local_id}" if conditional else None
        written = endpoint.create(body, if_none_exist=condition)
        if conditional and _differs(written.resource, body):  # it was there already (an earlier lost answer)
            # an earlier write of ours: a pull that reads it meanwhile must not take it for the partner's
            row = _save_ledger(store, partner.id, case_id, rtype, local_id, written.id, written.version_id, None,
                               None, ours=True)
            written = _update_remote(store, partner, case_id, rtype, local_id, row, body, endpoint)
    else:
        written = _update_remote(store, partner, case_id, rtype, local_id, row, body, endpoint)
    saved = _save_ledger(store, partner.id, case_id, rtype, local_id, written.id, written.version_id, digest, body,
                         ours=True)
    by_local[(rtype, local_id)] = saved
    return saved


def _update_remote(store: Store, partner: Any, case_id: str, rtype: str, local_id: str, row: Any, body: dict,
                   endpoint: Any) -> Any:
    sending = {**body, "id": row.remote_id}
    _note_attempt(store, partner.id, rtype, local_id, body)
    try:
        return endpoint.update(sending, if_match=_etag(row.remote_version))
    except VersionConflict:
        theirs = endpoint.read(rtype, row.remote_id)
        # the base is what we last wrote there: a write whose answer was lost counts; adopted with
        # nothing known of what we sent, their copy is the base and ours wins
        base = _our_write(row, theirs.resource) or row.sent or theirs.resource
        merged, both = three_way(base, sending, theirs.resource)
        if both:
            _record_conflict(store, partner.id, case_id, rtype, local_id, both, sending, theirs.resource)
            raise ConflictRecorded(f"{rtype} {local_id}: both sides changed {', '.join(both)}") from None
        return endpoint.update({**merged, "id": row.remote_id}, if_match=theirs.etag)


def _body(resource: dict, by_local: dict, pending: Optional[dict] = None) -> dict:
    try:
        return outgoing(resource, by_local, pending)
    except _MissingTarget as missing:
        raise PermanentError(422, None, f"{resource['resourceType']} refers to {missing} which is not at the "
                                        "partner") from None


def _key(resource: dict) -> tuple[str, str]:
    return resource["resourceType"], resource["id"]


# -- push in bundles -------------------------------------------------------------------------------
def _push_bundled(store: Store, partner: Any, case_id: str, resources: list[dict], endpoint: Any, by_local: dict,
                  kind: str, result: PushResult) -> None:
    """Write what changed in one transaction, or in batch rounds (each round what can be written with
    the references known so far: a batch entry cannot refer to another); a partner that caps its
    bundles (``max_bundle_entries`` in its route) gets several, each after what it refers to.

    The guarantees are those of one request at a time: creates are conditional or looked for first,
    updates carry If-Match and are noted before they go. What a bundle does not settle (a version
    conflict, a create that found our resource there already, a bundle the partner refuses) is
    written one request at a time, with its merge and conflicts."""
    conditional = set((partner.route or {}).get("conditional_create") or ())
    for resource in resources:
        key = _key(resource)
        row = by_local.get(key)
        if row is None and key[0] not in conditional:  # no If-None-Exist there: look before creating
            row = _adopt(store, partner.id, case_id, key[0], key[1], endpoint)
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
        for resource in _send_bundle(store, partner, case_id, sending, endpoint, by_local, kind, conditional, result):
            _push_one(store, partner, case_id, resource, endpoint, by_local, result)
    for resource in waiting:
        _push_one(store, partner, case_id, resource, endpoint, by_local, result)


def _unanswered(row: Any) -> bool:
    """Whether the last update sent was never answered (its answer lost, or the push failed): the
    last body noted is not what the ledger says the partner holds."""
    last = (row.attempts or [None])[-1]
    return last is not None and (row.sent is None or row.sent.keys() != last.keys() or _differs(row.sent, last))


def _recognise(store: Store, partner_id: str, case_id: str, key: tuple[str, str], row: Any, endpoint: Any) -> Any:
    """Read the partner's copy of a resource whose last update went unanswered: when it is a write
    of ours (the lost one, say), the ledger takes its version, so the bundle's If-Match is current and
    nothing already there is sent again. Otherwise the row stays, and a stale If-Match is merged."""
    try:
        theirs = endpoint.read(key[0], row.remote_id)
    except PermanentError:
        return row  # gone, or not readable: the write finds out
    ours = _our_write(row, theirs.resource)
    if ours is None or not theirs.version_id:
        return row
    _save_ledger(store, partner_id, case_id, key[0], key[1], row.remote_id, theirs.version_id, body_hash(ours), ours,
                 ours=True)
    _note_attempt(store, partner_id, key[0], key[1], ours)  # settled: the last body noted is what it holds
    return _ledger_row(store, partner_id, key)


def _changed(resources: list[dict], by_local: dict, result: PushResult) -> list[dict]:
    """The resources whose body is not what the partner last got from us (every new one among them);
    the others are counted unchanged."""
    pending = {_key(r): bundles.placeholder(*_key(r)) for r in resources if _key(r) not in by_local}
    changed = []
    for resource in resources:
        row = by_local.get(_key(resource))
        if row is not None and row.sent_hash == body_hash(_body(resource, by_local, pending)):
            result.unchanged += 1
        else:
            changed.append(resource)
    return changed


def _send_bundle(store: Store, partner: Any, case_id: str, resources: list[dict], endpoint: Any, by_local: dict,
                 kind: str, conditional: set[str], result: PushResult) -> list[dict]:
    """One transaction or batch of ``resources``; the ledger keeps what it wrote. Returns what is left
    to write one request at a time. A refused entry fails the push as its own request would have
    (``TransientError`` for 429 and 5xx, else ``PermanentError``), after what the others wrote is kept."""
    pending = {_key(r): bundles.placeholder(*_key(r)) for r in resources if _key(r) not in by_local}
    writes = []
    noted: dict = {}  # what each update's ledger row remembered before this bundle
    for resource in resources:
        rtype, local_id = _key(resource)
        body = _body(resource, by_local, pending)
        row = by_local.get((rtype, local_id))
        if row is None:
            condition = f"identifier={SYNC_SYSTEM}|{local_id}" if rtype in conditional else None
            writes.append(bundles.Write(rtype, local_id, body, if_none_exist=condition))
        else:
            noted[(rtype, local_id)] = _note_attempt(store, partner.id, rtype, local_id, body)
            writes.append(bundles.Write(rtype, local_id, body, row.remote_id, if_match=_etag(row.remote_version)))
    try:
        send = endpoint.transaction if kind == "transaction" else endpoint.batch
        response = send(bundles.bundle(kind, writes))
    except AmbiguousWrite:
        raise  # it may have gone through: the bodies stay noted
    except TransientError:
        _withdraw_attempts(store, partner.id, noted)  # turned away: nothing was written
        raise
    except PermanentError as refused:  # a stale If-Match, or the bundle itself refused: nothing was written
        _withdraw_attempts(store, partner.id, noted)
        level = logging.INFO if isinstance(refused, VersionConflict) else logging.WARNING
        log.log(level, "partner %s refused a %s (%s, HTTP %s): writing one request at a time", partner.id, kind,
                type(refused).__name__, refused.status)
        return resources
    answers = bundles.answers(kind, response, writes)
    _withdraw_attempts(store, partner.id, {w.key: noted[w.key] for w, a in zip(writes, answers)
                                           if not a.ok and w.key in noted})  # refused entries wrote nothing
    placed = dict(by_local)  # with the ids the partner gave what it created: the bodies it now holds
    for write, answer in zip(writes, answers):
        if answer.ok and write.creates:
            if answer.remote_id:
                placed[write.key] = SimpleNamespace(remote_id=answer.remote_id)
            else:  # created, but the answer does not say under which id: find it by our identifier
                row = _adopt(store, partner.id, case_id, write.rtype, write.local_id, endpoint)
                if row is not None:
                    by_local[write.key] = placed[write.key] = row
    again: list[dict] = []
    failures: list[Exception] = []
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
        body = _body(resource, placed)
        if write.if_none_exist and answer.status == 200 and (answer.resource is None
                                                             or _differs(answer.resource, body)):
            # found there already (an earlier answer was lost), but not as we send it now: an update;
            # the copy there is a write of ours, not the partner's change, should a pull read it meanwhile
            by_local[write.key] = _save_ledger(store, partner.id, case_id, write.rtype, write.local_id,
                                               answer.remote_id, answer.version, None, None, ours=True)
            again.append(resource)
            continue
        by_local[write.key] = _save_ledger(store, partner.id, case_id, write.rtype, write.local_id, answer.remote_id,
                                           answer.version, body_hash(body), body, ours=True)
        result.written += 1
    if failures:
        raise next((f for f in failures if isinstance(f, TransientError)), failures[0])
    return again


#: how many attempted bodies the ledger keeps per resource (a lost answer leaves its write unknown)
ATTEMPTS_KEPT = 5


def _note_attempt(store: Store, partner_id: str, rtype: str, local_id: str, body: dict) -> Optional[list]:
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


def _withdraw_attempts(store: Store, partner_id: str, before: dict) -> None:
    """A bundle that certainly did not go through (turned away, refused whole): the bodies noted for
    it are forgotten again, so a later push does not take them for unanswered writes."""
    if not before:
        return
    with store.engine.begin() as conn:
        for (rtype, local_id), attempts in before.items():
            conn.execute(update(ledger).where(ledger.c.partner_id == partner_id, ledger.c.resource_type == rtype,
                                              ledger.c.local_id == local_id).values(attempts=attempts))


def _our_write(row: Any, resource: dict) -> Optional[dict]:
    """The body we sent that a copy read from the partner is (known, or whose answer was lost), or
    ``None`` when the copy says something we never sent."""
    candidates = ([row.sent] if row.sent is not None else []) + list(reversed(row.attempts or ()))
    for body in candidates:
        if not _differs(resource, body):
            # as the partner holds it: a placeholder sent in a transaction is the id it was given
            return {k: resource[k] if k in resource and k not in SERVER_ELEMENTS else v for k, v in body.items()}
    version = (resource.get("meta") or {}).get("versionId")
    if version and version in (row.written_versions or ()):
        return row.sent or resource
    return None


def _differs(stored: dict, body: dict) -> bool:
    """Whether the partner's copy says something other than ``body`` (ignoring what it adds itself)."""
    return any(not _same(stored.get(k), v) for k, v in body.items() if k not in SERVER_ELEMENTS) if stored else False


def _same(theirs: Any, ours: Any) -> bool:
    """Equal, but for a reference we sent as a transaction's placeholder (``urn:uuid``): any
    reference the partner put in its place matches it."""
    if theirs == ours:
        return True
    if isinstance(ours, dict):
        if not isinstance(theirs, dict) or theirs.keys() != ours.keys():
            return False
        if bundles.is_placeholder(ours.get("reference")) and not isinstance(theirs.get("reference"), str):
            return False
        return all(_same(theirs[k], v) for k, v in ours.items()
                   if not (k == "reference" and bundles.is_placeholder(v)))
    if isinstance(ours, list):
        return isinstance(theirs, list) and len(theirs) == len(ours) and all(map(_same, theirs, ours))
    return False


def three_way(base: dict, ours: dict, theirs: dict) -> tuple[dict, list[str]]:
    """Element by element: ours where only we changed it, theirs where only they did (or where we do
    not send it at all); the element names both changed differently are returned as conflicts."""
    merged: dict = {}
    both: list[str] = []
    for key in sorted((ours.keys() | theirs.keys()) - {"id"}):
        b, o, t = base.get(key), ours.get(key), theirs.get(key)
        if key in DERIVED_ELEMENTS or key == "meta":
            if o is not None:
                merged[key] = o
        elif key not in ours and key not in base:
            merged[key] = t  # an element only the partner has: theirs to keep
        elif o == t or t == b:
            if o is not None:
                merged[key] = o
        elif o == b:
            if t is not None:
                merged[key] = t
        else:
            both.append(key)
    return merged, both


def _adopt(store: Store, partner_id: str, case_id: str, rtype: str, local_id: str, endpoint: Any) -> Optional[Any]:
    """Our resource already at the partner (a create whose answer was lost, or sent before the
    ledger was): found by our sync identifier and taken into the ledger."""
    for found in endpoint.search(rtype, {"identifier": f"{SYNC_SYSTEM}|{local_id}"}):
        version = (found.get("meta") or {}).get("versionId")
        return _save_ledger(store, partner_id, case_id, rtype, local_id, found["id"], version, None, None)
    return None


def _resolve_patient(store: Store, partner: Any, case: Case, resource: dict, endpoint: Any, by_local: dict) -> None:
    """Where the partner does not take Patient writes, find the client there by an identifier."""
    key = ("Patient", resource["id"])
    if key in by_local:
        return
    candidates = [f"{i.system}|{i.value}" for i in case.client.identifiers]
    state = _state(store, case.id, partner.id)
    if state is not None and state.member_id:
        candidates.insert(0, state.member_id)
    for token in candidates:
        for found in endpoint.search("Patient", {"identifier": token}):
            by_local[key] = _save_ledger(store, partner.id, case.id, "Patient", resource["id"], found["id"],
                                         (found.get("meta") or {}).get("versionId"), None, None)
            return
    raise PermanentError(422, None, "the client was not found at the partner by any of their identifiers")


def _member_matched(store: Store, partner: Any, case: Case, endpoint: Any) -> bool:
    """A payer's member, matched with Da Vinci $member-match before anything is sent."""
    state = _state(store, case.id, partner.id)
    if state is not None and state.member_id:
        return True
    patient = next(r for r in case_resources(case) if r["resourceType"] == "Patient")
    member_ids = [i for i in case.client.identifiers if i.kind == "member_id"]
    coverage: dict = {"resourceType": "Coverage", "id": "coverage", "status": "active",
                      "beneficiary": {"reference": f"Patient/{patient['id']}"},
                      "payor": [{"display": partner.name}]}
    if member_ids:
        coverage["identifier"] = [{"system": member_ids[0].system, "value": member_ids[0].value}]
    parameters = {"resourceType": "Parameters", "parameter": [
        {"name": "MemberPatient", "resource": {k: v for k, v in patient.items() if k != "text"}},
        {"name": "CoverageToMatch", "resource": coverage}]}
    try:
        answer = endpoint.operation("Patient", "$member-match", parameters)
    except PermanentError as error:
        if error.status == 422:
            _update_state(store, case.id, partner.id, status="unmatched",
                          last_error="no single member matched at the payer; nothing was sent")
            return False
        raise
    for parameter in answer.get("parameter", ()):
        if parameter.get("name") == "MemberIdentifier" and parameter.get("valueIdentifier"):
            ident = parameter["valueIdentifier"]
            _update_state(store, case.id, partner.id, member_id=f"{ident.get('system', '')}|{ident['value']}")
            return True
    _update_state(store, case.id, partner.id, status="unmatched", last_error="the payer's answer named no member")
    return False


# -- ledger, state, conflicts, dead letters ------------------------------------------------------
def _ledger_row(store: Store, partner_id: str, key: tuple[str, str]) -> Any:
    with store.engine.connect() as conn:
        return conn.execute(select(ledger).where(ledger.c.partner_id == partner_id, ledger.c.resource_type == key[0],
                                                 ledger.c.local_id == key[1])).first()


def _ledger_rows(store: Store, partner_id: str, local_ids: list[str]) -> list[Any]:
    with store.engine.connect() as conn:
        return conn.execute(select(ledger).where(ledger.c.partner_id == partner_id,
                                                 ledger.c.local_id.in_(local_ids))).all()


#: how many of the partner's version ids of our own writes the ledger remembers per resource
WRITTEN_VERSIONS_KEPT = 50


def _save_ledger(store: Store, partner_id: str, case_id: str, rtype: str, local_id: str, remote_id: str,
                 remote_version: Optional[str], digest: Optional[str], body: Optional[dict],
                 ours: bool = False) -> Any:
    """Record what the partner holds; with ``ours``, the version is one we wrote (so a pull that reads
    it back, even after we wrote again, knows it for an echo and not for the partner's change)."""
    values = dict(remote_id=remote_id, remote_version=remote_version, sent_hash=digest, sent=body, case_id=case_id,
                  updated_at=now())
    key = and_(ledger.c.partner_id == partner_id, ledger.c.resource_type == rtype, ledger.c.local_id == local_id)
    with store.engine.begin() as conn:
        current = conn.execute(select(ledger.c.written_versions).where(key)).first()
        written = list((current.written_versions or []) if current is not None else [])
        if ours and remote_version and remote_version not in written:
            written = (written + [remote_version])[-WRITTEN_VERSIONS_KEPT:]
        values["written_versions"] = written
        if current is None:
            conn.execute(insert(ledger).values(partner_id=partner_id, resource_type=rtype, local_id=local_id, **values))
        else:
            conn.execute(update(ledger).where(key).values(**values))
        return conn.execute(select(ledger).where(key)).first()


def _etag(version: Optional[str]) -> Optional[str]:
    return f'W/"{version}"' if version else None


def _state(store: Store, case_id: str, partner_id: str) -> Optional[Any]:
    with store.engine.connect() as conn:
        return conn.execute(select(sync_state).where(sync_state.c.case_id == case_id,
                                                     sync_state.c.partner_id == partner_id)).first()


def _set_state(conn: Connection, case_id: str, partner_id: str, **values: Any) -> None:
    values["updated_at"] = now()
    key = and_(sync_state.c.case_id == case_id, sync_state.c.partner_id == partner_id)
    if conn.execute(update(sync_state).where(key).values(**values)).rowcount == 0:
        conn.execute(insert(sync_state).values(case_id=case_id, partner_id=partner_id,
                                               **{"status": "pending", **values}))


def _update_state(store: Store, case_id: str, partner_id: str, **values: Any) -> None:
    with store.engine.begin() as conn:
        _set_state(conn, case_id, partner_id, **values)


def _record_conflict(store: Store, partner_id: str, case_id: str, rtype: str, local_id: str, fields: list[str],
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
            _set_state(conn, case_id, partner_id, status="failed", last_error=str(error))
    return letter


def _partner(store: Store, partner_id: str) -> Any:
    from service.partners import partner_row

    return partner_row(store, partner_id)


def _current_case(store: Store, case_id: str) -> StoredCase:
    from service.store import cases

    with store.engine.connect() as conn:
        row = conn.execute(select(cases.c.organization_id).where(cases.c.id == case_id)).first()
    if row is None:
        raise NotFound(f"no case {case_id}")
    return store.get_case(row.organization_id, case_id)


__all__ = ["on_case_saved", "dispatch", "push_case", "three_way", "outgoing", "record_failure", "SYNC_SYSTEM",
           "AmbiguousWrite", "TransientError", "dt"]


# -- pull ----------------------------------------------------------------------------------------
#: what is pulled from a partner, in this order (a referral before the Tasks that follow it)
PULL_TYPES = ("ServiceRequest", "Task", "CarePlan", "Goal")


@dataclass
class PullResult:
    seen: int = 0
    applied: int = 0
    new_cases: int = 0
    watermark: Optional[str] = None


def pull_partner(store: Store, partner_id: str, endpoint: Any) -> PullResult:
    """Everything the partner changed since the watermark, applied; the watermark moves only when
    the whole pull went through, so a failed pull is simply done again."""
    partner = _partner(store, partner_id)
    readable = set((partner.route or {}).get("readable") or PULL_TYPES)
    result = PullResult(watermark=partner.watermark)
    newest = partner.watermark
    for rtype in PULL_TYPES:
        if rtype not in readable:
            continue
        params = {"_lastUpdated": f"gt{partner.watermark}"} if partner.watermark else {}
        for resource in endpoint.search(rtype, params):
            result.seen += 1
            stamp = (resource.get("meta") or {}).get("lastUpdated")
            if stamp and (newest is None or stamp > newest):
                newest = stamp
            outcome = apply_remote(store, partner, resource, endpoint)
            result.applied += outcome in ("updated", "created")
            result.new_cases += outcome == "created"
    with store.engine.begin() as conn:
        conn.execute(update(partners).where(partners.c.id == partner_id)
                     .values(watermark=newest, last_pull_at=now(), last_success_at=now()))
    result.watermark = newest
    return result


def notify(store: Store, partner_id: str, references: list[str], endpoint: Any) -> int:
    """A FHIR Subscription rest-hook notification (id-only): pull just the resources it names."""
    partner = _partner(store, partner_id)
    applied = 0
    for reference in references:
        rtype, rid = reference.split("/", 1)
        try:
            found = endpoint.read(rtype, rid)
        except PermanentError as error:
            if error.status in (404, 410):
                continue
            raise
        applied += apply_remote(store, partner, found.resource, endpoint) in ("updated", "created")
    return applied


def notified_references(payload: dict) -> list[str]:
    """``Type/id`` of every resource a notification names: entry fullUrls and request urls of a
    history/subscription-notification Bundle, and SubscriptionStatus ``notificationEvent.focus``."""
    found: list[str] = []

    def add(url: Optional[str]) -> None:
        if not url:
            return
        parts = url.split("/_history/")[0].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2][:1].isupper() and parts[-2] not in ("SubscriptionStatus", "Parameters"):
            ref = f"{parts[-2]}/{parts[-1]}"
            if ref not in found:
                found.append(ref)

    def walk_status(resource: dict) -> None:
        for event in resource.get("notificationEvent", ()):
            add((event.get("focus") or {}).get("reference"))
        for parameter in resource.get("parameter", ()):
            if parameter.get("name") == "notification-event":
                for part in parameter.get("part", ()):
                    if part.get("name") == "focus":
                        add((part.get("valueReference") or {}).get("reference"))

    if payload.get("resourceType") == "Bundle":
        for entry in payload.get("entry", ()):
            resource = entry.get("resource") or {}
            if resource.get("resourceType") in ("SubscriptionStatus", "Parameters"):
                walk_status(resource)
            else:
                add(entry.get("fullUrl") or (entry.get("request") or {}).get("url"))
    else:
        walk_status(payload)
    return found


def apply_remote(store: Store, partner: Any, resource: dict, endpoint: Any) -> str:
    """One resource read from a partner, applied to the case records: 'updated', 'created',
    'unchanged' or 'ignored'."""
    rtype, remote_id = resource.get("resourceType"), resource.get("id")
    row = _ledger_by_remote(store, partner.id, rtype, remote_id)
    if row is None:
        ours = next((i.get("value") for i in resource.get("identifier", ()) if i.get("system") == SYNC_SYSTEM), None)
        # ours, created by a write whose answer was lost: take it into the ledger, nothing to apply
        # (another casebridge's resource carries the same identifier system, but no case of ours)
        case_id = _case_of_local(store, rtype, ours) if ours else None
        if case_id:
            _save_ledger(store, partner.id, case_id, rtype, ours, remote_id,
                         (resource.get("meta") or {}).get("versionId"), None, None, ours=True)
            return "unchanged"
    if row is None:
        if rtype == "ServiceRequest":
            return _inbound_referral(store, partner, resource, endpoint)
        if rtype == "Task":
            return _task_for_our_referral(store, partner, resource)
        return "ignored"
    return _apply_known(store, partner, row, resource)


def _apply_known(store: Store, partner: Any, row: Any, resource: dict) -> str:
    from mappings import careplan as plan_map, goal as goal_map, task as task_map
    from mappings.export import CaseIds

    if _our_write(row, resource) is not None:
        # one of our own writes read back (the case may have moved on since): nothing the partner changed
        return "unchanged"
    stored = _current_case(store, row.case_id)
    case = schemas.load_case(stored.data)
    rtype = resource["resourceType"]
    changed = False
    if rtype == "Task":
        service_id = next((sid for sid, tid in CaseIds(case).tasks.items() if tid == row.local_id), None)
        service = case.service(service_id) if service_id else None
        status = task_map.status_from_fhir(resource)
        if service is not None and service.status != status:
            service.status = status
            changed = True
    elif rtype == "Goal":
        goal_id = next((gid for gid, fid in CaseIds(case).goals.items() if fid == row.local_id), None)
        goal = case.goal(goal_id) if goal_id else None
        if goal is not None:
            theirs = goal_map.from_fhir(resource, goal.id, lambda ref: None)
            for attr in ("status", "description", "target_date", "start", "achieved_date", "priority"):
                value = getattr(theirs, attr)
                if value is not None and value != getattr(goal, attr):
                    setattr(goal, attr, value)
                    changed = True
    elif rtype == "CarePlan":
        fields = plan_map.fields_from_fhir(resource)
        for attr in ("status", "opened", "closed", "title"):
            value = fields.get(attr)
            if value is not None and value != getattr(case, attr):
                setattr(case, attr, value)
                changed = True
    if not changed:
        return "unchanged"
    store.update_case(stored.organization_id, stored.id, stored.version, schemas.dump_case(case),
                      actor=f"partner:{partner.id}")
    return "updated"


def _inbound_referral(store: Store, partner: Any, request: dict, endpoint: Any) -> str:
    """A referral the partner sent: an intake case for the receiving organization (once)."""
    from mappings import fhir_input
    from mappings.importer import import_graph
    from service.domain import Organization

    if partner.kind != "ehr" or (request.get("status") not in (None, "active", "draft")):
        return "ignored"
    resources = [request]
    subject = (request.get("subject") or {}).get("reference", "")
    if subject.startswith("Patient/"):
        resources.append(endpoint.read("Patient", subject.split("/", 1)[1]).resource)
    for task in endpoint.search("Task", {"focus": f"ServiceRequest/{request['id']}"}):
        resources.append(task)
    organization = partner.receiving_organization or (partner.organizations or ["unassigned"])[0]
    result = import_graph(fhir_input.ResourceGraph(fhir_input.parse(
        {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]})),
        Organization(id=organization))
    if not result.cases:
        return "ignored"
    case = result.cases[0]
    case.status = "intake"
    claim = f"partner:{partner.id}:ServiceRequest/{request['id']}"
    if store.claimed_case(organization, claim) is None and _case_exists(store, case.id):
        # another referral for the same client made a case with this id already: one case per referral
        case.id = f"{case.id[:40]}-{hashlib.sha256(claim.encode()).hexdigest()[:12]}"
    stored = store.add_case(organization, schemas.dump_case(case), actor=f"partner:{partner.id}", claim=claim)
    for resource in case_resources(case):
        if resource["resourceType"] in ("ServiceRequest", "Patient", "Task"):
            remote = next((r for r in resources if r["resourceType"] == resource["resourceType"]
                           and r.get("id") == resource["id"]), None)
            if remote is not None:
                _save_ledger(store, partner.id, stored.id, resource["resourceType"], resource["id"], remote["id"],
                             (remote.get("meta") or {}).get("versionId"), None, None)
    return "created" if stored.version == 1 else "unchanged"


def _task_for_our_referral(store: Store, partner: Any, task: dict) -> str:
    """A Task the partner made for a referral we sent: it carries the referral's status from now on."""
    from mappings.export import CaseIds

    focus = (task.get("focus") or {}).get("reference", "")
    if not focus.startswith("ServiceRequest/"):
        return "ignored"
    request_row = _ledger_by_remote(store, partner.id, "ServiceRequest", focus.split("/", 1)[1])
    if request_row is None:
        return "ignored"
    case = schemas.load_case(_current_case(store, request_row.case_id).data)
    service_id = next((sid for sid, rid in CaseIds(case).services.items() if rid == request_row.local_id), None)
    task_id = CaseIds(case).tasks.get(service_id) if service_id else None
    if task_id is None:
        return "ignored"
    _save_ledger(store, partner.id, case.id, "Task", task_id, task["id"], (task.get("meta") or {}).get("versionId"),
                 None, None)
    return _apply_known(store, partner, _ledger_by_remote(store, partner.id, "Task", task["id"]), task)


def _ledger_by_remote(store: Store, partner_id: str, rtype: Optional[str], remote_id: Optional[str]) -> Optional[Any]:
    if not rtype or not remote_id:
        return None
    with store.engine.connect() as conn:
        return conn.execute(select(ledger).where(ledger.c.partner_id == partner_id, ledger.c.resource_type == rtype,
                                                 ledger.c.remote_id == remote_id)).first()


def _case_exists(store: Store, case_id: str) -> bool:
    from service.store import cases

    with store.engine.connect() as conn:
        return conn.execute(select(cases.c.id).where(cases.c.id == case_id)).first() is not None


def _case_of_local(store: Store, rtype: str, local_id: str) -> Optional[str]:
    from service.store import fhir_resources

    with store.engine.connect() as conn:
        return conn.execute(select(fhir_resources.c.case_id).where(
            fhir_resources.c.resource_type == rtype, fhir_resources.c.resource_id == local_id)).scalar()


def partners_to_pull(store: Store, at: dt.datetime) -> list[str]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(partners.c.id, partners.c.last_pull_at, partners.c.pull_every_minutes)
                            .where(partners.c.active.is_(True), partners.c.direction != "push")).all()
    due = []
    for row in rows:
        last = row.last_pull_at
        if last is not None and last.tzinfo is None:
            last = last.replace(tzinfo=dt.timezone.utc)
        if last is None or at - last >= dt.timedelta(minutes=row.pull_every_minutes):
            due.append(row.id)
    return due
