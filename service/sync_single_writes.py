"""Writing one of our resources at a partner in a request of its own, so that it lands exactly once:

- an unchanged resource (the ledger's hash of what was sent) is not written again;
- a resource with no ledger row is created conditionally (``If-None-Exist`` on our sync identifier)
  where the partner honours it, else first looked for there (``adopt``), so a POST whose answer was
  lost is found, not repeated;
- an update sends ``If-Match``; on a version conflict the partner's copy is merged three ways with
  what we last sent (``service.sync_merge``), or, when both sides changed an element, the conflict is
  recorded and nothing is overwritten (``ConflictRecorded``).

``PushResult`` counts what a push wrote; the bundled writes (``service.sync_bundled_writes``) fall
back on the writes here for what a bundle does not settle.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from adapters.errors import VersionConflict
from service.store import Store
from service.sync_ledger import note_attempt, record_conflict, save_ledger
from service.sync_merge import differs, our_write, three_way
from service.sync_outgoing import SYNC_SYSTEM, body_hash, body_to_send, weak_etag


@dataclass
class PushResult:
    written: int = 0
    unchanged: int = 0
    skipped: str = ""


class ConflictRecorded(Exception):
    """Both sides changed the same element: recorded for the case manager, nothing overwritten."""


def push_one(store: Store, partner: Any, case_id: str, resource: dict, endpoint: Any, by_local: dict,
             result: PushResult) -> None:
    """One resource in a request of its own."""
    if push_resource(store, partner, case_id, resource, endpoint, by_local) is None:
        result.unchanged += 1
    else:
        result.written += 1


def push_resource(store: Store, partner: Any, case_id: str, resource: dict, endpoint: Any,
                  by_local: dict) -> Optional[Any]:
    """Write the resource unless the partner has it as it is; the ledger row it now has (``None``:
    unchanged, nothing sent)."""
    rtype, local_id = resource["resourceType"], resource["id"]
    body = body_to_send(resource, by_local)
    digest = body_hash(body)
    row = by_local.get((rtype, local_id))
    if row is not None and row.sent_hash == digest:
        return None
    conditional = rtype in set((partner.route or {}).get("conditional_create") or ())
    if row is None and not conditional:  # no If-None-Exist there: look before creating
        row = adopt(store, partner.id, case_id, rtype, local_id, endpoint)
        if row is not None:
            by_local[(rtype, local_id)] = row
    if row is None:
        condition = f"identifier={SYNC_SYSTEM}|{local_id}" if conditional else None
        written = endpoint.create(body, if_none_exist=condition)
        if conditional and differs(written.resource, body):  # it was there already (an earlier lost answer)
            # an earlier write of ours: a pull that reads it meanwhile must not take it for the partner's
            row = save_ledger(store, partner.id, case_id, rtype, local_id, written.id, written.version_id, None,
                              None, ours=True)
            written = update_remote(store, partner, case_id, rtype, local_id, row, body, endpoint)
    else:
        written = update_remote(store, partner, case_id, rtype, local_id, row, body, endpoint)
    saved = save_ledger(store, partner.id, case_id, rtype, local_id, written.id, written.version_id, digest, body,
                        ours=True)
    by_local[(rtype, local_id)] = saved
    return saved


def update_remote(store: Store, partner: Any, case_id: str, rtype: str, local_id: str, row: Any, body: dict,
                  endpoint: Any) -> Any:
    """Update the partner's copy with ``If-Match``; on a version conflict, merge with theirs and try
    once more, or record the conflict (``ConflictRecorded``)."""
    sending = {**body, "id": row.remote_id}
    note_attempt(store, partner.id, rtype, local_id, body)
    try:
        return endpoint.update(sending, if_match=weak_etag(row.remote_version))
    except VersionConflict:
        theirs = endpoint.read(rtype, row.remote_id)
        # the base is what we last wrote there: a write whose answer was lost counts; adopted with
        # nothing known of what we sent, their copy is the base and ours wins
        base = our_write(row, theirs.resource) or row.sent or theirs.resource
        merged, both = three_way(base, sending, theirs.resource)
        if both:
            record_conflict(store, partner.id, case_id, rtype, local_id, both, sending, theirs.resource)
            raise ConflictRecorded(f"{rtype} {local_id}: both sides changed {', '.join(both)}") from None
        return endpoint.update({**merged, "id": row.remote_id}, if_match=theirs.etag)


def adopt(store: Store, partner_id: str, case_id: str, rtype: str, local_id: str, endpoint: Any) -> Optional[Any]:
    """Our resource already at the partner (a create whose answer was lost, or sent before the
    ledger was): found by our sync identifier and taken into the ledger."""
    for found in endpoint.search(rtype, {"identifier": f"{SYNC_SYSTEM}|{local_id}"}):
        version = (found.get("meta") or {}).get("versionId")
        return save_ledger(store, partner_id, case_id, rtype, local_id, found["id"], version, None, None)
    return None
