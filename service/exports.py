"""Stored cases as FHIR, converted once per case version and kept (a version never changes).

Reads of the same case — a partner polling a plan, a search that returns it — then cost a lookup,
not a conversion. The cache holds the most recently used ``MAX_ENTRIES`` conversions per process;
what it returns is shared and must not be changed by the caller.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from mappings.export import DEFAULT_BASE_URL, case_bundle
from service import schemas
from service.store import StoredCase

MAX_ENTRIES = 2048

_cache: "OrderedDict[tuple, dict]" = OrderedDict()
_lock = threading.Lock()


def bundle_of(stored: StoredCase, bundle_type: str = "collection", base_url: str = DEFAULT_BASE_URL) -> dict:
    # the time stamp tells apart same-numbered versions of same-named cases in different databases
    key = (stored.organization_id, stored.id, stored.version, stored.updated_at, bundle_type, base_url)
    with _lock:
        found = _cache.get(key)
        if found is not None:
            _cache.move_to_end(key)
            return found
    bundle = case_bundle(schemas.load_case(stored.data), bundle_type, base_url)
    with _lock:
        _cache[key] = bundle
        while len(_cache) > MAX_ENTRIES:
            _cache.popitem(last=False)
    return bundle
