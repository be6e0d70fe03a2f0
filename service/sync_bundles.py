"""The Bundles a push writes with: a transaction (all or nothing, one request for a case's changes)
or a batch (each entry succeeds or fails alone), built from the resources to write and read back
into what the partner made of each.

- A resource the partner does not have yet is a ``POST`` whose ``fullUrl`` is a ``urn:uuid``
  placeholder; the other entries of a transaction refer to it by that placeholder and the partner
  puts in the id it gives it. The placeholder is derived from the resource's type and our id, so the
  same resource always has the same one (a body noted before a lost answer can be recognised later).
- A resource the partner has is a ``PUT`` at its id, with ``ifMatch`` the version we last knew.
- A batch cannot refer from one entry to another, so a batch is sent in rounds; a partner that caps
  the entries of a bundle gets several. ``next_bundle`` picks what goes next.

No storage and no partner calls here: ``service.sync_bundled_writes`` decides what to send, sends it
and keeps the ledger.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Optional

from adapters.errors import NotFound, NotSupported, PartnerError, PermanentError, TransientError
from adapters.fhir_rest import etag_version, parse_location

#: what a placeholder reference starts with
PLACEHOLDER = "urn:uuid:"
_PLACEHOLDERS = uuid.UUID("5d0f6c62-8f5e-4a57-9b1e-2f3c9c1de0a4")  # the namespace our placeholders are made in

Key = tuple[str, str]  # (resource type, our id)


@lru_cache(maxsize=4096)  # a push asks for each new resource's several times
def placeholder(rtype: str, local_id: str) -> str:
    """The ``urn:uuid`` a new resource goes by inside a Bundle (the same for the same resource)."""
    return f"{PLACEHOLDER}{uuid.uuid5(_PLACEHOLDERS, f'{rtype}/{local_id}')}"


def is_placeholder(reference: Any) -> bool:
    return isinstance(reference, str) and reference.startswith(PLACEHOLDER)


def references(resource: Any) -> set[Key]:
    """``(type, id)`` of every literal ``Type/id`` reference in a resource (ours, before rewriting)."""
    found: set[Key] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            ref = value.get("reference")
            if isinstance(ref, str) and "/" in ref and not ref.startswith("#") and ":" not in ref:
                rtype, _, rid = ref.partition("/")
                found.add((rtype, rid))
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(resource)
    return found


def waiting_on(resource: dict, new: set[Key]) -> set[Key]:
    """The resources among ``new`` (not at the partner yet) that ``resource`` refers to."""
    return (references(resource) & new) - {(resource["resourceType"], resource["id"])}


def next_bundle(kind: str, waiting: list[dict], new: set[Key], limit: Optional[int] = None) -> list[dict]:
    """The resources to send next, in order, at most ``limit``: in a batch, those that refer to no
    resource in ``new`` (not at the partner yet); in a transaction, those whose new targets are in
    the same transaction, before them. Empty when each waits for another."""
    chosen: list[dict] = []
    keys: set[Key] = set()
    for resource in waiting:
        needs = waiting_on(resource, new)
        ready = not needs if kind == "batch" else needs <= keys
        if not ready:
            continue
        chosen.append(resource)
        keys.add((resource["resourceType"], resource["id"]))
        if limit and len(chosen) >= limit:
            break
    return chosen


# -- building ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Write:
    """One resource to write. ``remote_id`` ``None``: a create (``if_none_exist`` when the partner
    honours it); otherwise an update of that resource, ``if_match`` the version we last knew."""

    rtype: str
    local_id: str
    body: dict
    remote_id: Optional[str] = None
    if_match: Optional[str] = None
    if_none_exist: Optional[str] = None

    @property
    def key(self) -> Key:
        return self.rtype, self.local_id

    @property
    def creates(self) -> bool:
        return self.remote_id is None


def bundle(kind: str, writes: Iterable[Write]) -> dict:
    """A ``transaction`` or ``batch`` Bundle with one entry per write, in the order given."""
    if kind not in ("transaction", "batch"):
        raise ValueError(f"a bundle is a transaction or a batch, not {kind!r}")
    return {"resourceType": "Bundle", "type": kind, "entry": [_entry(w) for w in writes]}


def _entry(write: Write) -> dict:
    if write.creates:
        request = {"method": "POST", "url": write.rtype}
        if write.if_none_exist:
            request["ifNoneExist"] = write.if_none_exist
        return {"fullUrl": placeholder(write.rtype, write.local_id), "resource": write.body, "request": request}
    request = {"method": "PUT", "url": f"{write.rtype}/{write.remote_id}"}
    if write.if_match:
        request["ifMatch"] = write.if_match
    return {"resource": {**write.body, "id": write.remote_id}, "request": request}


# -- reading -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """What the partner answered one entry: its status, and on success the id and version it holds
    the resource under (and the resource, when it sent it back)."""

    status: int
    remote_id: Optional[str] = None
    version: Optional[str] = None
    resource: Optional[dict] = None
    outcome: Optional[dict] = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def conflict(self) -> bool:
        """A stale ``ifMatch`` (or the resource changed under us): re-read and merge."""
        return self.status in (409, 412)

    @property
    def transient(self) -> bool:
        """Turned away for now (429, 5xx but 501): the task retries the push."""
        return self.status == 429 or (500 <= self.status < 600 and self.status != 501)


def answers(kind: str, response: Any, writes: list[Write]) -> list[Answer]:
    """The answer to each write, in order. A reply that is not a response Bundle with one entry per
    write cannot tell what was written: ``PermanentError`` (the next push looks before writing)."""
    entries = response.get("entry") if isinstance(response, dict) else None
    if (not isinstance(response, dict) or response.get("resourceType") != "Bundle"
            or not isinstance(entries, list) or len(entries) != len(writes)):
        have = len(entries) if isinstance(entries, list) else "no"
        raise PermanentError(f"the partner answered the {kind} of {len(writes)} entries with {have} entries; "
                             "what it wrote is looked for on the next push")
    return [_answer(entry if isinstance(entry, dict) else {}, write) for entry, write in zip(entries, writes)]


_STATUS = re.compile(r"^\s*(\d{3})\b")


def _answer(entry: dict, write: Write) -> Answer:
    response = entry.get("response") if isinstance(entry.get("response"), dict) else {}
    match = _STATUS.match(str(response.get("status") or ""))
    status = int(match.group(1)) if match else 0
    resource = entry.get("resource") if isinstance(entry.get("resource"), dict) else None
    outcome = response.get("outcome") if isinstance(response.get("outcome"), dict) else None
    if resource is not None and resource.get("resourceType") == "OperationOutcome":
        outcome, resource = outcome or resource, None
    if resource is not None and resource.get("resourceType") != write.rtype:
        resource = None
    if not 200 <= status < 300:
        return Answer(status, outcome=outcome)
    rtype, location_id, location_version = parse_location(response.get("location"))
    if rtype not in (None, write.rtype):
        location_id = location_version = None
    remote_id = (resource or {}).get("id") or location_id or write.remote_id
    version = (etag_version(response.get("etag")) or ((resource or {}).get("meta") or {}).get("versionId")
               or location_version)
    return Answer(status, remote_id, version, resource, outcome)


def refused(kind: str, write: Write, answer: Answer) -> PartnerError:
    """A failed entry as the error one request of its own would have raised: ``TransientError`` for
    429 and 5xx (retry later), ``PermanentError`` (or its 404/405 kinds) for the rest."""
    what = f"{'POST' if write.creates else 'PUT'} {write.rtype} in a {kind}"
    if answer.status == 0:
        return PermanentError(f"{what}: the partner's answer has no status", outcome=answer.outcome)
    message = f"{what} answered {answer.status}"
    if answer.transient:
        return TransientError(message, status=answer.status, outcome=answer.outcome)
    cls = {404: NotFound, 410: NotFound, 405: NotSupported, 501: NotSupported}.get(answer.status, PermanentError)
    return cls(message, status=answer.status, outcome=answer.outcome)
