"""An in-memory partner, for tests of everything else (the sync engine, the tasks, the API).

It keeps resources with versions and enforces the ``Capabilities`` it is given, so a test can stand up an
Epic-like partner (``MemoryEndpoint(profiles.capabilities("epic"))``) and watch the sync engine route
around what it cannot write. Faults are injected, not simulated at random:

- ``fail_next(n, error)``: the next ``n`` calls raise ``error`` before doing anything;
- ``drop_answer_next(n)``: the next ``n`` writes are applied, then raise ``AmbiguousWrite``;
- ``expire_searches()`` or ``session_ttl``: next links stop working (``SearchExpired``).

Search understands ``_id``, ``_lastUpdated`` (``gt``/``ge``/``lt``/``le``/``eq``), ``identifier``
(``system|value``, ``|value``, ``system|``, ``value``), ``patient``, ``subject``, ``focus``, ``status``, ``_count`` and
``_sort`` (``_lastUpdated``, ``-_lastUpdated``, ``_id``); any other parameter is a 400, so a test never
passes because a filter was silently ignored.
"""
from __future__ import annotations

import copy
import datetime
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from adapters.base import Capabilities, Page, PartnerEndpoint, SearchParams, Versioned
from adapters.errors import (
    AmbiguousWrite,
    NotFound,
    NotSupported,
    PermanentError,
    SearchExpired,
    VersionConflict,
    make_outcome,
)

Matcher = Callable[[Mapping[str, Any], "MemoryEndpoint"], "dict[str, Any] | None"]
OperationHandler = Callable[[Mapping[str, Any], "MemoryEndpoint"], dict[str, Any]]

NEXT_PREFIX = "memory://search/"
SEARCH_PARAMS = frozenset(
    {"_id", "_lastUpdated", "identifier", "patient", "subject", "focus", "status", "_count", "_sort"}
)
MEMBER_NUMBER = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MB"}]}
WRITES = frozenset({"create", "update", "transaction", "batch"})


@dataclass
class _Session:
    keys: list[tuple[str, str]]
    page_size: int
    created: float
    expired: bool = False


@dataclass
class _Fault:
    remaining: int
    error: BaseException | type[BaseException] | None  # None: drop the answer of a write
    on: frozenset[str] | None


class MemoryEndpoint(PartnerEndpoint):
    """A partner held in memory. ``capabilities`` defaults to the ``full`` profile.

    ``page_size``: entries per search page when ``_count`` does not say (capped by ``max_page_size``).
    ``session_ttl``: seconds next links stay valid (default: the capabilities' ``search_session_ttl``).
    ``member_matcher``: ``(parameters, endpoint) -> Patient | None`` for ``$member-match``.
    ``clock``: Unix time, for ``meta.lastUpdated`` and session expiry.
    """

    def __init__(
        self,
        capabilities: Capabilities | None = None,
        *,
        page_size: int = 50,
        session_ttl: float | None = None,
        member_matcher: Matcher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if capabilities is None:
            from adapters.profiles import capabilities as profile_capabilities

            capabilities = profile_capabilities("full")
        self._capabilities = capabilities
        self.page_size = page_size
        self.session_ttl = session_ttl if session_ttl is not None else capabilities.search_session_ttl
        self.clock = clock
        self._history: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._sessions: dict[str, _Session] = {}
        self._faults: list[_Fault] = []
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._operations: dict[tuple[str | None, str], OperationHandler] = {}
        self.member_matcher: Matcher = member_matcher or match_member_by_demographics
        self.register_operation("Patient", "member-match", _member_match)
        #: Every port call made, as ``(method, detail)``: what a test asserts the sync engine did.
        self.calls: list[tuple[str, str]] = []

    # --- test helpers ------------------------------------------------------------------------------

    def put(self, resource: Mapping[str, Any]) -> Versioned:
        """Store a resource as the partner already has it, without capability checks or faults."""
        with self._lock:
            resource = copy.deepcopy(dict(resource))
            resource.setdefault("id", self._new_id())
            return self._store(resource)

    def get(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The current version, or ``None``; no checks, no faults, not logged."""
        versions = self._history.get((resource_type, resource_id))
        return copy.deepcopy(versions[-1]) if versions else None

    def all(self, resource_type: str) -> list[dict[str, Any]]:
        """Every current resource of a type."""
        return [copy.deepcopy(v[-1]) for (t, _), v in self._history.items() if t == resource_type]

    def history(self, resource_type: str, resource_id: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self._history.get((resource_type, resource_id), []))

    def fail_next(
        self, n: int, error: BaseException | type[BaseException], *, on: Iterable[str] | None = None
    ) -> None:
        """The next ``n`` calls (of the methods in ``on``, if given) raise ``error`` and change nothing."""
        self._faults.append(_Fault(n, error, frozenset(on) if on is not None else None))

    def drop_answer_next(self, n: int = 1) -> None:
        """The next ``n`` writes are applied, then raise ``AmbiguousWrite`` as if the answer was lost."""
        self._faults.append(_Fault(n, None, WRITES))

    def expire_searches(self) -> None:
        """Every open search session expires now: its next links answer ``SearchExpired``."""
        for session in self._sessions.values():
            session.expired = True

    def register_operation(self, resource_type: str | None, name: str, handler: OperationHandler) -> None:
        self._operations[(resource_type, name.lstrip("$"))] = handler

    # --- the port ----------------------------------------------------------------------------------

    def capabilities(self) -> Capabilities:
        return self._capabilities

    def read(self, resource_type: str, resource_id: str) -> Versioned:
        with self._lock:
            self._enter("read", f"{resource_type}/{resource_id}")
            self._require(resource_type, "read")
            current = self._current(resource_type, resource_id)
            return _versioned(copy.deepcopy(current))

    def search_page(self, resource_type: str, params_or_url: SearchParams | str) -> Page:
        with self._lock:
            if isinstance(params_or_url, str):
                self._enter("search_page", params_or_url)
                return self._next_page(resource_type, params_or_url)
            self._enter("search_page", f"{resource_type}?{_query_string(params_or_url)}")
            self._require(resource_type, "search-type")
            keys, page_size = self._query(resource_type, params_or_url)
            session_id = uuid.uuid4().hex
            self._sessions[session_id] = _Session(keys, page_size, self.clock())
            return self._page(session_id, 0)

    def create(self, resource: Mapping[str, Any], if_none_exist: str | None = None) -> Versioned:
        with self._lock:
            resource_type = _resource_type(resource)
            fault = self._enter("create", resource_type)
            result, _ = self._create(copy.deepcopy(dict(resource)), if_none_exist)
            return self._answer(fault, result)

    def update(self, resource: Mapping[str, Any], if_match: str | None = None) -> Versioned:
        with self._lock:
            resource_type = _resource_type(resource)
            fault = self._enter("update", f"{resource_type}/{resource.get('id')}")
            if not resource.get("id"):
                raise ValueError(f"{resource_type} has no id to update")
            result, _ = self._update(copy.deepcopy(dict(resource)), if_match)
            return self._answer(fault, result)

    def transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            fault = self._enter("transaction", f"{len(bundle.get('entry') or [])} entries")
            _check_bundle(bundle, "transaction")
            if not self._capabilities.supports_system("transaction"):
                raise NotSupported("the partner does not support transactions", status=405,
                                   outcome=make_outcome("not-supported", "transaction is not supported"))
            saved = {key: list(versions) for key, versions in self._history.items()}
            try:
                response = self._transaction(bundle)
            except BaseException:
                self._history = saved  # all or nothing
                raise
            return self._answer(fault, response)

    def batch(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            fault = self._enter("batch", f"{len(bundle.get('entry') or [])} entries")
            _check_bundle(bundle, "batch")
            if not self._capabilities.supports_system("batch"):
                raise NotSupported("the partner does not support batches", status=405,
                                   outcome=make_outcome("not-supported", "batch is not supported"))
            entries = []
            for entry in bundle.get("entry") or []:
                try:
                    entries.append(self._entry(copy.deepcopy(entry)))
                except PermanentError as exc:
                    entries.append({"response": {"status": str(exc.status or 400), "outcome": exc.outcome
                                                 or make_outcome("processing", exc.message)}})
            return self._answer(fault, {"resourceType": "Bundle", "type": "batch-response", "entry": entries})

    def operation(
        self, resource_type: str | None, name: str, parameters: Mapping[str, Any]
    ) -> dict[str, Any]:
        with self._lock:
            name = name.lstrip("$")
            self._enter("operation", f"{resource_type or ''}${name}")
            handler = self._operations.get((resource_type, name))
            if handler is None or not self._capabilities.supports_operation(resource_type, name):
                raise NotSupported(f"${name} is not supported on {resource_type or 'the system'}", status=404,
                                   outcome=make_outcome("not-supported", f"unknown operation ${name}"))
            return handler(copy.deepcopy(dict(parameters)), self)

    # --- faults and checks -------------------------------------------------------------------------

    def _enter(self, method: str, detail: str) -> _Fault | None:
        """Log the call; raise an injected failure, or return a pending dropped answer for a write."""
        self.calls.append((method, detail))
        for fault in self._faults:
            if fault.remaining > 0 and (fault.on is None or method in fault.on):
                fault.remaining -= 1
                if fault.error is not None:
                    raise fault.error
                return fault
        return None

    @staticmethod
    def _answer(fault: _Fault | None, result: Any) -> Any:
        if fault is not None:
            raise AmbiguousWrite("injected: the write was applied and its answer lost")
        return result

    def _require(self, resource_type: str, interaction: str) -> None:
        if not self._capabilities.supports(resource_type, interaction):
            raise NotSupported(
                f"{interaction} is not allowed on {resource_type}", status=405,
                outcome=make_outcome("not-supported", f"{interaction} is not allowed on {resource_type}"),
            )

    def _current(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        versions = self._history.get((resource_type, resource_id))
        if not versions:
            raise NotFound(f"{resource_type}/{resource_id} is not known", status=404,
                           outcome=make_outcome("not-found", f"{resource_type}/{resource_id} is not known"))
        return versions[-1]

    # --- writes ------------------------------------------------------------------------------------

    def _new_id(self) -> str:
        return f"mem-{next(self._ids)}"

    def _store(self, resource: dict[str, Any]) -> Versioned:
        key = (resource["resourceType"], resource["id"])
        versions = self._history.setdefault(key, [])
        meta = dict(resource.get("meta") or {})
        meta["versionId"] = str(len(versions) + 1)
        meta["lastUpdated"] = _instant(self.clock())
        resource["meta"] = meta
        versions.append(resource)
        return _versioned(copy.deepcopy(resource))

    def _create(self, resource: dict[str, Any], if_none_exist: str | None) -> tuple[Versioned, bool]:
        resource_type = _resource_type(resource)
        self._require(resource_type, "create")
        existing = self._conditional_match(resource_type, if_none_exist)
        if existing:
            return _versioned(copy.deepcopy(self._current(resource_type, existing))), False
        resource["id"] = self._new_id()
        resource.pop("meta", None)
        return self._store(resource), True

    def _conditional_match(self, resource_type: str, if_none_exist: str | None) -> str | None:
        """For ``If-None-Exist``: the id of the one match, ``None`` for none; 412 for several."""
        if not if_none_exist:
            return None
        self._require(resource_type, "create")
        if not self._capabilities.conditional_create(resource_type):
            raise NotSupported(f"{resource_type}: conditional create is not supported", status=405,
                               outcome=make_outcome("not-supported", "If-None-Exist is not supported"))
        matches, _ = self._query(resource_type, dict(parse_qsl(if_none_exist.lstrip("?"))))
        if len(matches) > 1:
            raise PermanentError(f"If-None-Exist matched {len(matches)} {resource_type}", status=412,
                                 outcome=make_outcome("multiple-matches", "If-None-Exist matched more than one"))
        return matches[0][1] if matches else None

    def _update(self, resource: dict[str, Any], if_match: str | None) -> tuple[Versioned, bool]:
        resource_type = _resource_type(resource)
        self._require(resource_type, "update")
        key = (resource_type, resource["id"])
        exists = key in self._history
        stale = self._capabilities.stale_if_match_status
        if if_match:
            wanted = _version_of(if_match)
            if not exists or self._history[key][-1]["meta"]["versionId"] != wanted:
                have = self._history[key][-1]["meta"]["versionId"] if exists else "none"
                raise VersionConflict(
                    f"{resource_type}/{resource['id']}: If-Match {wanted}, current version {have}", status=stale,
                    outcome=make_outcome("conflict", f"version {wanted} is not the current version ({have})"),
                )
        elif exists and self._capabilities.quirks.get("update_requires_if_match"):
            raise PermanentError(f"{resource_type}: an update needs If-Match", status=428,
                                 outcome=make_outcome("required", "If-Match header is required"))
        if not exists and not self._capabilities.resource(resource_type).update_create:
            raise NotSupported(f"{resource_type}/{resource['id']} does not exist and client ids are not allowed",
                               status=405, outcome=make_outcome("not-supported", "update as create is not supported"))
        resource.pop("meta", None)
        return self._store(resource), not exists

    def _conditional_update(self, resource: dict[str, Any], query: str, if_match: str | None) -> tuple[Versioned, bool]:
        resource_type = _resource_type(resource)
        if not self._capabilities.conditional_update(resource_type):
            raise NotSupported(f"{resource_type}: conditional update is not supported", status=405,
                               outcome=make_outcome("not-supported", "conditional update is not supported"))
        matches, _ = self._query(resource_type, dict(parse_qsl(query)))
        if len(matches) > 1:
            raise PermanentError(f"conditional update matched {len(matches)} {resource_type}", status=412,
                                 outcome=make_outcome("multiple-matches", "the search matched more than one"))
        if matches:
            resource["id"] = matches[0][1]
            return self._update(resource, if_match)
        self._require(resource_type, "create")
        resource["id"] = resource.get("id") or self._new_id()
        resource.pop("meta", None)
        return self._store(resource), True

    def _entry(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Carry out one bundle entry; answers the response entry."""
        request = entry.get("request") or {}
        method, url = str(request.get("method", "")).upper(), str(request.get("url", ""))
        resource = entry.get("resource")
        if method == "GET":
            path, _, query = url.partition("?")
            if "/" in path:
                rtype, rid = path.split("/", 1)
                self._require(rtype, "read")
                versioned = _versioned(copy.deepcopy(self._current(rtype, rid)))
                return {"resource": versioned.resource, "response": _response("200 OK", versioned)}
            self._require(path, "search-type")
            keys, page_size = self._query(path, dict(parse_qsl(query)))
            session_id = uuid.uuid4().hex
            self._sessions[session_id] = _Session(keys, page_size, self.clock())
            return {"resource": self._page(session_id, 0).bundle, "response": {"status": "200 OK"}}
        if not isinstance(resource, dict):
            raise PermanentError(f"{method} {url}: entry has no resource", status=400,
                                 outcome=make_outcome("required", "entry.resource is required"))
        if method == "POST":
            versioned, created = self._create(resource, request.get("ifNoneExist"))
        elif method == "PUT":
            path, _, query = url.partition("?")
            if query:
                versioned, created = self._conditional_update(resource, query, request.get("ifMatch"))
            else:
                resource["id"] = path.split("/", 1)[1] if "/" in path else resource.get("id")
                versioned, created = self._update(resource, request.get("ifMatch"))
        else:
            raise PermanentError(f"{method} is not supported in bundles here", status=405,
                                 outcome=make_outcome("not-supported", f"{method} entries are not supported"))
        return {"resource": versioned.resource, "response": _response("201 Created" if created else "200 OK", versioned)}

    def _transaction(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        entries = copy.deepcopy(list(bundle.get("entry") or []))
        # Give every POST its id first, so urn:uuid references between entries can be resolved.
        resolved: dict[str, str] = {}
        for entry in entries:
            request, resource = entry.get("request") or {}, entry.get("resource") or {}
            if str(request.get("method", "")).upper() == "POST" and str(entry.get("fullUrl", "")).startswith("urn:"):
                resource_type = _resource_type(resource)
                existing = self._conditional_match(resource_type, request.get("ifNoneExist"))
                resolved[entry["fullUrl"]] = f"{resource_type}/{existing or self._new_id()}"
        for entry in entries:
            if isinstance(entry.get("resource"), dict):
                _rewrite_references(entry["resource"], resolved)
        order = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3}
        answers: dict[int, dict[str, Any]] = {}
        for index in sorted(range(len(entries)), key=lambda i: order.get(
                str((entries[i].get("request") or {}).get("method", "")).upper(), 9)):
            entry = entries[index]
            full_url = str(entry.get("fullUrl", ""))
            if full_url in resolved and full_url.startswith("urn:"):
                # Create under the id chosen above (or answer the conditional match).
                rtype, rid = resolved[full_url].split("/", 1)
                if (rtype, rid) in self._history:
                    answers[index] = {"resource": copy.deepcopy(self._current(rtype, rid)),
                                      "response": _response("200 OK", _versioned(self._current(rtype, rid)))}
                    continue
                self._require(rtype, "create")
                resource = entry["resource"]
                resource["id"] = rid
                resource.pop("meta", None)
                versioned = self._store(resource)
                answers[index] = {"resource": versioned.resource, "response": _response("201 Created", versioned)}
            else:
                answers[index] = self._entry(entry)
        return {"resourceType": "Bundle", "type": "transaction-response",
                "entry": [answers[i] for i in range(len(entries))]}

    # --- search ------------------------------------------------------------------------------------

    def _query(self, resource_type: str, params: Mapping[str, Any]) -> tuple[list[tuple[str, str]], int]:
        unknown = set(params) - SEARCH_PARAMS
        if unknown:
            raise PermanentError(f"unsupported search parameters: {', '.join(sorted(unknown))}", status=400,
                                 outcome=make_outcome("not-supported", f"unknown search parameter {sorted(unknown)[0]}"))
        candidates = [v[-1] for (t, _), v in self._history.items() if t == resource_type]
        for name, raw in params.items():
            if name in ("_count", "_sort"):
                continue
            for value in [raw] if isinstance(raw, str) else list(raw):
                candidates = [r for r in candidates if _matches(r, name, str(value))]
        sort = str(params.get("_sort", "_lastUpdated"))
        if sort not in ("_lastUpdated", "-_lastUpdated", "_id"):
            raise PermanentError(f"unsupported _sort {sort}", status=400,
                                 outcome=make_outcome("not-supported", f"_sort={sort} is not supported"))
        if sort == "_id":
            candidates.sort(key=lambda r: r["id"])
        else:
            candidates.sort(key=lambda r: (_parse_instant(r["meta"]["lastUpdated"]), r["id"]),
                            reverse=sort.startswith("-"))
        size = int(params.get("_count", self.page_size))
        if self._capabilities.max_page_size:
            size = min(size, self._capabilities.max_page_size)
        return [(r["resourceType"], r["id"]) for r in candidates], max(size, 1)

    def _page(self, session_id: str, offset: int) -> Page:
        session = self._sessions[session_id]
        keys = session.keys[offset: offset + session.page_size]
        resources = [copy.deepcopy(self._history[k][-1]) for k in keys if k in self._history]
        following = offset + session.page_size
        next_link = f"{NEXT_PREFIX}{session_id}?offset={following}" if following < len(session.keys) else None
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(session.keys),
            "link": [{"relation": "next", "url": next_link}] if next_link else [],
            "entry": [{"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                      for r in resources],
        }
        return Page(resources=resources, next=next_link, total=len(session.keys), bundle=bundle)

    def _next_page(self, resource_type: str, link: str) -> Page:
        parts = urlsplit(link)
        session_id = link[len(NEXT_PREFIX):].split("?", 1)[0] if link.startswith(NEXT_PREFIX) else None
        session = self._sessions.get(session_id or "")
        offset = int(dict(parse_qsl(parts.query)).get("offset", "0"))
        if session is not None and self.session_ttl is not None and self.clock() - session.created > self.session_ttl:
            session.expired = True
        if session is None or session.expired:
            raise SearchExpired(f"search session {session_id} has expired", status=410,
                                outcome=make_outcome("not-found", "the search session has expired"))
        return self._page(session_id, offset)


# --- $member-match -------------------------------------------------------------------------------


def match_member_by_demographics(parameters: Mapping[str, Any], endpoint: MemoryEndpoint) -> dict[str, Any] | None:
    """The one stored Patient whose family name, first given name and birth date equal ``MemberPatient``'s."""
    patient = _parameter_resource(parameters, "MemberPatient")
    if patient is None:
        return None
    wanted = _demographics(patient)
    found = [p for p in endpoint.all("Patient") if _demographics(p) == wanted]
    return found[0] if len(found) == 1 else None


def _member_match(parameters: Mapping[str, Any], endpoint: MemoryEndpoint) -> dict[str, Any]:
    if _parameter_resource(parameters, "MemberPatient") is None:
        raise PermanentError("$member-match needs a MemberPatient", status=400,
                             outcome=make_outcome("required", "MemberPatient is required"))
    patient = endpoint.member_matcher(parameters, endpoint)
    if patient is None:
        raise PermanentError("$member-match found no unique member", status=422,
                             outcome=make_outcome("processing", "No unique member match"))
    identifiers = patient.get("identifier") or []
    member = next((i for i in identifiers if _has_code(i.get("type"), "MB")), None)
    member = member or {"type": MEMBER_NUMBER, "system": "urn:casebridge:memory:member", "value": patient["id"]}
    return {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "MemberIdentifier", "valueIdentifier": member},
            {"name": "MemberId", "valueReference": {"reference": f"Patient/{patient['id']}"}},
        ],
    }


def _parameter_resource(parameters: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    for parameter in parameters.get("parameter") or []:
        if str(parameter.get("name", "")).lower() == name.lower() and isinstance(parameter.get("resource"), dict):
            return parameter["resource"]
    return None


def _demographics(patient: Mapping[str, Any]) -> tuple[str, str, str]:
    name = (patient.get("name") or [{}])[0]
    given = (name.get("given") or [""])[0]
    return str(name.get("family", "")).casefold(), str(given).casefold(), str(patient.get("birthDate", ""))


def _has_code(concept: Mapping[str, Any] | None, code: str) -> bool:
    return any(c.get("code") == code for c in (concept or {}).get("coding") or [])


# --- helpers -------------------------------------------------------------------------------------


def _resource_type(resource: Mapping[str, Any]) -> str:
    if not resource.get("resourceType"):
        raise ValueError("resource has no resourceType")
    return str(resource["resourceType"])


def _check_bundle(bundle: Mapping[str, Any], kind: str) -> None:
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") != kind:
        raise ValueError(f"expected a Bundle of type {kind!r}, got {bundle.get('type')!r}")


def _versioned(resource: dict[str, Any]) -> Versioned:
    version = (resource.get("meta") or {}).get("versionId")
    return Versioned(resource, resource.get("id"), version, f'W/"{version}"' if version else None)


def _response(status: str, versioned: Versioned) -> dict[str, Any]:
    return {
        "status": status,
        "location": f"{versioned.resource['resourceType']}/{versioned.id}/_history/{versioned.version_id}",
        "etag": versioned.etag,
        "lastModified": (versioned.resource.get("meta") or {}).get("lastUpdated"),
    }


def _version_of(if_match: str) -> str:
    value = if_match.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def _instant(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="microseconds")


def _parse_instant(value: str) -> datetime.datetime:
    parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def _query_string(params: Mapping[str, Any]) -> str:
    return "&".join(f"{k}={v}" for k, vs in params.items() for v in ([vs] if isinstance(vs, str) else vs))


def _rewrite_references(node: Any, resolved: Mapping[str, str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str) and value in resolved:
                node[key] = resolved[value]
            else:
                _rewrite_references(value, resolved)
    elif isinstance(node, list):
        for item in node:
            _rewrite_references(item, resolved)


def _reference_matches(reference: Mapping[str, Any] | None, value: str, default_type: str) -> bool:
    if not reference or not reference.get("reference"):
        return False
    wanted = value if "/" in value or not default_type else f"{default_type}/{value}"
    have = str(reference["reference"])
    return have == wanted or have.endswith("/" + wanted)


def _matches(resource: Mapping[str, Any], name: str, value: str) -> bool:
    if name == "_id":
        return resource.get("id") in value.split(",")
    if name == "status":
        return resource.get("status") in value.split(",")
    if name in ("patient", "subject", "focus"):
        fields = {"patient": ("patient", "subject", "beneficiary"), "subject": ("subject",), "focus": ("focus",)}[name]
        default_type = "Patient" if name != "focus" else ""
        return any(_reference_matches(resource.get(f), value, default_type) for f in fields)
    if name == "identifier":
        return any(_identifier_matches(i, value) for i in resource.get("identifier") or [])
    if name == "_lastUpdated":
        prefix, stamp = (value[:2], value[2:]) if value[:2] in ("gt", "ge", "lt", "le", "eq") else ("eq", value)
        have = _parse_instant(resource["meta"]["lastUpdated"])
        try:
            want = _parse_instant(stamp)
        except ValueError as exc:
            raise PermanentError(f"_lastUpdated: {stamp!r} is not a date", status=400,
                                 outcome=make_outcome("value", f"_lastUpdated {stamp!r} is not a date")) from exc
        return {"gt": have > want, "ge": have >= want, "lt": have < want, "le": have <= want, "eq": have == want}[prefix]
    raise PermanentError(f"unsupported search parameter {name}", status=400)  # pragma: no cover - _query checks


def _identifier_matches(identifier: Mapping[str, Any], value: str) -> bool:
    for token in value.split(","):
        if "|" not in token:
            if identifier.get("value") == token:
                return True
            continue
        system, _, code = token.partition("|")
        if system == "" and not identifier.get("system") and identifier.get("value") == code:
            return True
        if system and identifier.get("system") == system and (code == "" or identifier.get("value") == code):
            return True
    return False

