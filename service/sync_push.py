"""The push of one case to one partner: the lease that lets one push at a time hold the case, what the
partner takes of it (its route; a client it does not take from us, or a payer's member, is found
there and referred to), and how it is written: bundled (``service.sync_bundled_writes``) or one
request per resource (``service.sync_single_writes``). The case's sync state ends ``synced``, or
``conflict`` when both sides changed an element.
"""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, NamedTuple, Optional

from sqlalchemy import bindparam, or_, update
from sqlalchemy.engine import Connection

from adapters.errors import PermanentError, TransientError
from mappings.export import case_resources
from service import schemas
from service.domain import Case, shareable
from service.partners import check_capabilities, partner_row
from service.store import Store, aware, now, write
from service.sync_bundled_writes import push_bundled
from service.sync_ledger import STATE_KEY, current_case, ledger_rows, save_ledger, set_state, state_of, update_state
from service.sync_outbox import shared_with
from service.sync_outgoing import ordered
from service.sync_single_writes import ConflictRecorded, PushResult, push_one
from service.sync_store import partners, sync_state

#: how long one push holds a case (for one partner) before another may take it over
LEASE_SECONDS = 30
#: seconds a push that finds the case taken waits before it tries again
BUSY_RETRY_AFTER = 2.0


class CaseBusy(TransientError):
    """Another push holds the case for this partner: try again shortly (this is no failure)."""


class Lease(NamedTuple):
    """A push's hold on a case (for one partner), and until when it lasts."""
    token: str
    until: dt.datetime


def push_case(store: Store, case_id: str, partner_id: str, version: int, endpoint: Any,
              lease: Optional[Lease] = None) -> PushResult:
    """Push a case to a partner; one push of a case to a partner at a time (a lease in its sync
    state), so two workers never both create the same resource at a partner without conditional
    create. A push that finds the case taken is retried later (``CaseBusy``, a ``TransientError``).
    ``lease``: one already taken for it (``take_leases``); renewed first when half of it is gone."""
    if lease is None or lease.until - now() < dt.timedelta(seconds=LEASE_SECONDS / 2):
        token = _take_lease(store, case_id, partner_id, renew=lease.token if lease is not None else None)
    else:
        token = lease.token
    released = False
    try:
        result, released = _push_case(store, case_id, partner_id, version, endpoint, token)
        return result
    finally:
        if not released:
            with store.engine.begin() as conn:
                _release_lease(conn, case_id, partner_id, token)


_TAKE_LEASE = update(sync_state).where(
    *STATE_KEY, or_(sync_state.c.lease_until.is_(None), sync_state.c.lease_until < bindparam("stamp"),
                    sync_state.c.lease == bindparam("renew"))) \
    .values(lease=bindparam("lease"), lease_until=bindparam("lease_until"))
_RELEASE_LEASE = update(sync_state).where(*STATE_KEY, sync_state.c.lease == bindparam("token")) \
    .values(lease=None, lease_until=None)
_PARTNER_SUCCESS = update(partners).where(partners.c.id == bindparam("key_partner")) \
    .values(last_success_at=bindparam("stamp"))


def take_leases(store: Store, partner_id: str, case_ids: list[str]) -> dict[str, Lease]:
    """Leases on several cases for the pushes of one task, in one write; a case another push holds
    (or with no sync state yet) is left out, for its own push to take or wait for."""
    token, stamp = uuid.uuid4().hex, now()
    until = stamp + dt.timedelta(seconds=LEASE_SECONDS)
    taken = {}
    with store.engine.begin() as conn:
        for case_id in case_ids:
            if write(conn, _TAKE_LEASE, {"key_case": case_id, "key_partner": partner_id, "lease": token,
                                         "lease_until": until, "stamp": stamp, "renew": None}):
                taken[case_id] = Lease(token, until)
    return taken


def _take_lease(store: Store, case_id: str, partner_id: str, renew: Optional[str] = None) -> str:
    """A lease on the case, or ``CaseBusy``; ``renew``: a lease of ours on it, to extend."""
    token, stamp = renew or uuid.uuid4().hex, now()
    key = {"key_case": case_id, "key_partner": partner_id}
    lease = dict(lease=token, lease_until=stamp + dt.timedelta(seconds=LEASE_SECONDS))
    with store.engine.begin() as conn:
        taken = write(conn, _TAKE_LEASE, {**key, **lease, "stamp": stamp, "renew": renew})
        if not taken and state_of(store, case_id, partner_id, conn) is None:
            set_state(conn, case_id, partner_id, status="pending", **lease)  # no state yet: nobody holds it
            taken = 1
    if not taken:
        raise CaseBusy("another push of this case to this partner is under way", retry_after=BUSY_RETRY_AFTER)
    return token


def _release_lease(conn: Connection, case_id: str, partner_id: str, token: str) -> None:
    write(conn, _RELEASE_LEASE, {"key_case": case_id, "key_partner": partner_id, "token": token})


def _push_case(store: Store, case_id: str, partner_id: str, version: int, endpoint: Any,
               lease: str) -> tuple[PushResult, bool]:
    """The push, under ``lease``; and whether its last write gave the lease back."""
    partner = partner_row(store, partner_id)
    stored = current_case(store, case_id)
    state = state_of(store, case_id, partner_id)
    if state is not None and state.synced_version >= stored.version and state.status == "synced":
        return PushResult(skipped="already synced"), False
    if not shared_with(partner, stored.organization_id, stored.data) or stored.deleted:
        update_state(store, case_id, partner_id, status="synced", synced_version=stored.version)
        return PushResult(skipped="not shared"), False
    case = shareable(schemas.load_case(stored.data))
    if partner.route is None:  # not yet read the partner's /metadata: do it now
        check_capabilities(store, partner_id, endpoint)
        partner = partner_row(store, partner_id)
    writable = set(partner.route.get("writable") or ())
    if not writable:
        update_state(store, case_id, partner_id, status="synced", synced_version=stored.version)
        return PushResult(skipped="pull only: the partner takes no writes"), False
    if partner.kind == "payer" and not _member_matched(store, partner, case, endpoint):
        return PushResult(skipped="member not matched"), False
    result = PushResult()
    resources = ordered(case_resources(case))
    known = ledger_rows(store, partner_id, [(r["resourceType"], r["id"]) for r in resources])
    by_local: dict[tuple[str, str], Any] = {(r.resource_type, r.local_id): r for r in known}

    def synced(conn: Connection) -> None:
        """The case synced, and the lease given back."""
        set_state(conn, case_id, partner_id, status="synced", synced_version=stored.version, last_error=None)
        _release_lease(conn, case_id, partner_id, lease)
        stamp = now()
        if _stale(partner.last_success_at, stamp):  # not a write of the partner's row for every case
            write(conn, _PARTNER_SUCCESS, {"key_partner": partner_id, "stamp": stamp})

    finished = False
    try:
        to_write = _to_write(store, partner, case, resources, writable, endpoint, by_local)
        method = partner.route.get("write_method") or "single"
        if method in ("transaction", "batch"):
            # when the last bundle settles everything, its ledger write also marks the case synced
            finished = push_bundled(store, partner, case_id, to_write, endpoint, by_local, method, result,
                                    then=synced)
        else:
            for resource in to_write:
                push_one(store, partner, case_id, resource, endpoint, by_local, result)
    except ConflictRecorded as conflict:
        update_state(store, case_id, partner_id, status="conflict", last_error=str(conflict))
        return result, False
    if not finished:
        with store.engine.begin() as conn:
            synced(conn)
    return result, True


def _stale(last_success_at: Any, stamp: dt.datetime) -> bool:
    """Whether the partner's last success is worth writing again: it is shown to the second."""
    return last_success_at is None or stamp - aware(last_success_at) >= dt.timedelta(seconds=1)


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


def _resolve_patient(store: Store, partner: Any, case: Case, resource: dict, endpoint: Any, by_local: dict) -> None:
    """Where the partner does not take Patient writes, find the client there by an identifier."""
    key = ("Patient", resource["id"])
    if key in by_local:
        return
    candidates = [f"{i.system}|{i.value}" for i in case.client.identifiers]
    state = state_of(store, case.id, partner.id)
    if state is not None and state.member_id:
        candidates.insert(0, state.member_id)
    for token in candidates:
        for found in endpoint.search("Patient", {"identifier": token}):
            by_local[key] = save_ledger(store, partner.id, case.id, "Patient", resource["id"], found["id"],
                                        (found.get("meta") or {}).get("versionId"), None, None)
            return
    raise PermanentError(422, None, "the client was not found at the partner by any of their identifiers")


def _member_matched(store: Store, partner: Any, case: Case, endpoint: Any) -> bool:
    """A payer's member, matched with Da Vinci $member-match before anything is sent."""
    state = state_of(store, case.id, partner.id)
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
            update_state(store, case.id, partner.id, status="unmatched",
                         last_error="no single member matched at the payer; nothing was sent")
            return False
        raise
    for parameter in answer.get("parameter", ()):
        if parameter.get("name") == "MemberIdentifier" and parameter.get("valueIdentifier"):
            ident = parameter["valueIdentifier"]
            update_state(store, case.id, partner.id, member_id=f"{ident.get('system', '')}|{ident['value']}")
            return True
    update_state(store, case.id, partner.id, status="unmatched", last_error="the payer's answer named no member")
    return False
