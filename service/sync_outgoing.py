"""Our resources as a partner gets them: the order they are written in, references turned into the
partner's ids, our sync identifier added, and the hash the ledger compares to skip unchanged writes.

No storage and no partner calls here: ``by_local`` maps ``(type, our id)`` to a ledger row (anything
with a ``remote_id``).
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Optional

import orjson

from adapters.errors import PermanentError
from mappings import ids

#: the identifier every resource we send carries, so we can find it at the partner again
SYNC_SYSTEM = f"{ids.BASE}/sid/resource"
#: the order resources are written in: each one's references before it
WRITE_ORDER = ("Organization", "Practitioner", "Patient", "Condition", "Goal", "ServiceRequest", "Task",
               "CareTeam", "CarePlan")


def ordered(resources: Iterable[dict]) -> list[dict]:
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


def body_to_send(resource: dict, by_local: dict, pending: Optional[dict] = None) -> dict:
    """``outgoing``, failing the push (``PermanentError``) when a reference it cannot do without has
    no target at the partner."""
    try:
        return outgoing(resource, by_local, pending)
    except _MissingTarget as missing:
        raise PermanentError(422, None, f"{resource['resourceType']} refers to {missing} which is not at the "
                                        "partner") from None


def body_hash(body: dict) -> str:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def weak_etag(version: Optional[str]) -> Optional[str]:
    """The ``If-Match`` for a version the ledger knows (none when it knows none)."""
    return f'W/"{version}"' if version else None


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
