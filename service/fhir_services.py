"""FHIR R4 use cases: plain functions over the store and the caller, used by the ``/fhir`` views.

Every resource is a view of a case record (``mappings.export.case_resources``), found through the
index ``service.fhir_index`` keeps. A resource's version is its case's version. A write changes the
case: the case is exported, the written resource put in (or, for a create, added and linked from
the CarePlan), and the whole is imported back (``mappings.importer.import_graph``) into the same
case, which is saved with the version it was read at; what the record does not model is kept beside
it, so the resource reads back as written. Every query is limited to the caller's organization:
another organization's resource is not found, exactly as if it did not exist.
"""
from __future__ import annotations

import copy
import datetime as dt
import uuid
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional
from urllib.parse import parse_qsl, urlencode

import orjson
from sqlalchemy import and_, bindparam, delete, exists, func, insert, or_, select, tuple_
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from mappings import fhir_input, ids
from mappings import patient as patient_map
from mappings.export import DEFAULT_BASE_URL, CaseIds, case_bundle
from service import exports
from mappings.importer import import_graph
from service import fhir_index, schemas
from service.domain import Case
from service.errors import (
    AlreadyExists, CasebridgeError, Conflict, Gone, Invalid, NotFound, NotSupported, Problem, Unprocessable,
)
from service.fhir_index import TYPES, date_range, reference_id
from service.store import cases as case_table
from service.store import Store, StoredCase, case_versions, create_keys, fhir_resources, fhir_tokens

FHIR_VERSION = "4.0.1"


@dataclass
class Result:
    """A resource as served: with its version, when it last changed, and the HTTP status."""
    resource: Optional[dict]
    version: Optional[int] = None
    last_updated: Optional[dt.datetime] = None
    status: int = 200
    resource_type: Optional[str] = None
    resource_id: Optional[str] = None


# -- search parameters: what the API supports, stated once (the CapabilityStatement reads these) ---
@dataclass(frozen=True)
class Param:
    kind: str     # id | lastUpdated | column | token | reference | reftoken | date | string
    fhir_type: str  # the SearchParameter type the CapabilityStatement states
    target: str = ""  # column or token param name
    doc: str = ""
    ref_type: str = "Patient"


_PATIENT = Param("reference", "reference", "patient_id", "the patient (Patient/id or id)")
_SUBJECT = Param("reference", "reference", "patient_id", "the patient the resource is about")
COMMON = {
    "_id": Param("id", "token", doc="logical id"),
    "_lastUpdated": Param("lastUpdated", "date", doc="when the resource (its case) last changed"),
}
PARAMS: dict[str, dict[str, Param]] = {
    "Patient": {
        "identifier": Param("token", "token", "identifier", "an identifier: system|value, value or |value"),
        "name": Param("string", "string", "name", "any part of a name, from its start (or :contains)"),
        "birthdate": Param("date", "date", doc="date of birth"),
        "gender": Param("column", "token", "gender", "administrative gender"),
    },
    "CarePlan": {
        "patient": _PATIENT, "subject": _SUBJECT,
        "category": Param("token", "token", "category", "category: system|code, code or |code"),
        "goal": Param("reftoken", "reference", "goal", "a goal of the plan", "Goal"),
        "date": Param("date", "date", doc="the plan's period"),
        "status": Param("column", "token", "status", "the plan's status"),
    },
    "Goal": {
        "patient": _PATIENT, "subject": _SUBJECT,
        "lifecycle-status": Param("column", "token", "status", "the goal's lifecycle status"),
        "target-date": Param("date", "date", doc="the date the goal should be met"),
        "category": Param("token", "token", "category", "category: system|code, code or |code"),
    },
    "ServiceRequest": {
        "patient": _PATIENT, "subject": _SUBJECT,
        "category": Param("token", "token", "category", "category: system|code, code or |code"),
        "code": Param("token", "token", "code", "what is requested: system|code, code or |code"),
        "authored": Param("date", "date", doc="when the request was made"),
        "status": Param("column", "token", "status", "the request's status"),
        "identifier": Param("token", "token", "identifier", "an identifier of the request (a referrer's own, or "
                                                            "the record's): system|value, value or |value"),
    },
    "Condition": {
        "patient": _PATIENT, "subject": _SUBJECT,
        "category": Param("token", "token", "category", "category: system|code, code or |code"),
        "code": Param("token", "token", "code", "the condition's code: system|code, code or |code"),
    },
    "Task": {
        "patient": _PATIENT,
        "focus": Param("reftoken", "reference", "focus", "the ServiceRequest the task fulfils",
                       "ServiceRequest"),
        "status": Param("column", "token", "status", "the task's status"),
    },
}
#: _include values: source type:param → (element of the source, target type)
INCLUDES = {
    "CarePlan:goal": ("CarePlan", "goal", "Goal"),
    "CarePlan:subject": ("CarePlan", "subject", "Patient"),
    "CarePlan:patient": ("CarePlan", "subject", "Patient"),
    "Goal:subject": ("Goal", "subject", "Patient"),
    "Goal:patient": ("Goal", "subject", "Patient"),
    "ServiceRequest:subject": ("ServiceRequest", "subject", "Patient"),
    "ServiceRequest:patient": ("ServiceRequest", "subject", "Patient"),
    "Condition:subject": ("Condition", "subject", "Patient"),
    "Condition:patient": ("Condition", "subject", "Patient"),
    "Task:focus": ("Task", "focus", "ServiceRequest"),
    "Task:patient": ("Task", "for", "Patient"),
}
#: _revinclude values allowed on each searched type (the source's param must point at that type)
REVINCLUDES = {
    "Patient": [k for k, v in INCLUDES.items() if v[2] == "Patient"],
    "ServiceRequest": ["Task:focus"],
    "Goal": ["CarePlan:goal"],
}
CONTROL = ("_count", "_include", "_revinclude", "_format", "_offset")
DATE_PREFIXES = ("eq", "ne", "ge", "le", "gt", "lt")


def _conn(store: Store, conn: Optional[Connection]):
    return nullcontext(conn) if conn is not None else store.reader.connect()


def check_type(resource_type: str) -> None:
    if resource_type not in TYPES:
        raise NotFound(f"resource type {resource_type} is not served here (served: {', '.join(TYPES)})")


def _iso(stamp: dt.datetime) -> str:
    stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def with_meta(resource: dict, version: int, updated: dt.datetime) -> dict:
    """A copy of the resource with meta.versionId and meta.lastUpdated."""
    resource = dict(resource)  # shallow: the nested elements stay the caller's
    meta = {k: v for k, v in (resource.pop("meta", None) or {}).items() if k not in ("versionId", "lastUpdated")}
    head = {"resourceType": resource.pop("resourceType"), "id": resource.pop("id"),
            "meta": {"versionId": str(version), "lastUpdated": _iso(updated), **meta}}
    return {**head, **resource}


class _Cases:
    """Cases and their exports, read once per request. An index row names its case's version, so
    a case whose conversion is cached is not read at all."""

    def __init__(self, store: Store, organization_id: str, conn: Connection):
        self.store, self.organization_id, self.conn = store, organization_id, conn
        self._cases: dict[str, StoredCase] = {}

    def case(self, case_id: str) -> StoredCase:
        if case_id not in self._cases:
            self._cases[case_id] = self.store.get_case(self.organization_id, case_id, conn=self.conn)
        return self._cases[case_id]

    @staticmethod
    def resources(stored: StoredCase) -> dict[tuple[str, str], dict]:
        return exports.resources_of(stored)

    def resource(self, row) -> Optional[Result]:
        """The resource of an index row (of the current version of its case)."""
        updated = row.last_updated if row.last_updated.tzinfo else row.last_updated.replace(tzinfo=dt.timezone.utc)
        version = row.version
        jsons = exports.cached_resource_jsons(self.organization_id, row.case_id, version, updated)
        if jsons is None:
            stored = self.case(row.case_id)
            jsons, version, updated = exports.resource_jsons(stored), stored.version, stored.updated_at
        found = jsons.get((row.resource_type, row.resource_id))
        if found is None:
            return None
        return Result(with_meta(orjson.loads(found), version, updated), version, updated,
                      resource_type=row.resource_type, resource_id=row.resource_id)


# -- read ------------------------------------------------------------------------------------------
def read(store: Store, actor, resource_type: str, resource_id: str, conn: Optional[Connection] = None) -> Result:
    check_type(resource_type)
    with _conn(store, conn) as c:
        row = fhir_index.locate(c, actor.organization_id, resource_type, resource_id)
        if row is None:
            raise NotFound(f"no {resource_type}/{resource_id}")
        if row.deleted:
            raise Gone(f"{resource_type}/{resource_id} was deleted (its case was entered in error)")
        found = _Cases(store, actor.organization_id, c).resource(row)
    if found is None:
        raise NotFound(f"no {resource_type}/{resource_id}")
    return found


def vread(store: Store, actor, resource_type: str, resource_id: str, version_id: str,
          conn: Optional[Connection] = None) -> Result:
    check_type(resource_type)
    if not version_id.isdigit():
        raise NotFound(f"no version {version_id} of {resource_type}/{resource_id}")
    with _conn(store, conn) as c:
        rows = fhir_index.rows_of(c, actor.organization_id, resource_type, resource_id, include_deleted=True)
        cases = _Cases(store, actor.organization_id, c)
        versions = [_case_version(c, row.case_id, int(version_id)) for row in rows]
    for stored in versions:
        if stored is None:
            continue
        found = cases.resources(stored).get((resource_type, resource_id))
        if found is None:
            continue
        if stored.deleted or stored.data.get("status") == "entered_in_error":
            raise Gone(f"version {version_id} of {resource_type}/{resource_id} is a deletion")
        return Result(with_meta(found, stored.version, stored.updated_at), stored.version, stored.updated_at,
                      resource_type=resource_type, resource_id=resource_id)
    if not rows:
        raise NotFound(f"no {resource_type}/{resource_id}")
    raise NotFound(f"no version {version_id} of {resource_type}/{resource_id}")


def _case_version(conn: Connection, case_id: str, version: int) -> Optional[StoredCase]:
    """One version of a case (read on the caller's connection, which may be inside a transaction)."""
    row = conn.execute(select(case_versions, case_table.c.organization_id, case_table.c.created_at)
                       .join(case_table, case_table.c.id == case_versions.c.case_id)
                       .where(case_versions.c.case_id == case_id, case_versions.c.version == version)).first()
    if row is None:
        return None
    return StoredCase(case_id, row.organization_id, row.version, row.action == "delete", row.created_at,
                      row.recorded_at, orjson.loads(row.data))


def history(store: Store, actor, resource_type: str, resource_id: str, base: str, params: Iterable = (),
            page_size: int = 50, max_page_size: int = 500) -> dict:
    """The versions of a resource, newest first (each is a version of its case)."""
    check_type(resource_type)
    count = page_size
    for name, value in params:
        if name == "_count":
            count = _count(value, max_page_size)
        elif name != "_format":
            raise Invalid(f"unknown parameter {name} for _history", [Problem(name, "not supported on _history")])
    with _conn(store, None) as c:
        rows = fhir_index.rows_of(c, actor.organization_id, resource_type, resource_id, include_deleted=True)
        cases = _Cases(store, actor.organization_id, c)
    if not rows:
        raise NotFound(f"no {resource_type}/{resource_id}")
    versions = store.history(actor.organization_id, rows[0].case_id)  # (outside: one SQLite lock per connection)
    entries = []
    present = [(v, cases.resources(v).get((resource_type, resource_id))) for v in versions]
    present = [(v, r) for v, r in present if r is not None]
    for index, (version, found) in enumerate(present):
        url = f"{resource_type}/{resource_id}"
        first = index == len(present) - 1
        entry: dict = {"fullUrl": f"{base}/{url}"}
        if version.deleted or version.data.get("status") == "entered_in_error":
            entry["request"] = {"method": "DELETE", "url": url}
            entry["response"] = {"status": "204", "lastModified": _iso(version.updated_at)}
        else:
            entry["resource"] = with_meta(found, version.version, version.updated_at)
            entry["request"] = {"method": "POST" if first else "PUT", "url": resource_type if first else url}
            entry["response"] = {"status": "201" if first else "200", "etag": f'W/"{version.version}"',
                                 "lastModified": _iso(version.updated_at)}
        entries.append(entry)
    return {"resourceType": "Bundle", "type": "history", "total": len(entries),
            "link": [{"relation": "self", "url": f"{base}/{resource_type}/{resource_id}/_history"}],
            "entry": entries[:count]}


# -- search ----------------------------------------------------------------------------------------
def _count(value: str, max_page_size: int) -> int:
    if not value.isdigit():
        raise Invalid("_count must be a whole number", [Problem("_count", f"not a whole number: {value!r}")])
    return min(int(value), max_page_size)


def _split(value: str) -> list[str]:
    """The comma-separated alternatives of a value (``\\,`` is a comma inside one)."""
    parts, current, escape = [], "", False
    for char in value:
        if escape:
            current += char
            escape = False
        elif char == "\\":
            escape = True
        elif char == ",":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p != ""]


def _token(value: str) -> tuple[Optional[str], Optional[str], str]:
    """(mode, system, code): mode 'any' (code), 'system' (system|code) or 'none' (|code)."""
    if "|" not in value:
        return "any", None, value
    system, code = value.split("|", 1)
    return ("none", None, code) if system == "" else ("system", system, code)


def _date_prefix(name: str, value: str) -> tuple[str, tuple[str, str]]:
    prefix = value[:2] if value[:2].isalpha() else "eq"
    text = value[2:] if value[:2].isalpha() else value
    if prefix not in DATE_PREFIXES:
        raise Invalid(f"{name}: the prefix {prefix} is not supported",
                      [Problem(name, f"prefix {prefix!r} not supported (use {', '.join(DATE_PREFIXES)})")])
    found = date_range(text)
    if found is None:
        raise Invalid(f"{name}: {text!r} is not a date",
                      [Problem(name, f"{text!r} is not a FHIR date or dateTime")])
    return prefix, found


def _range_clause(prefix: str, lo, hi, col_lo, col_hi):
    if prefix == "eq":
        return and_(col_lo >= lo, col_hi <= hi)
    if prefix == "ne":
        return or_(col_lo < lo, col_hi > hi)
    if prefix == "ge":
        return col_hi > lo
    if prefix == "gt":
        return col_hi > hi
    if prefix == "le":
        return col_lo < hi
    return col_lo < lo  # lt


def _stamp(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.timezone.utc)


def _ref_id(value: str, ref_type: str) -> str:
    return reference_id(value, ref_type) or value.rsplit("/", 1)[-1]


def _token_match(param: str, condition, driving_type: Optional[str] = None):
    """The row's resource has a token of ``param`` that meets ``condition``.

    Each row found otherwise is checked against its own tokens; with ``driving_type`` (the type
    searched) the rows are instead picked from the tokens themselves, through their index, for a
    search with no patient or id to narrow it: else a search for one identifier or one focus would
    check every resource of the type."""
    t, r = fhir_tokens, fhir_resources
    if driving_type is None:
        return exists().where(t.c.resource_type == r.c.resource_type, t.c.resource_id == r.c.resource_id,
                              t.c.case_id == r.c.case_id, t.c.param == param, condition)
    return tuple_(r.c.resource_id, r.c.case_id).in_(select(t.c.resource_id, t.c.case_id).where(
        t.c.organization_id == bindparam("org"), t.c.resource_type == driving_type, t.c.param == param, condition))


@dataclass
class SearchRequest:
    """A checked search: its conditions as a *shape* (what SQL they need, hashable) and the values
    bound into that SQL, so that searches of one shape share one statement, built once."""
    resource_type: str
    params: list[tuple[str, str]]
    count: int
    offset: int = 0
    includes: list[str] = field(default_factory=list)
    revincludes: list[str] = field(default_factory=list)
    shape: list[tuple] = field(default_factory=list)
    values: list = field(default_factory=list)


def parse_search(resource_type: str, params: Iterable[tuple[str, str]], page_size: int = 50,
                 max_page_size: int = 500) -> SearchRequest:
    """Check every parameter (an unknown one is an error, never ignored) and work out the query's
    conditions. Repeated parameters must all hold; comma-separated values are alternatives."""
    check_type(resource_type)
    params = [(k, v) for k, v in params]
    request = SearchRequest(resource_type, params, page_size)
    known = {**COMMON, **PARAMS[resource_type]}
    problems: list[Problem] = []
    for name, value in params:
        base_name, _, modifier = name.partition(":")
        try:
            if base_name == "_count" and not modifier:
                request.count = _count(value, max_page_size)
            elif base_name == "_offset" and not modifier:
                if not value.isdigit():
                    raise Invalid("_offset", [Problem("_offset", "must be a whole number")])
                request.offset = int(value)
            elif base_name == "_format" and not modifier:
                continue
            elif base_name in ("_include", "_revinclude"):
                allowed = ([k for k, v in INCLUDES.items() if v[0] == resource_type] if base_name == "_include"
                           else REVINCLUDES.get(resource_type, []))
                if modifier:
                    raise Invalid("", [Problem(name, f"the :{modifier} modifier of {base_name} is not supported")])
                for item in _split(value):
                    if item not in allowed:
                        raise Invalid("", [Problem(name, f"{item!r} is not supported here (supported: "
                                                         f"{', '.join(allowed) or 'none'})")])
                    (request.includes if base_name == "_include" else request.revincludes).append(item)
            elif base_name in known:
                shape, values = _condition(known[base_name], name, modifier, value)
                request.shape.append(shape)
                request.values += values
            else:
                problems.append(Problem(name, f"unknown search parameter for {resource_type} (supported: "
                                              f"{', '.join([*known, *CONTROL[:3]])})"))
        except Invalid as error:
            problems += error.problems or [Problem(name, error.message)]
    if problems:
        raise Invalid(f"the search is not valid ({len(problems)} problem{'s' if len(problems) > 1 else ''})",
                      problems)
    return request


def _condition(param: Param, name: str, modifier: str, value: str) -> tuple[tuple, list]:
    """One parameter's condition as (shape, bound values): see ``_sql`` for the SQL of each shape."""
    values = _split(value)
    if not values:
        raise Invalid("", [Problem(name, "give a value")])
    allowed_modifiers = {"string": ("", "contains", "exact"), "reference": ("", param.ref_type),
                         "reftoken": ("", param.ref_type)}.get(param.kind, ("",))
    if modifier not in allowed_modifiers:
        raise Invalid("", [Problem(name, f"the :{modifier} modifier is not supported")])
    if param.kind == "id":
        return ("id", len(values)), values
    if param.kind == "column":
        return ("column", param.target, len(values)), [_token(v)[2] for v in values]
    if param.kind == "token":
        modes, bound = [], []
        for v in values:
            mode, system, code = _token(v)
            modes.append(mode)
            bound += [code, system] if mode == "system" else [code]
        return ("token", param.target, tuple(modes)), bound
    if param.kind == "reference":
        return ("reference", len(values)), [_ref_id(v, param.ref_type) for v in values]
    if param.kind == "reftoken":
        return ("reftoken", param.target, len(values)), [_ref_id(v, param.ref_type) for v in values]
    if param.kind == "string":
        patterns = []
        for v in values:
            words = v.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            patterns.append({"": f"% {words}%", "contains": f"%{words}%", "exact": f"% {words} %"}[modifier])
        return ("string", len(patterns)), patterns
    if param.kind in ("date", "lastUpdated"):
        prefixes, bound = [], []
        for v in values:
            prefix, (lo, hi) = _date_prefix(name, v)
            prefixes.append(prefix)
            bound += [lo, hi] if param.kind == "date" else [_stamp(lo), _stamp(hi)]
        return (param.kind, tuple(prefixes)), bound
    raise AssertionError(param.kind)


def _sql(shape: tuple, bind, driving_type: Optional[str] = None):
    """The SQL condition of a shape; ``bind()`` gives its next bind parameter. A list of values
    has a parameter each (no expanding parameters: the statement runs as compiled). A token
    condition given ``driving_type`` picks the rows (``_token_match``)."""
    r, kind = fhir_resources, shape[0]

    def each(n: int) -> list:
        return [bind() for _ in range(n)]

    if kind == "id":
        return r.c.resource_id.in_(each(shape[1]))
    if kind == "column":
        return r.c[shape[1]].in_(each(shape[2]))
    if kind == "reference":
        return r.c.patient_id.in_(each(shape[1]))
    if kind == "reftoken":
        return _token_match(shape[1], fhir_tokens.c.code.in_(each(shape[2])), driving_type)
    if kind == "token":
        t, alternatives = fhir_tokens, []
        for mode in shape[2]:
            cond = t.c.code == bind()
            if mode == "system":
                cond = and_(cond, t.c.system == bind())
            elif mode == "none":
                cond = and_(cond, t.c.system.is_(None))
            alternatives.append(cond)
        return _token_match(shape[1], or_(*alternatives), driving_type)
    if kind == "string":
        return or_(*[r.c.name.like(bind(), escape="\\") for _ in range(shape[1])])
    if kind == "date":
        return or_(*[and_(r.c.date_lo.is_not(None), _range_clause(prefix, bind(), bind(), r.c.date_lo, r.c.date_hi))
                     for prefix in shape[1]])
    if kind == "lastUpdated":
        alternatives, col = [], r.c.last_updated
        for prefix in shape[1]:
            lo, hi = bind(), bind()
            alternatives.append({"eq": and_(col >= lo, col < hi), "ne": or_(col < lo, col >= hi), "ge": col >= lo,
                                 "gt": col >= hi, "le": col < hi, "lt": col < lo}[prefix])
        return or_(*alternatives)
    raise AssertionError(kind)


def _driving_token(shape: tuple) -> Optional[int]:
    """Which condition of a search picks its rows from the token index: the first token one, when
    there is no patient (reference) or id condition, each of which finds fewer rows by itself."""
    if any(item[0] in ("id", "reference") for item in shape):
        return None
    return next((n for n, item in enumerate(shape) if item[0] in ("token", "reftoken")), None)


@dataclass(frozen=True)
class _Statements:
    page: Any   # one page of matches, newest first (binds: org, the values, limit, offset)
    count: Any  # how many match in all
    every: Any  # every match, newest first


_STATEMENTS: "OrderedDict[tuple, _Statements]" = OrderedDict()
_MAX_STATEMENTS = 512  # shapes are few (a handful of parameters per type): the most recently used


def _statements(resource_type: str, shape: tuple) -> _Statements:
    """The statements of a search shape, built once: building SQL costs more than running it here."""
    key = (resource_type, shape)
    found = _STATEMENTS.get(key)
    if found is None:
        names = iter(range(100_000))

        def bind():
            return bindparam(f"v{next(names)}")

        r = fhir_resources
        query = fhir_index.current_rows(bindparam("org"), resource_type)
        driver = _driving_token(shape)
        for n, item in enumerate(shape):
            query = query.where(_sql(item, bind, resource_type if n == driver else None))
        every = query.order_by(r.c.last_updated.desc(), r.c.resource_id)
        found = _Statements(every.limit(bindparam("limit")).offset(bindparam("offset")),
                            select(func.count()).select_from(query.subquery()), every)
        _STATEMENTS[key] = found
        while len(_STATEMENTS) > _MAX_STATEMENTS:
            _STATEMENTS.popitem(last=False)
    return found


def search(store: Store, actor, resource_type: str, params: Iterable[tuple[str, str]], base: str,
           page_size: int = 50, max_page_size: int = 500, conn: Optional[Connection] = None) -> dict:
    """A searchset Bundle: one page of matches (newest first), what they include, total and links."""
    request = parse_search(resource_type, params, page_size, max_page_size)
    statements = _statements(resource_type, tuple(request.shape))
    bound = {"org": actor.organization_id, **{f"v{i}": v for i, v in enumerate(request.values)}}
    page = {**bound, "limit": request.count, "offset": request.offset}
    whole_page = request.count and not request.offset  # fewer rows than asked: the whole result is here
    if conn is None and not request.includes and not request.revincludes:  # the common search: fast path
        rows = store.fetch(statements.page, page) if request.count else []
        total = len(rows) if whole_page and len(rows) < request.count else store.fetch(statements.count, bound)[0][0]
        cases = _Cases(store, actor.organization_id, None)
        matches = [m for m in (cases.resource(row) for row in rows) if m is not None]
        included: list[Result] = []
    else:
        with _conn(store, conn) as c:
            rows = c.execute(statements.page, page).all() if request.count else []
            total = len(rows) if whole_page and len(rows) < request.count \
                else c.execute(statements.count, bound).scalar_one()
            cases = _Cases(store, actor.organization_id, c)
            matches = [m for m in (cases.resource(row) for row in rows) if m is not None]
            included = _included(c, cases, actor.organization_id, request, matches)
    entries = [{"fullUrl": f"{base}/{m.resource_type}/{m.resource_id}", "resource": m.resource,
                "search": {"mode": "match"}} for m in matches]
    entries += [{"fullUrl": f"{base}/{m.resource_type}/{m.resource_id}", "resource": m.resource,
                 "search": {"mode": "include"}} for m in included]
    kept = [(k, v) for k, v in request.params if k != "_offset"]
    links = [{"relation": "self", "url": _url(base, resource_type, kept + (
        [("_offset", str(request.offset))] if request.offset else []))}]
    if request.count and request.offset + request.count < total:
        links.append({"relation": "next", "url": _url(base, resource_type, kept + [
            ("_offset", str(request.offset + request.count))] + ([] if any(k == "_count" for k, _ in kept)
                                                                  else [("_count", str(request.count))]))})
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": total, "link": links}
    if entries:
        bundle["entry"] = entries
    return bundle


def _url(base: str, resource_type: str, params: list[tuple[str, str]]) -> str:
    return f"{base}/{resource_type}" + (f"?{urlencode(params)}" if params else "")


def _included(conn: Connection, cases: _Cases, organization_id: str, request: SearchRequest,
              matches: list[Result]) -> list[Result]:
    seen = {(m.resource_type, m.resource_id) for m in matches}
    found: list[Result] = []

    def add(row) -> None:
        key = (row.resource_type, row.resource_id)
        if key in seen:
            return
        result = cases.resource(row)
        if result is not None:
            seen.add(key)
            found.append(result)

    for spec in request.includes:
        _, element, target = INCLUDES[spec]
        for match in matches:
            refs = match.resource.get(element)
            for ref in refs if isinstance(refs, list) else [refs]:
                target_id = reference_id(ref, target)
                if target_id and (target, target_id) not in seen:
                    row = fhir_index.locate(conn, organization_id, target, target_id)
                    if row is not None and not row.deleted:
                        add(row)
    match_ids = [m.resource_id for m in matches]
    for spec in request.revincludes:
        source_type, param_name = spec.split(":")
        if not match_ids:
            break
        param = PARAMS[source_type][param_name]
        n = len(match_ids)
        shape = ((param.kind, param.target, n),) if param.kind == "reftoken" else (("reference", n),)
        every = _statements(source_type, shape).every
        for row in conn.execute(every, {"org": organization_id, **{f"v{i}": v for i, v in enumerate(match_ids)}}):
            add(row)
    return found


def everything(store: Store, actor, patient_id: str, base: str, params: Iterable = ()) -> dict:
    """Patient/$everything: the patient and every resource of every case of the patient."""
    for name, _ in params:
        if name != "_format":
            raise Invalid(f"unknown parameter {name}", [Problem(name, "not supported on $everything")])
    with _conn(store, None) as c:
        row = fhir_index.locate(c, actor.organization_id, "Patient", patient_id)
        if row is None:
            raise NotFound(f"no Patient/{patient_id}")
        if row.deleted:
            raise Gone(f"Patient/{patient_id} was deleted")
        cases = _Cases(store, actor.organization_id, c)
        entries, seen = [], set()
        patient = cases.resource(row)
        if patient is not None:
            entries.append(patient)
            seen.add(("Patient", patient_id))
        case_ids = [x.case_id for x in fhir_index.rows_of(c, actor.organization_id, "Patient", patient_id)]
        for case_id in case_ids:
            stored = cases.case(case_id)
            for (rtype, rid), resource in cases.resources(stored).items():
                if rid and (rtype, rid) not in seen:
                    seen.add((rtype, rid))
                    entries.append(Result(with_meta(resource, stored.version, stored.updated_at), stored.version,
                                          stored.updated_at, resource_type=rtype, resource_id=rid))
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries),
            "link": [{"relation": "self", "url": f"{base}/Patient/{patient_id}/$everything"}],
            "entry": [{"fullUrl": f"{base}/{e.resource_type}/{e.resource_id}", "resource": e.resource,
                       "search": {"mode": "match"}} for e in entries]}


# -- writes ----------------------------------------------------------------------------------------
def incoming(resource: Any, resource_type: Optional[str], path: str = "") -> dict:
    """The written resource, checked against R4 (every problem, by element path), without the
    server-owned meta.versionId and meta.lastUpdated."""
    root = path or (resource.get("resourceType") if isinstance(resource, dict) and
                    isinstance(resource.get("resourceType"), str) else resource_type) or "Resource"
    if not isinstance(resource, dict):
        raise Invalid("send a FHIR resource (a JSON object)", [Problem(root, "not a JSON object")])
    if resource_type and resource.get("resourceType") != resource_type:
        raise Invalid(f"the body must be a {resource_type}",
                      [Problem(f"{root}.resourceType", f"must be {resource_type}, not "
                                                       f"{resource.get('resourceType')!r}")])
    if resource.get("resourceType") not in TYPES:
        raise Invalid(f"{resource.get('resourceType')} can't be written here",
                      [Problem(f"{root}.resourceType", f"must be one of {', '.join(TYPES)}")])
    problems = fhir_input.validate_resource(resource, path)
    if problems:
        raise Invalid(f"the {resource.get('resourceType')} is not valid FHIR R4 ({len(problems)} problem"
                      f"{'s' if len(problems) > 1 else ''})", problems)
    resource = copy.deepcopy(resource)
    meta = resource.get("meta")
    if isinstance(meta, dict):
        meta.pop("versionId", None)
        meta.pop("lastUpdated", None)
        if not meta:
            resource.pop("meta")
    return resource


def _new_case_id() -> str:
    return f"fhir-{uuid.uuid4().hex[:24]}"


def _skeleton(case_id: str, organization: dict, client: dict, patient_id: Optional[str] = None) -> dict:
    """The JSON of a new intake case for ``client`` (keeping the Patient id ``patient_id``)."""
    data = {"id": case_id, "program": "other", "status": "intake", "organization": organization,
            "client": copy.deepcopy(client), "opened": dt.date.today().isoformat()}
    if patient_id and CaseIds(schemas.load_case(data)).patient != patient_id:
        data["client"]["fhir"] = {**(data["client"].get("fhir") or {}), "id": patient_id}
    return data


#: where a plan names each kind of resource it holds: (element, the reference inside an item, or "")
_PLAN_LINKS = {"ServiceRequest": ("activity", "reference"), "Goal": ("goal", ""), "Condition": ("addresses", "")}


def _link(plan: dict, resource: dict) -> None:
    """Put a new resource in the plan, so the import keeps it in the case (once: a plan posted in the
    same transaction may name it already)."""
    rtype = resource["resourceType"]
    if rtype not in _PLAN_LINKS:
        return
    element, inner = _PLAN_LINKS[rtype]
    items = plan.setdefault(element, [])
    named = {reference_id(item.get(inner) if inner else item, rtype) for item in items if isinstance(item, dict)}
    if resource["id"] not in named:
        ref = {"reference": f"{rtype}/{resource['id']}"}
        items.append({inner: ref} if inner else ref)


def _case_plan(written: dict, exported: dict, case_id: str) -> dict:
    """A written CarePlan as its case's plan: the plan's id and the case's identifier, and the links that
    make the case's resources one case, whatever else the plan names. Its subject is the record's patient
    (named as the record names it when the plan names the same patient otherwise, or no one); its care
    teams keep the case's own (the record's case manager and team), with those the plan names beside it.
    Everything else is as written (goals, needs and activities the plan names in other cases stay
    references there)."""
    plan = copy.deepcopy(written)
    plan["id"] = exported["id"]
    plan["identifier"] = [i for i in plan.get("identifier", ()) if i.get("system") != ids.SID_CASE] + [
        {"system": ids.SID_CASE, "value": case_id}]
    patient_id = reference_id(exported["subject"], "Patient")
    subject = plan.get("subject")
    if not subject or reference_id(subject, "Patient") == patient_id:
        plan["subject"] = {**(subject or {}), **exported["subject"]}
    teams = plan.get("careTeam") or []
    named = {reference_id(team, "CareTeam") for team in teams}
    plan["careTeam"] = teams + [t for t in exported.get("careTeam", ()) if reference_id(t, "CareTeam") not in named]
    return plan


def _rebuild(case: Case, replace: dict[tuple[str, str], dict], add: list[dict],
             plan: Optional[dict] = None) -> dict:
    """The case's JSON after a FHIR write: its export with ``replace`` put in and ``add`` added (and
    linked from the plan), imported back into the same case."""
    bundle = case_bundle(case)
    entries = bundle["entry"]
    plan_entry = next(e for e in entries if e["resource"]["resourceType"] == "CarePlan")
    if plan is not None:
        plan_entry["resource"] = _case_plan(plan, plan_entry["resource"], case.id)
    for entry in entries:
        key = (entry["resource"]["resourceType"], entry["resource"].get("id"))
        if key in replace:
            entry["resource"] = replace[key]
    if add:
        plan_entry["resource"] = plan_resource = copy.deepcopy(plan_entry["resource"])
        for resource in add:
            _link(plan_resource, resource)
            if resource["resourceType"] == "Task":  # a referral Task replaces the one the record made
                focus = reference_id(resource.get("focus"), "ServiceRequest")
                entries[:] = [e for e in entries if not (
                    e["resource"]["resourceType"] == "Task"
                    and reference_id(e["resource"].get("focus"), "ServiceRequest") == focus)]
            entries.append({"fullUrl": f"{DEFAULT_BASE_URL}/{resource['resourceType']}/{resource['id']}",
                            "resource": resource})
    graph = fhir_input.ResourceGraph(fhir_input.parse(bundle))
    result = import_graph(graph, case.organization)
    mine = [c for c in result.cases if c.id == case.id]
    if len(result.cases) != 1 or not mine:
        raise Unprocessable("the write would not leave one case: every resource must belong to the patient's "
                            "case (subject) and the plan must keep its goals, needs and services",
                            [Problem("", "the resources would make "
                                         f"{len(result.cases)} cases instead of one")])
    data = schemas.dump_case(mine[0])
    schemas.load_case(data)  # the case rules
    return data


def _current_case(conn: Connection, store: Store, actor, resource_type: str, resource_id: str) -> tuple[Any, StoredCase]:
    row = fhir_index.locate(conn, actor.organization_id, resource_type, resource_id)
    if row is None:
        raise NotFound(f"no {resource_type}/{resource_id}")
    if row.deleted:
        raise Gone(f"{resource_type}/{resource_id} was deleted (its case was entered in error)")
    return row, store.get_case(actor.organization_id, row.case_id, conn=conn)


def parse_etag(value: Optional[str]) -> Optional[int]:
    if value is None:
        return None
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not text.isdigit():
        raise Invalid("If-Match must be a version ETag such as W/\"3\"", [Problem("If-Match", f"not a version: {value}")])
    return int(text)


def update(store: Store, actor, resource_type: str, resource_id: str, resource: Any,
           if_match: Optional[str] = None, conn: Optional[Connection] = None, path: str = "") -> Result:
    """Change a resource (its case). ``if_match`` (an ETag) must name the current version."""
    check_type(resource_type)
    written = incoming(resource, resource_type, path)
    root = path or resource_type
    if written.get("id") != resource_id:
        raise Invalid("the resource's id must be the id in the URL",
                      [Problem(f"{root}.id", f"must be {resource_id!r}, not {written.get('id')!r}")])
    expected = parse_etag(if_match)
    with (nullcontext(conn) if conn is not None else store.transaction()) as c:
        row, stored = _current_case(c, store, actor, resource_type, resource_id)
        if expected is not None and expected != stored.version:
            raise Conflict(f"{resource_type}/{resource_id} is at version {stored.version}, not {expected}",
                           [Problem("If-Match", f"the current version is W/\"{stored.version}\"")])
        targets = []
        if resource_type == "Patient":  # one Patient, several cases of the client: change them all
            targets += [store.get_case(actor.organization_id, r.case_id, conn=c)
                        for r in fhir_index.rows_of(c, actor.organization_id, "Patient", resource_id)
                        if r.case_id != stored.id]
        targets.append(stored)  # last, so it stays the newest: the one reads give
        saved = None
        for target in targets:
            case = schemas.load_case(target.data)
            if resource_type == "CarePlan":
                data = _rebuild(case, {}, [], plan=written)
            else:
                data = _rebuild(case, {(resource_type, resource_id): written}, [])
            result = store.update_case(actor.organization_id, target.id, target.version, data,
                                       actor=actor.key_id, conn=c)
            saved = result
        found = _Cases(store, actor.organization_id, c).resources(saved).get((resource_type, resource_id))
    if found is None:
        raise Unprocessable(f"the update would change the id of {resource_type}/{resource_id}",
                            [Problem(f"{root}.identifier", "this identifier names the record entity; it can't change")])
    return Result(with_meta(found, saved.version, saved.updated_at), saved.version, saved.updated_at, 200,
                  resource_type, resource_id)


def create(store: Store, actor, resource_type: str, resource: Any, if_none_exist: Optional[str] = None,
           conn: Optional[Connection] = None, path: str = "", resource_id: Optional[str] = None,
           base: str = DEFAULT_BASE_URL) -> Result:
    """Create a resource: a Patient, a ServiceRequest (an inbound referral) or a CarePlan starts a new
    case of the caller's organization (intake, or the plan's status); a Goal or Condition joins the
    patient's newest open case; a Task joins its ServiceRequest's case (``CREATES``). With
    ``if_none_exist`` (a search query), an existing match is given back instead (status 200), even
    when two such creates run at once."""
    check_type(resource_type)
    written = incoming(resource, resource_type, path)
    written["id"] = resource_id or str(uuid.uuid4())
    if if_none_exist is None:
        with (nullcontext(conn) if conn is not None else store.transaction()) as c:
            return _create(store, actor, written, c, path)
    query = [(k, v) for k, v in parse_qsl(if_none_exist.lstrip("?"), keep_blank_values=True)]
    if not query:
        raise Invalid("If-None-Exist must be a search query", [Problem("If-None-Exist", "give a search query")])
    parse_search(resource_type, query)  # a bad query is the caller's error, before anything is locked
    claim = f"fhir-lock:{resource_type}?{urlencode(sorted(query))}"[:512]
    for attempt in range(3):
        try:
            with (nullcontext(conn) if conn is not None else store.transaction()) as c:
                # the claim row is a lock: a second create with the same query waits here (or fails
                # and retries) until the first has committed, then finds what it created
                c.execute(insert(create_keys).values(organization_id=actor.organization_id, key=claim, case_id="-"))
                found = search(store, actor, resource_type, query + [("_count", "2")], base, conn=c)
                if found["total"] == 1:
                    match = found["entry"][0]["resource"]
                    c.execute(delete(create_keys).where(create_keys.c.organization_id == actor.organization_id,
                                                        create_keys.c.key == claim))
                    stamp = dt.datetime.fromisoformat(match["meta"]["lastUpdated"].replace("Z", "+00:00"))
                    return Result(match, int(match["meta"]["versionId"]), stamp, 200, resource_type, match["id"])
                if found["total"] > 1:
                    raise Conflict(f"If-None-Exist matches {found['total']} resources",
                                   [Problem("If-None-Exist", "the query matches more than one resource")])
                result = _create(store, actor, written, c, path)
                c.execute(delete(create_keys).where(create_keys.c.organization_id == actor.organization_id,
                                                    create_keys.c.key == claim))
                return result
        except IntegrityError:
            if conn is not None or attempt == 2:
                raise Conflict("another create with the same If-None-Exist is under way; try again")
    raise AssertionError("unreachable")


def _subject_case(conn: Connection, store: Store, actor, resource: dict, element: str, path: str) -> StoredCase:
    ref = resource.get(element)
    patient_id = reference_id(ref, "Patient")
    where = f"{path or resource['resourceType']}.{element}"
    if not patient_id:
        raise Unprocessable(f"{element} must reference a Patient here",
                            [Problem(where, "reference a Patient of this server (Patient/id) or of the same "
                                            "transaction")])
    try:
        _, stored = _current_case(conn, store, actor, "Patient", patient_id)
    except (NotFound, Gone):
        raise Unprocessable(f"no Patient/{patient_id}",
                            [Problem(where, f"Patient/{patient_id} is not on this server")]) from None
    return stored


def _open_case(conn: Connection, store: Store, actor, patient_case: StoredCase, patient_id: str) -> Optional[StoredCase]:
    for row in fhir_index.rows_of(conn, actor.organization_id, "Patient", patient_id):
        stored = store.get_case(actor.organization_id, row.case_id, conn=conn)
        if stored.data.get("status") in ("intake", "active", "on_hold"):
            return stored
    return None


def _create(store: Store, actor, written: dict, conn: Connection, path: str) -> Result:
    rtype, rid = written["resourceType"], written["id"]
    org = actor.organization_id
    if rtype == "Patient":
        saved = _new_case(store, actor, conn, written, [], None)
        rid = written["id"]  # the record's own id for its client's Patient
    elif rtype in ("ServiceRequest", "CarePlan"):
        source = _subject_case(conn, store, actor, written, "subject", path)
        patient_id = reference_id(written["subject"], "Patient")
        if rtype == "ServiceRequest":
            written = _as_referral(written)
            saved = _new_case(store, actor, conn, None, [written], (source, patient_id))
        else:
            saved = _new_case(store, actor, conn, None, [], (source, patient_id), plan=_new_plan(written, path))
            rid = CaseIds(schemas.load_case(saved.data)).plan
    elif rtype in ("Goal", "Condition"):
        source = _subject_case(conn, store, actor, written, "subject", path)
        patient_id = reference_id(written["subject"], "Patient")
        target = _open_case(conn, store, actor, source, patient_id)
        if target is None:
            saved = _new_case(store, actor, conn, None, [written], (source, patient_id))
        else:
            data = _rebuild(schemas.load_case(target.data), {}, [written])
            saved = store.update_case(org, target.id, target.version, data, actor=actor.key_id, conn=conn)
    else:  # Task
        focus = reference_id(written.get("focus"), "ServiceRequest")
        where = f"{path or 'Task'}.focus"
        if not focus:
            raise Unprocessable("a Task must have a ServiceRequest as its focus",
                                [Problem(where, "reference the ServiceRequest this task fulfils")])
        try:
            _, target = _current_case(conn, store, actor, "ServiceRequest", focus)
        except (NotFound, Gone):
            raise Unprocessable(f"no ServiceRequest/{focus}",
                                [Problem(where, f"ServiceRequest/{focus} is not on this server")]) from None
        existing = [t for t in _Cases(store, org, conn).resources(target).values()
                    if t["resourceType"] == "Task" and reference_id(t.get("focus"), "ServiceRequest") == focus]
        if existing:
            raise AlreadyExists(f"ServiceRequest/{focus} already has Task/{existing[0]['id']}: update that task",
                         [Problem(where, f"already the focus of Task/{existing[0]['id']}")])
        case = schemas.load_case(target.data)
        patient_ref = f"Patient/{CaseIds(case).patient}"
        if reference_id(written.get("for"), "Patient") not in (None, CaseIds(case).patient):
            raise Unprocessable("the Task is for another patient than its ServiceRequest",
                                [Problem(f"{path or 'Task'}.for", f"must be {patient_ref}")])
        data = _rebuild(case, {}, [written])
        saved = store.update_case(org, target.id, target.version, data, actor=actor.key_id, conn=conn)
    found = _Cases(store, org, conn).resources(saved).get((rtype, rid))
    if found is None:  # the record gave it its own id (a case id, a client id, ...)
        raise Unprocessable(f"the {rtype} could not be stored as sent", [Problem(path or rtype, "not kept")])
    return Result(with_meta(found, saved.version, saved.updated_at), saved.version, saved.updated_at, 201,
                  rtype, rid)


def _new_plan(plan: dict, path: str) -> dict:
    """A posted CarePlan, which starts a case: not one entered in error (that is a deletion)."""
    if plan.get("status") == "entered-in-error":
        raise Unprocessable("a new CarePlan can't be entered in error",
                            [Problem(f"{path or 'CarePlan'}.status", "a posted plan starts a case: use draft, "
                                                                     "active, on-hold, completed or revoked")])
    return plan


def _as_referral(request: dict) -> dict:
    """An inbound ServiceRequest is a referral to the case team (so it gets a Task to track)."""
    if not any(e.get("url") == ids.EXT_SERVICE_KIND for e in request.get("extension", ())):
        request = {**request, "extension": [*request.get("extension", ()),
                                            {"url": ids.EXT_SERVICE_KIND, "valueCode": "referral"}]}
    return request


def _new_case(store: Store, actor, conn: Connection, patient: Optional[dict], add: list[dict],
              source: Optional[tuple[StoredCase, str]], plan: Optional[dict] = None,
              patient_ref: Optional[str] = None) -> StoredCase:
    """A new intake case of the caller's organization: for a posted Patient, or for the client of an
    existing Patient (``source``: a case holding it, and its id); with ``add`` in it, and ``plan`` as
    its CarePlan. ``patient_ref`` is how ``add`` and ``plan`` name a posted Patient (in a transaction),
    before it has the record's id."""
    case_id = _new_case_id()
    org = {"id": actor.organization_id}
    if patient is not None:
        client = patient_map.from_fhir(patient)
        data = _skeleton(case_id, org, {"id": client.id} if client.id else {})
        patient["id"] = CaseIds(schemas.load_case(data)).patient
        replace = {("Patient", patient["id"]): patient}
        if patient_ref:
            urls = {patient_ref: f"Patient/{patient['id']}"}
            add, plan = [_rewrite(r, urls) for r in add], _rewrite(plan, urls)
    else:
        stored, patient_id = source
        if stored.data["organization"]["id"] == actor.organization_id:
            org = stored.data["organization"]
        data = _skeleton(case_id, org, stored.data.get("client") or {}, patient_id)
        replace = {}
    case = schemas.load_case(data)
    data = _rebuild(case, replace, add, plan=plan)
    return store.add_case(actor.organization_id, data, actor=actor.key_id, conn=conn)


# -- transaction and batch -------------------------------------------------------------------------
def _rewrite(value: Any, urls: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _rewrite(v, urls) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in urls:
            out["reference"] = urls[ref]
        return out
    if isinstance(value, list):
        return [_rewrite(v, urls) for v in value]
    return value


def _entry_request(entry: Any, index: int) -> tuple[str, str]:
    request = entry.get("request") if isinstance(entry, dict) else None
    where = f"Bundle.entry[{index}].request"
    if not isinstance(request, dict) or not isinstance(request.get("method"), str) \
            or not isinstance(request.get("url"), str):
        raise Invalid("every entry needs request.method and request.url", [Problem(where, "method and url required")])
    return request["method"].upper(), request["url"].lstrip("/")


def _with_entry(error: CasebridgeError, index: int) -> CasebridgeError:
    prefix = f"Bundle.entry[{index}]"
    problems = [p if p.path.startswith("Bundle.") else Problem(f"{prefix}.{p.path}" if p.path else prefix, p.message)
                for p in error.problems] or [Problem(prefix, error.message)]
    new = type(error).__new__(type(error))
    CasebridgeError.__init__(new, f"entry {index}: {error.message}", problems)
    return new


def bundle_interaction(store: Store, actor, bundle: Any, base: str, page_size: int = 50,
                       max_page_size: int = 500) -> dict:
    """POST [base] with a transaction (all or nothing) or batch (each entry on its own) Bundle."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise Invalid("POST to the base takes a Bundle", [Problem("resourceType", "must be Bundle")])
    kind = bundle.get("type")
    if kind not in ("transaction", "batch"):
        raise Invalid("the Bundle must be a transaction or a batch", [Problem("Bundle.type", "transaction or batch")])
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise Invalid("Bundle.entry must be a list", [Problem("Bundle.entry", "must be a list")])
    envelope = {k: v for k, v in bundle.items() if k != "entry"}
    envelope["entry"] = [{k: v for k, v in e.items() if k != "resource"} if isinstance(e, dict) else e
                         for e in entries]
    problems = fhir_input.validate_resource(envelope, "")
    if kind == "transaction":
        for index, entry in enumerate(entries):
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                problems += fhir_input.validate_resource(entry["resource"], f"Bundle.entry[{index}].resource")
        if problems:
            raise Invalid(f"the transaction is not valid FHIR R4 ({len(problems)} problems)", problems)
        with store.transaction() as conn:
            responses = _transaction(store, actor, entries, base, conn, page_size, max_page_size)
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": responses}
    if problems:
        raise Invalid("the batch is not valid FHIR R4", problems)
    responses = []
    for index, entry in enumerate(entries):
        try:
            method, url = _entry_request(entry, index)
            if method == "GET":
                responses.append(_get_entry(store, actor, url, base, None, page_size, max_page_size))
            else:
                with store.transaction() as conn:
                    responses.append(_write_entry(store, actor, entry, index, method, url, base, conn, {}))
        except CasebridgeError as error:
            error = _with_entry(error, index)
            from service.api.errors import operation_outcome  # the one shape of an OperationOutcome
            responses.append({"response": {"status": str(error.status),
                                           "outcome": operation_outcome(error.status, error.fhir_code,
                                                                        error.message, error.problems)}})
    return {"resourceType": "Bundle", "type": "batch-response", "entry": responses}


_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


def _transaction(store: Store, actor, entries: list, base: str, conn: Connection, page_size: int,
                 max_page_size: int) -> list[dict]:
    requests = [_entry_request(entry, i) for i, entry in enumerate(entries)]
    # ids for what is created, so references between entries can be rewritten first
    urls: dict[str, str] = {}
    ids_of: dict[int, str] = {}
    for index, (entry, (method, url)) in enumerate(zip(entries, requests)):
        if method == "POST" and isinstance(entry.get("resource"), dict):
            resource = entry["resource"]
            ids_of[index] = str(uuid.uuid4())
            if entry.get("fullUrl"):
                urls[entry["fullUrl"]] = f"{resource.get('resourceType')}/{ids_of[index]}"
    entries = [{**e, "resource": _rewrite(e["resource"], urls)} if isinstance(e.get("resource"), dict) else e
               for e in entries]
    responses: list[Optional[dict]] = [None] * len(entries)
    # a new Patient and what the same transaction posts for it make one new case
    grouped = _patient_groups(entries, requests, ids_of)
    done: set[int] = set()
    renamed: dict[str, str] = {}
    for patient_index, members in grouped.items():
        try:
            responses_of, patient_id = _create_group(store, actor, entries, patient_index, members, ids_of, conn,
                                                     base)
        except CasebridgeError as error:
            raise _with_entry(error, patient_index) from None
        for index, response in responses_of.items():
            responses[index] = response
            done.add(index)
        renamed[f"Patient/{ids_of[patient_index]}"] = f"Patient/{patient_id}"
    # what else names a new Patient (a second CarePlan: another case of the client) names it by its id
    entries = [{**e, "resource": _rewrite(e["resource"], renamed)}
               if i not in done and renamed and isinstance(e.get("resource"), dict) else e
               for i, e in enumerate(entries)]
    for index in sorted(range(len(entries)), key=lambda i: _ORDER.get(requests[i][0], 9)):
        if index in done:
            continue
        method, url = requests[index]
        try:
            if method == "GET":
                responses[index] = _get_entry(store, actor, url, base, conn, page_size, max_page_size)
            else:
                responses[index] = _write_entry(store, actor, entries[index], index, method, url, base, conn, ids_of)
        except CasebridgeError as error:
            raise _with_entry(error, index) from None
    return responses  # type: ignore[return-value]


def _patient_groups(entries: list, requests: list, ids_of: dict[int, str]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    patients = {f"Patient/{ids_of[i]}": i for i, (e, (m, _)) in enumerate(zip(entries, requests))
                if m == "POST" and isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") == "Patient"}
    requests_of: dict[str, int] = {}
    planned: set[str] = set()
    for index, (entry, (method, _)) in enumerate(zip(entries, requests)):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if method != "POST" or not isinstance(resource, dict):
            continue
        rtype = resource.get("resourceType")
        if rtype in ("ServiceRequest", "Goal", "Condition", "CarePlan"):
            subject = (resource.get("subject") or {}).get("reference")
            if subject in patients and not (rtype == "CarePlan" and subject in planned):
                groups.setdefault(patients[subject], []).append(index)
                if rtype == "CarePlan":  # the case's plan; another plan is another case of the client
                    planned.add(subject)
                if rtype == "ServiceRequest":
                    requests_of[f"ServiceRequest/{ids_of[index]}"] = patients[subject]
    for index, (entry, (method, _)) in enumerate(zip(entries, requests)):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if method == "POST" and isinstance(resource, dict) and resource.get("resourceType") == "Task":
            focus = (resource.get("focus") or {}).get("reference")
            if focus in requests_of:
                groups[requests_of[focus]].append(index)
    for patient_index in patients.values():
        groups.setdefault(patient_index, [])
    return groups


def _create_group(store: Store, actor, entries: list, patient_index: int, members: list[int],
                  ids_of: dict[int, str], conn: Connection, base: str) -> tuple[dict[int, dict], str]:
    """A posted Patient and what the transaction posts for it, as one new case: the responses by entry,
    and the Patient's id (the record's)."""
    path = f"Bundle.entry[{patient_index}].resource"
    patient = incoming(entries[patient_index]["resource"], "Patient", path)
    plan = None
    add = []
    for index in members:
        where = f"Bundle.entry[{index}].resource"
        resource = incoming(entries[index]["resource"], None, where)
        resource["id"] = ids_of[index]
        if resource["resourceType"] == "CarePlan":
            plan = _new_plan(resource, where)
        else:
            add.append(_as_referral(resource) if resource["resourceType"] == "ServiceRequest" else resource)
    saved = _new_case(store, actor, conn, patient, add, None, plan=plan,
                      patient_ref=f"Patient/{ids_of[patient_index]}")
    new_id = patient["id"]  # the record's own id for its client's Patient
    resources = _Cases(store, actor.organization_id, conn).resources(saved)
    out = {}
    for index, (rtype, rid) in [(patient_index, ("Patient", new_id))] + [
            (i, (entries[i]["resource"]["resourceType"], ids_of[i])) for i in members]:
        if rtype == "CarePlan":
            rid = CaseIds(schemas.load_case(saved.data)).plan
        found = resources.get((rtype, rid))
        out[index] = _response(Result(with_meta(found, saved.version, saved.updated_at) if found else None,
                                      saved.version, saved.updated_at, 201, rtype, rid), base)
    return out, new_id


def _response(result: Result, base: str) -> dict:
    status = {200: "200 OK", 201: "201 Created"}.get(result.status, str(result.status))
    response: dict = {"status": status}
    if result.version is not None:
        response["etag"] = f'W/"{result.version}"'
        response["location"] = f"{base}/{result.resource_type}/{result.resource_id}/_history/{result.version}"
    if result.last_updated is not None:
        response["lastModified"] = _iso(result.last_updated)
    entry: dict = {}
    if result.resource is not None:
        entry["fullUrl"] = f"{base}/{result.resource_type}/{result.resource_id}"
        entry["resource"] = result.resource
    entry["response"] = response
    return entry


def _write_entry(store: Store, actor, entry: dict, index: int, method: str, url: str, base: str,
                 conn: Connection, ids_of: dict[int, str]) -> dict:
    path = f"Bundle.entry[{index}].resource"
    resource_type, _, rest = url.partition("?")[0].partition("/")
    if method == "POST":
        check_type(resource_type)
        if rest:
            raise Invalid("POST goes to a type", [Problem(f"Bundle.entry[{index}].request.url", "use Type, not Type/id")])
        if_none_exist = (entry.get("request") or {}).get("ifNoneExist")
        return _response(create(store, actor, resource_type, entry.get("resource"), if_none_exist, conn=conn,
                                path=path, resource_id=ids_of.get(index), base=base), base)
    if method == "PUT":
        check_type(resource_type)
        if not rest or "/" in rest:
            raise Invalid("PUT goes to Type/id", [Problem(f"Bundle.entry[{index}].request.url", "use Type/id")])
        return _response(update(store, actor, resource_type, rest, entry.get("resource"),
                                (entry.get("request") or {}).get("ifMatch"), conn=conn, path=path), base)
    raise NotSupported(f"{method} is not supported in a Bundle (supported: POST, PUT, GET)",
                       [Problem(f"Bundle.entry[{index}].request.method", f"{method} is not supported")])


def _get_entry(store: Store, actor, url: str, base: str, conn: Optional[Connection], page_size: int,
               max_page_size: int) -> dict:
    path, _, query = url.partition("?")
    parts = path.split("/")
    if len(parts) == 1:
        found = search(store, actor, parts[0], parse_qsl(query, keep_blank_values=True), base, page_size,
                       max_page_size, conn=conn)
        return {"resource": found, "response": {"status": "200 OK"}}
    if len(parts) == 2:
        return _response(read(store, actor, parts[0], parts[1], conn=conn), base)
    if len(parts) == 4 and parts[2] == "_history":
        return _response(vread(store, actor, parts[0], parts[1], parts[3], conn=conn), base)
    raise NotSupported(f"GET {url} is not supported in a Bundle")


# -- the CapabilityStatement -----------------------------------------------------------------------
# What the routes serve, stated here; tests/e2e/test_fhir_capabilities.py probes the app over HTTP and
# fails on a claim the routes do not keep, or on anything served and not claimed.
#: the case types (``service.api.fhir``): each resource a view of a case record
CASE_INTERACTIONS = {
    "read": "",
    "vread": "",
    "update": "If-Match (W/\"n\") makes it version-aware: a stale version is 412; an absent id is 404 (no "
              "update as create)",
    "history-instance": "",
    "create": "If-None-Exist (a search query) gives back the one match (200) instead of creating",
    "search-type": "GET, or POST _search with a form",
}
#: the case types a POST creates, and what a create of each does to the case records (``create``)
CREATES = {
    "Patient": "A Patient starts a new intake case, with the Patient as its client.",
    "CarePlan": "A CarePlan starts a new case for its subject's client (its status is the case's: draft is "
                "intake; not entered-in-error). The plan keeps the case's own care team beside any it names; "
                "goals, conditions and activities it names in other cases stay references to them.",
    "Goal": "A Goal joins its subject's newest open case (else starts one).",
    "ServiceRequest": "A ServiceRequest is an inbound referral: it starts a new intake case for its subject's "
                      "client, with a Task to track it. If-None-Exist: identifier=system|value keeps a resent "
                      "referral single.",
    "Condition": "A Condition joins its subject's newest open case (else starts one).",
    "Task": "A Task joins its focus ServiceRequest's case (one Task per ServiceRequest).",
}
CREATED_TYPES = tuple(CREATES)  # every case type
EVERYTHING = {"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
              "documentation": "GET Patient/[id]/$everything: the patient and every resource of every case of the "
                               "patient, in one page; no parameter but _format (start, end, _since, _type and "
                               "_count are refused)"}
#: AuditEvent (``service.api.audit``): the caller's organization's audit trail, for the admin scope
AUDIT_EVENT_INTERACTIONS = {"read": "", "search-type": "GET only"}
AUDIT_EVENT_PARAMS = {
    "date": Param("date", "date", doc="when the event was recorded: eq, gt, ge, lt or le; repeat it for a range"),
    "entity": Param("reference", "reference", doc="what the event is about: Type/id or an id (a case's events "
                                                  "through its CarePlan)"),
}


def _interactions(documented: dict[str, str]) -> list[dict]:
    return [{"code": code, **({"documentation": doc} if doc else {})} for code, doc in documented.items()]


def _search_params(params: dict[str, Param]) -> list[dict]:
    return [{"name": name, "type": p.fhir_type, "documentation": p.doc} for name, p in params.items()]


def _case_resource(rtype: str) -> dict:
    created = rtype in CREATED_TYPES
    resource = {
        "type": rtype,
        "profile": f"http://hl7.org/fhir/StructureDefinition/{rtype}",
        "interaction": _interactions({k: v for k, v in CASE_INTERACTIONS.items() if created or k != "create"}),
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": False,
        "conditionalCreate": created,
        "conditionalRead": "not-supported",
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
        "searchInclude": [k for k, v in INCLUDES.items() if v[0] == rtype],
        "searchRevInclude": REVINCLUDES.get(rtype, []),
        "searchParam": _search_params({**COMMON, **PARAMS[rtype]}),
    }
    for key in ("searchInclude", "searchRevInclude"):
        if not resource[key]:
            del resource[key]
    if not created:
        resource["documentation"] = (f"No create: a {rtype} comes with its case (create a Patient or a "
                                     "ServiceRequest), and changes with update.")
    else:
        resource["documentation"] = CREATES[rtype]
    if rtype == "Patient":
        resource["operation"] = [EVERYTHING]
    return resource


def _audit_event_resource() -> dict:
    return {
        "type": "AuditEvent",
        "profile": "http://hl7.org/fhir/StructureDefinition/AuditEvent",
        "documentation": "The audit trail of the caller's organization, for a key with the admin scope. Events "
                         "have no versions. Search takes date, entity and _count; any other parameter is "
                         "refused (400).",
        "interaction": _interactions(AUDIT_EVENT_INTERACTIONS),
        "versioning": "no-version",
        "readHistory": False,
        "updateCreate": False,
        "conditionalCreate": False,
        "conditionalRead": "not-supported",
        "conditionalUpdate": False,
        "conditionalDelete": "not-supported",
        "searchParam": _search_params(AUDIT_EVENT_PARAMS),
    }


def capability_statement(base: str) -> dict:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": dt.date.today().isoformat(),
        "publisher": "casebridge",
        "kind": "instance",
        "software": {"name": "casebridge"},
        "implementation": {"description": "casebridge FHIR R4 API: case records as FHIR", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "Every resource but AuditEvent is a view of a case record; a write changes the case. "
                             "Search parameters not listed are refused (400). Paging: "
                             "_count with next links. DELETE, PATCH, conditional update and XML are not "
                             "supported.",
            "security": {"cors": False, "description": "Authorization: Bearer <API key>, with the fhir:read and "
                                                       "fhir:write scopes (AuditEvent: the admin scope)"},
            "resource": [*(_case_resource(rtype) for rtype in TYPES), _audit_event_resource()],
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
        }],
    }
