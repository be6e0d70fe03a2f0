"""What a partner's resource had beyond what the case record models, kept so nothing is lost.

On import, the record is mapped back out (``base``) and compared with the partner's resource
(``source``); the difference is a *patch* kept beside the record. On export the patch is applied to
what the record maps to now (``ours``), as a three-way merge at every element: where the record still
says what it said at import (``ours == base``) the partner's own value comes back, byte for byte;
where the case manager has changed something since, the record wins.

Patches are plain JSON so they can be stored with the record:
  ``{"+": value}``          the partner had an element the record does not produce
  ``{"-": base}``           the record produces an element the partner did not have
  ``{"=": [base, source]}`` both have it, with different values
  ``{"{}": {key: patch}}``  an object, element by element
  ``{"[]": [patch|null]}``  a list of the same length, item by item
"""
from __future__ import annotations

from typing import Any, Optional

_MISSING: Any = object()
Patch = Optional[dict]


def diff(base: Any, source: Any) -> Patch:
    """The patch that turns ``base`` into ``source`` (``None`` when they are equal)."""
    if base == source:
        return None
    if base is _MISSING:
        return {"+": source}
    if source is _MISSING:
        return {"-": base}
    if type(base) is dict and type(source) is dict:
        inner = {}
        for key in source.keys() | base.keys():
            patch = diff(base.get(key, _MISSING), source.get(key, _MISSING))
            if patch is not None:
                inner[key] = patch
        return {"{}": inner}
    if type(base) is list and type(source) is list and len(base) == len(source):
        return {"[]": [diff(b, s) for b, s in zip(base, source)]}
    return {"=": [base, source]}


def apply(ours: Any, patch: Patch) -> Any:
    """``ours`` with the partner's elements put back where the record has not changed them."""
    if patch is None:
        return ours
    if "{}" in patch:
        if type(ours) is not dict:
            return ours
        merged = dict(ours)
        for key, inner in patch["{}"].items():
            value = apply(merged.get(key, _MISSING), inner)
            if value is _MISSING:
                merged.pop(key, None)
            else:
                merged[key] = value
        return merged
    if "[]" in patch:
        items = patch["[]"]
        if type(ours) is not list or len(ours) != len(items):
            return ours
        return [apply(o, p) for o, p in zip(ours, items)]
    if "+" in patch:
        return patch["+"] if ours is _MISSING else ours
    if "-" in patch:
        return _MISSING if ours == patch["-"] else ours
    base, source = patch["="]
    return source if ours == base else ours


def merge(ours: dict, patch: Patch) -> dict:
    """Apply a resource-level patch (the result is always a resource)."""
    result = apply(ours, patch)
    return ours if result is _MISSING else result
