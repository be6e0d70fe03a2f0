"""The audit trail over HTTP, for an organization's admins: ``GET /audit`` (JSON) and
``GET /fhir/AuditEvent`` / ``GET /fhir/AuditEvent/{id}`` (FHIR R4 AuditEvent). Both need the
``admin`` scope and show only the caller's own organization's events.

The AuditEvent routes follow the rules of every other ``/fhir`` route, by the same code: the FHIR
blueprint's format check (``_format`` and ``Accept``: JSON or a 406) and its read check (no parameter
but ``_format``). Both surfaces refuse a parameter they do not know, or one given twice, with a 400
naming it: never ignored."""
from __future__ import annotations

import calendar
import datetime as dt
import re
from typing import Optional
from urllib.parse import urlencode

import orjson
from flask import Blueprint, Response, request

from service import actor, audit, runtime
from service.api import fhir as fhir_api
from service.errors import Invalid, NotFound, Problem
from service.fhir_services import AUDIT_EVENT_PARAMS

bp = Blueprint("audit", __name__)
fhir_bp = Blueprint("fhir_audit", __name__)
fhir_bp.before_request(fhir_api.negotiate)  # the /fhir content negotiation, for these routes too

#: the query parameters of GET /audit
AUDIT_PARAMS = ("entity", "since", "limit", "cursor")
#: the query parameters of GET /fhir/AuditEvent: the search parameters the CapabilityStatement states,
#: then the result and paging controls (``_cursor`` comes from the Bundle's next link)
AUDIT_EVENT_SEARCH = (*AUDIT_EVENT_PARAMS, "_count", "_format", "_cursor")
#: the ones that may be given more than once: ``date`` (each must hold: a range) and, as on every /fhir
#: route, ``_format`` (the first one counts)
REPEATABLE = frozenset({"date", "_format"})

FHIR_JSON = "application/fhir+json"


@bp.get("/audit")
def list_events():
    """Newest first. Filters: ``entity`` (``Type/id`` or an id), ``since`` (a date or date-time);
    paging: ``limit`` and the ``cursor`` of the ``next`` link."""
    who = actor("admin")
    _check_params(AUDIT_PARAMS, "GET /audit")
    limit = _page_size(request.args.get("limit"), "limit")
    dates = []
    if request.args.get("since"):
        start, _end = _period(request.args["since"], "since")
        dates.append(("ge", start, start))
    audit.flush()
    events = audit.search(runtime().store, who.organization_id, entity=request.args.get("entity") or None,
                          dates=dates, before_id=_cursor(request.args.get("cursor"), "cursor"), limit=limit + 1)
    page, more = events[:limit], len(events) > limit
    next_link = None
    if more:
        args = {k: v for k, v in request.args.items() if k != "cursor"} | {"cursor": str(page[-1].id)}
        root = runtime().settings.base_url.rstrip("/") or request.host_url.rstrip("/")
        next_link = f"{root}{request.path}?{urlencode(args)}"
    return _json({"items": [audit.to_json(e) for e in page], "next": next_link}, "application/json")


@fhir_bp.get("/AuditEvent")
def search_audit_events():
    """Search parameters: ``date`` (with the prefixes eq, gt, ge, lt, le; repeat it for a range),
    ``entity`` (a reference), ``_count``; paging follows the Bundle's ``next`` link."""
    who = actor("admin")
    _check_params(AUDIT_EVENT_SEARCH, "AuditEvent", search=True)
    limit = _page_size(request.args.get("_count"), "_count")
    dates = [_date_param(value) for value in request.args.getlist("date")]
    entity = request.args.get("entity") or None
    store = runtime().store
    audit.flush()
    events = audit.search(store, who.organization_id, entity=entity, dates=dates,
                          before_id=_cursor(request.args.get("_cursor"), "_cursor"), limit=limit + 1)
    page, more = events[:limit], len(events) > limit
    plans = audit.careplan_ids(store, page)
    base = _base_url()
    params = [(k, v) for k in ("date", "entity") for v in request.args.getlist(k)] + [("_count", str(limit))]
    links = [{"relation": "self", "url": f"{base}/AuditEvent?{urlencode(params)}"}]
    if more:
        links.append({"relation": "next",
                      "url": f"{base}/AuditEvent?{urlencode(params + [('_cursor', str(page[-1].id))])}"})
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": [{"fullUrl": f"{base}/AuditEvent/{e.id}", "resource": audit.to_fhir(e, plans),
                   "search": {"mode": "match"}} for e in page],
    }
    return _json(bundle, FHIR_JSON)


@fhir_bp.get("/AuditEvent/<event_id>")
def read_audit_event(event_id: str):
    who = actor("admin")
    fhir_api.only_format()
    store = runtime().store
    audit.flush()
    event = audit.get(store, who.organization_id, int(event_id)) if event_id.isdigit() else None
    if event is None:
        raise NotFound(f"no AuditEvent {event_id}")
    return _json(audit.to_fhir(event, audit.careplan_ids(store, [event])), FHIR_JSON)


# -- parameters -----------------------------------------------------------------------------------
def _check_params(known: tuple[str, ...], where: str, search: bool = False) -> None:
    """Every query parameter is one of ``known``, and given once unless it may repeat: else a 400 that
    names each offending parameter (an OperationOutcome under /fhir, problem+json elsewhere)."""
    problems = []
    for name in request.args:
        base, _, modifier = name.partition(":")
        if modifier and search and base in known:
            problems.append(Problem(name, f"the :{modifier} modifier is not supported"))
        elif name not in known:
            what = "search parameter" if search else "parameter"
            problems.append(Problem(name, f"unknown {what} for {where} (supported: {', '.join(known)})"))
        elif name not in REPEATABLE and len(request.args.getlist(name)) > 1:
            problems.append(Problem(name, f"given {len(request.args.getlist(name))} times: give it once"))
    if problems:
        raise Invalid(f"the {'search' if search else 'query'} is not valid ({len(problems)} problem"
                      f"{'s' if len(problems) > 1 else ''})", problems)


def _json(body: dict, mimetype: str) -> Response:
    return Response(orjson.dumps(body), mimetype=mimetype)


def _base_url() -> str:
    configured = runtime().settings.base_url.rstrip("/")
    root = configured or request.host_url.rstrip("/")
    return f"{root}/fhir"


def _page_size(value: Optional[str], name: str) -> int:
    settings = runtime().settings
    if value is None or value == "":
        return settings.page_size
    if not value.isdigit() or int(value) < 1:
        raise Invalid(f"{name} must be a positive whole number", [Problem(name, "must be a positive whole number")])
    return min(int(value), settings.max_page_size)


def _cursor(value: Optional[str], name: str) -> Optional[int]:
    if value is None or value == "":
        return None
    if not value.isdigit():
        raise Invalid(f"{name} is not a cursor this server gave", [Problem(name, "not a cursor this server gave")])
    return int(value)


_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def _period(value: str, name: str) -> tuple[dt.datetime, dt.datetime]:
    """The period a FHIR date or dateTime names, as [start, end) in UTC: a year, month, day or instant."""
    match = _DATE.match(value)
    try:
        if match:
            year, month, day = int(match[1]), int(match[2] or 1), int(match[3] or 1)
            start = dt.datetime(year, month, day, tzinfo=dt.timezone.utc)
            if match[3]:
                end = start + dt.timedelta(days=1)
            elif match[2]:
                end = start + dt.timedelta(days=calendar.monthrange(year, month)[1])
            else:
                end = start.replace(year=year + 1)
            return start, end
        stamp = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        stamp = None
    if stamp is None or "T" not in value:
        raise Invalid(f"{name} is not a date or date-time",
                      [Problem(name, f"{value!r} is not a date (2024-05-01) or date-time (2024-05-01T10:00:00Z)")])
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    stamp = stamp.astimezone(dt.timezone.utc)
    precision = dt.timedelta(microseconds=1) if stamp.microsecond else dt.timedelta(seconds=1)
    return stamp, stamp + precision


def _date_param(value: str) -> tuple[str, dt.datetime, dt.datetime]:
    prefix = value[:2] if value[:2].isalpha() else "eq"
    if value[:2].isalpha() and prefix not in audit.DATE_PREFIXES:
        raise Invalid("unsupported date prefix", [Problem("date", f"use one of {', '.join(audit.DATE_PREFIXES)}")])
    start, end = _period(value[2:] if value[:2].isalpha() else value, "date")
    return prefix, start, end
