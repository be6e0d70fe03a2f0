"""The FHIR search index: which resources each case converts to, and the values their search
parameters need.

A FHIR resource here is a view of a case record, so the index is rewritten from the case inside
every case save (``write_rows`` is a save hook of the store): a search never sees a case half
saved, and the index can always be rebuilt from the cases. A resource's version is its case's version.

One row per (resource type, resource id, case). A resource id is unique per type within an
organization except for a client's Patient, which every case of that client converts to: it has a
row per case, and the *current* row (``current_rows``) is the one of the newest case that is not
deleted (entered in error), so a read gives the most recently updated case's Patient and a search
gives it once. A case entered in error keeps its rows, marked ``deleted``, so that its resources
answer 410 Gone rather than 404.

Dates are indexed as ranges (``date_lo`` inclusive, ``date_hi`` exclusive, UTC ISO text that sorts
as it compares), so a partial date such as ``1957-04`` is the whole month, as FHIR search wants.
"""
from __future__ import annotations

import datetime as dt
import re
from typing import Iterable, Optional

from sqlalchemy import and_, bindparam, delete, exists, false, insert, or_, select
from sqlalchemy.engine import Connection

from mappings.export import case_resources
from service import schemas
from service.store import StoredCase, fhir_resources, fhir_tokens, write

#: the resource types the FHIR API serves (each a view of part of a case)
TYPES = ("Patient", "CarePlan", "Goal", "ServiceRequest", "Condition", "Task")

MIN_DATE = "0001-01-01T00:00:00"
MAX_DATE = "9999-12-31T23:59:59"

_DATE = re.compile(r"(?P<y>[0-9]{4})(?:-(?P<m>[0-9]{2})(?:-(?P<d>[0-9]{2})"
                   r"(?:T(?P<H>[0-9]{2}):(?P<M>[0-9]{2})(?::(?P<S>[0-9]{2})(?:\.[0-9]+)?)?"
                   r"(?P<tz>Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?")


def date_range(text: str) -> Optional[tuple[str, str]]:
    """The range a FHIR date, dateTime or instant stands for, as sortable UTC text; None when it is
    not one. A time without a zone is taken as UTC."""
    match = _DATE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        return None
    try:
        year = int(match["y"])
        if match["m"] is None:
            lo, hi = dt.datetime(year, 1, 1), _add_years(year, 1)
        elif match["d"] is None:
            month = int(match["m"])
            lo = dt.datetime(year, month, 1)
            hi = dt.datetime(year + month // 12, month % 12 + 1, 1)
        elif match["H"] is None:
            lo = dt.datetime(year, int(match["m"]), int(match["d"]))
            hi = lo + dt.timedelta(days=1)
        else:
            lo = dt.datetime(year, int(match["m"]), int(match["d"]), int(match["H"]), int(match["M"]),
                             int(match["S"] or 0))
            hi = lo + (dt.timedelta(seconds=1) if match["S"] else dt.timedelta(minutes=1))
            zone = match["tz"]
            if zone and zone != "Z":
                sign = 1 if zone[0] == "+" else -1
                offset = dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])) * sign
                lo, hi = lo - offset, hi - offset
    except (ValueError, OverflowError):
        return None
    return _text(lo), _text(hi)


def _add_years(year: int, n: int) -> dt.datetime:
    return dt.datetime(year + n, 1, 1) if year + n <= 9999 else dt.datetime(9999, 12, 31, 23, 59, 59)


def _text(stamp: dt.datetime) -> str:
    return stamp.strftime("%Y-%m-%dT%H:%M:%S").rjust(19, "0")


def reference_id(ref: object, resource_type: str) -> Optional[str]:
    """The id a reference (``Type/id``, ``base/Type/id``, ``Type/id/_history/v``) points at, when it
    points at a ``resource_type``."""
    text = ref.get("reference") if isinstance(ref, dict) else ref
    if not isinstance(text, str):
        return None
    text = text.split("/_history/", 1)[0]
    parts = text.rsplit("/", 2)
    if len(parts) >= 2 and parts[-2] == resource_type and parts[-1]:
        return parts[-1]
    return None


# -- what a resource is found by -------------------------------------------------------------------
def _codings(concepts: Iterable) -> Iterable[tuple[Optional[str], str]]:
    for concept in concepts or ():
        for coding in (concept or {}).get("coding", ()) if isinstance(concept, dict) else ():
            if coding.get("code"):
                yield coding.get("system"), coding["code"]


def _merge_ranges(values: Iterable[Optional[str]]) -> tuple[Optional[str], Optional[str]]:
    ranges = [r for r in (date_range(v) for v in values if v) if r]
    if not ranges:
        return None, None
    return min(r[0] for r in ranges), max(r[1] for r in ranges)


def identifier_tokens(resource: dict) -> list[tuple[str, Optional[str], str]]:
    """The ``identifier`` tokens of a resource: (param, system, value) of each identifier with a value."""
    return [("identifier", i.get("system"), i["value"]) for i in resource.get("identifier", ()) if i.get("value")]


def search_values(resource: dict) -> tuple[dict, list[tuple[str, Optional[str], str]]]:
    """(the row's search columns, the (param, system, code) tokens) of one resource."""
    rtype = resource["resourceType"]
    row: dict = {"patient_id": None, "status": None, "date_lo": None, "date_hi": None, "name": None,
                 "gender": None}
    tokens: list[tuple[str, Optional[str], str]] = []
    if rtype == "Patient":
        row["patient_id"] = resource["id"]
        words = []
        for name in resource.get("name", ()):
            for part in [name.get("text"), name.get("family"), *name.get("given", ()), *name.get("prefix", ()),
                         *name.get("suffix", ())]:
                if part:
                    words.extend(part.lower().split())
        row["name"] = " " + " ".join(words) + " " if words else None
        row["gender"] = resource.get("gender")
        row["date_lo"], row["date_hi"] = _merge_ranges([resource.get("birthDate")])
        tokens += identifier_tokens(resource)
    else:
        subject = resource.get("for" if rtype == "Task" else "subject")
        row["patient_id"] = reference_id(subject, "Patient")
    if rtype == "CarePlan":
        row["status"] = resource.get("status")
        period = resource.get("period") or {}
        if period:
            start = date_range(period["start"]) if period.get("start") else None
            end = date_range(period["end"]) if period.get("end") else None
            row["date_lo"] = start[0] if start else MIN_DATE
            row["date_hi"] = end[1] if end else MAX_DATE
        tokens += [("category", s, c) for s, c in _codings(resource.get("category"))]
        tokens += [("goal", None, g) for g in (reference_id(r, "Goal") for r in resource.get("goal", ())) if g]
    elif rtype == "Goal":
        row["status"] = resource.get("lifecycleStatus")
        row["date_lo"], row["date_hi"] = _merge_ranges(t.get("dueDate") for t in resource.get("target", ()))
        tokens += [("category", s, c) for s, c in _codings(resource.get("category"))]
    elif rtype == "ServiceRequest":
        row["status"] = resource.get("status")
        row["date_lo"], row["date_hi"] = _merge_ranges([resource.get("authoredOn")])
        tokens += [("category", s, c) for s, c in _codings(resource.get("category"))]
        tokens += [("code", s, c) for s, c in _codings([resource.get("code")])]
        tokens += identifier_tokens(resource)
    elif rtype == "Condition":
        tokens += [("category", s, c) for s, c in _codings(resource.get("category"))]
        tokens += [("code", s, c) for s, c in _codings([resource.get("code")])]
    elif rtype == "Task":
        row["status"] = resource.get("status")
        focus = reference_id(resource.get("focus"), "ServiceRequest")
        if focus:
            tokens.append(("focus", None, focus))
    return row, tokens


# -- the save hook -------------------------------------------------------------------------------
def is_deleted(stored: StoredCase) -> bool:
    return stored.deleted or stored.data.get("status") == "entered_in_error"


def rows_of_record(data: dict) -> list[tuple[str, str, dict, list]]:
    """What a case record puts in the index, by resource: (type, id, search values, tokens). Needs the
    record only, so a save works it out before its transaction opens (``Store.add_save_hook``)."""
    found, seen = [], set()
    for resource in case_resources(schemas.load_case(data)):
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if rtype not in TYPES or not rid or (rtype, rid) in seen:
            continue
        seen.add((rtype, rid))
        values, tokens = search_values(resource)
        found.append((rtype, rid, values, list(dict.fromkeys(tokens))))
    return found


_DELETE_TOKENS = delete(fhir_tokens).where(fhir_tokens.c.case_id == bindparam("case_id"))
_DELETE_ROWS = delete(fhir_resources).where(fhir_resources.c.case_id == bindparam("case_id"))
_INSERT_ROWS, _INSERT_TOKENS = insert(fhir_resources), insert(fhir_tokens)


def write_rows(conn: Connection, stored: StoredCase, prepared: Optional[list] = None) -> None:
    """Rewrite the case's rows (a save hook: runs inside the case's save, with what
    ``rows_of_record`` prepared)."""
    if stored.version > 1:  # a new case has no rows yet
        write(conn, _DELETE_TOKENS, {"case_id": stored.id})
        write(conn, _DELETE_ROWS, {"case_id": stored.id})
    if prepared is None:
        prepared = rows_of_record(stored.data)
    deleted, org, case_id = is_deleted(stored), stored.organization_id, stored.id
    rows, token_rows = [], []
    for rtype, rid, values, tokens in prepared:
        rows.append({**values, "resource_type": rtype, "resource_id": rid, "case_id": case_id,
                     "organization_id": org, "version": stored.version, "last_updated": stored.updated_at,
                     "deleted": deleted})
        token_rows += [{"resource_type": rtype, "resource_id": rid, "case_id": case_id, "organization_id": org,
                        "param": param, "system": system or None, "code": code[:255]}
                       for param, system, code in tokens]
    if rows:
        write(conn, _INSERT_ROWS, rows)
    if token_rows:
        write(conn, _INSERT_TOKENS, token_rows)


def index_case(conn: Connection, stored: StoredCase) -> None:
    """Rewrite the case's rows from the record alone (rebuilding the index, tests)."""
    write_rows(conn, stored)


# -- reading the index -----------------------------------------------------------------------------
_NEWER = fhir_resources.alias("newer")


def _newer_exists():
    """A newer row of the same resource: one of a case updated later (ties: the greater case id),
    a case that is not deleted winning over one that is."""
    r, other = fhir_resources, _NEWER
    return exists().where(
        other.c.organization_id == r.c.organization_id, other.c.resource_type == r.c.resource_type,
        other.c.resource_id == r.c.resource_id,
        or_(and_(other.c.deleted == false(), r.c.deleted == True),  # noqa: E712 - SQL, not Python
            and_(other.c.deleted == r.c.deleted,
                 or_(other.c.last_updated > r.c.last_updated,
                     and_(other.c.last_updated == r.c.last_updated, other.c.case_id > r.c.case_id)))))


_NO_NEWER = ~_newer_exists()


def current_rows(organization_id, resource_type: Optional[str] = None, include_deleted: bool = False):
    """A SELECT of the organization's current rows: for each (type, id) the row of the newest case,
    a case that is not deleted winning over one that is. ``organization_id`` (and ``resource_type``)
    may be bind parameters, for a statement built once and run many times."""
    r = fhir_resources
    query = select(r).where(r.c.organization_id == organization_id, _NO_NEWER)
    if resource_type is not None:
        query = query.where(r.c.resource_type == resource_type)
    if not include_deleted:
        query = query.where(r.c.deleted == false())
    return query


_LOCATE = current_rows(bindparam("org"), bindparam("type"), include_deleted=True).where(
    fhir_resources.c.resource_id == bindparam("id"))


def locate(conn: Connection, organization_id: str, resource_type: str, resource_id: str):
    """The current row of a resource (deleted or not), or None."""
    return conn.execute(_LOCATE, {"org": organization_id, "type": resource_type, "id": resource_id}).first()


def rows_of(conn: Connection, organization_id: str, resource_type: str, resource_id: str,
            include_deleted: bool = False) -> list:
    """Every case's row of a resource, newest first."""
    query = select(fhir_resources).where(
        fhir_resources.c.organization_id == organization_id, fhir_resources.c.resource_type == resource_type,
        fhir_resources.c.resource_id == resource_id)
    if not include_deleted:
        query = query.where(fhir_resources.c.deleted == false())
    return list(conn.execute(query.order_by(fhir_resources.c.last_updated.desc(), fhir_resources.c.case_id.desc())))
