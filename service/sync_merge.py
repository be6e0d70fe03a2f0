"""Comparing a partner's copy of a resource with what we sent, and merging when both sides changed it.

- ``differs``: whether the partner's copy says something other than a body of ours (what the partner
  adds itself, and the ids it gave a transaction's placeholders, do not count).
- ``our_write``: which body of ours a copy read back is, so an echo of our own write is never taken
  for the partner's change.
- ``three_way``: element by element against the base (what we last sent); an element both sides
  changed is a conflict for the case manager.

No storage and no partner calls here.
"""
from __future__ import annotations

from typing import Any, Optional

from service import sync_bundles as bundles

#: elements the partner keeps on its copy (its id, version, timestamps); never compared
SERVER_ELEMENTS = ("id", "meta")
#: elements derived from the rest, always ours: a partner re-rendering the narrative is no conflict
DERIVED_ELEMENTS = ("text",)


def our_write(row: Any, resource: dict) -> Optional[dict]:
    """The body we sent that a copy read from the partner is (known, or whose answer was lost), or
    ``None`` when the copy says something we never sent."""
    candidates = ([row.sent] if row.sent is not None else []) + list(reversed(row.attempts or ()))
    for body in candidates:
        if not differs(resource, body):
            # as the partner holds it: a placeholder sent in a transaction is the id it was given
            return {k: resource[k] if k in resource and k not in SERVER_ELEMENTS else v for k, v in body.items()}
    version = (resource.get("meta") or {}).get("versionId")
    if version and version in (row.written_versions or ()):
        return row.sent or resource
    return None


def differs(stored: dict, body: dict) -> bool:
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
