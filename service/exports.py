"""Stored cases as FHIR, converted once per case version and kept (a version never changes).

Reads of the same case — a partner polling a plan, a search that returns it — then cost a lookup,
not a conversion. The cache holds the most recently used ``MAX_ENTRIES`` conversions per process,
each as its JSON bytes rather than as Python objects: thousands of converted bundles held as dicts
and lists would make every full pass of the garbage collector, which walks every live container,
take a hundred milliseconds that each request in flight waits out. A hit is parsed again (one
resource at a time) or, for a whole bundle, sent as it is.
"""
from __future__ import annotations

import datetime as dt
import threading
from collections import OrderedDict
from typing import Optional, Union

import orjson

from mappings.export import DEFAULT_BASE_URL, case_bundle
from service import schemas
from service.store import StoredCase, aware

MAX_ENTRIES = 4096  # bundles and resource maps

#: (type, id) -> the resource's JSON
ResourceJsons = dict[tuple[str, str], bytes]

_cache: "OrderedDict[tuple, Union[bytes, ResourceJsons]]" = OrderedDict()
_lock = threading.Lock()


def bundle_json(stored: StoredCase, bundle_type: str = "collection", base_url: str = DEFAULT_BASE_URL) -> bytes:
    """The case version as a FHIR Bundle, in JSON."""
    key = _key(stored.organization_id, stored.id, stored.version, stored.updated_at, bundle_type, base_url)
    found = _get(key)
    if found is None:
        found = _put(key, orjson.dumps(case_bundle(schemas.load_case(stored.data), bundle_type, base_url)))
    return found


def bundle_of(stored: StoredCase, bundle_type: str = "collection", base_url: str = DEFAULT_BASE_URL) -> dict:
    """The case version as a FHIR Bundle (the caller's own copy)."""
    return orjson.loads(bundle_json(stored, bundle_type, base_url))


def cached_bundle_json(organization_id: str, case_id: str, version: int, updated_at: dt.datetime,
                       bundle_type: str = "collection", base_url: str = DEFAULT_BASE_URL) -> Optional[bytes]:
    """The bundle of a case version when it is converted already: known from an index row or a
    short read, so that a hit needs no read of the record itself."""
    return _get(_key(organization_id, case_id, version, updated_at, bundle_type, base_url))


def resource_jsons(stored: StoredCase) -> ResourceJsons:
    """The case version's resources, each in JSON, by (type, id) (cached like the bundles)."""
    key = _key(stored.organization_id, stored.id, stored.version, stored.updated_at, "resources", "")
    found = _get(key)
    if found is None:
        found = _put(key, {(e["resource"]["resourceType"], e["resource"].get("id")): orjson.dumps(e["resource"])
                           for e in bundle_of(stored)["entry"]})
    return found


def cached_resource_jsons(organization_id: str, case_id: str, version: int,
                          updated_at: dt.datetime) -> Optional[ResourceJsons]:
    return _get(_key(organization_id, case_id, version, updated_at, "resources", ""))


def resources_of(stored: StoredCase) -> dict[tuple[str, str], dict]:
    """The case version's resources by (type, id), each the caller's own copy."""
    return {key: orjson.loads(raw) for key, raw in resource_jsons(stored).items()}


def _key(organization_id: str, case_id: str, version: int, updated_at: dt.datetime, kind: str, base_url: str) -> tuple:
    # the time stamp tells apart same-numbered versions of same-named cases in different databases
    return organization_id, case_id, version, aware(updated_at), kind, base_url


def _get(key: tuple):
    with _lock:
        found = _cache.get(key)
        if found is not None:
            _cache.move_to_end(key)
        return found


def _put(key: tuple, value):
    with _lock:
        _cache[key] = value
        while len(_cache) > MAX_ENTRIES:
            _cache.popitem(last=False)
    return value
