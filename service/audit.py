"""The audit trail: who touched which case, how, when, and with what outcome.

Views say what a request touched with :func:`note`; an ``after_request`` hook (:func:`init_app`)
then writes one row per request that noted something — failures included (404, 412, ...) — with one
INSERT that can never break the response. Requests to the case routes (the JSON API and the FHIR API)
that were refused before a view ran (401, 403, 400, ...) are recorded too, with the entity taken from
the URL path. An event holds ids, never case contents.

A request that writes several cases (``POST /import``, a FHIR transaction or batch Bundle) names
each of them too (:func:`note_imported`, :func:`note_bundle_entries`): one row per case, with what the
request did to it, beside the request's own row.

Rows are written in batches from a background thread; rows the database does not take (it is down,
say) wait in a spool file until it does (``service.audit_writer``).

Events are read back as JSON (:func:`to_json`, ``GET /audit``) and as FHIR R4 AuditEvent resources
(:func:`to_fhir`, ``GET /fhir/AuditEvent``), always within one organization.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from sqlalchemy import and_, or_, select

from mappings import ids
from service.audit_writer import AuditWriter, Spool, spool_path
from service.store import Store, audit_events, cases, fhir_resources, now

log = logging.getLogger("casebridge.audit")

#: the entity type a case record is audited as (its FHIR face is the case's CarePlan)
CASE = "Case"

#: FHIR restful interactions (http://hl7.org/fhir/restful-interaction) and the AuditEvent.action of each
INTERACTION_ACTIONS = {
    "create": "C",
    "read": "R", "vread": "R", "history": "R", "history-instance": "R", "history-type": "R",
    "history-system": "R",
    "update": "U", "patch": "U",
    "delete": "D",
    "search": "E", "search-type": "E", "search-system": "E", "capabilities": "E", "transaction": "E",
    "batch": "E", "operation": "E",
}

AUDIT_EVENT_TYPE = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                    "display": "RESTful Operation"}
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
CS_OPERATION = f"{ids.BASE}/CodeSystem/operation"
SID_API_KEY = f"{ids.BASE}/sid/api-key"
SID_SYSTEM = f"{ids.BASE}/sid/system"
ENTITY_TYPE_SYSTEM_OBJECT = {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                             "display": "System Object"}
SOURCE_TYPE_WEB_SERVER = {"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "3",
                          "display": "Web Server"}
OUTCOME_DESCRIPTIONS = {"0": "Success", "4": "Minor failure", "8": "Serious failure"}

_METHOD_ACTIONS = {"POST": "C", "GET": "R", "HEAD": "R", "PUT": "U", "PATCH": "U", "DELETE": "D"}
_G_KEY = "casebridge_audit"
_G_MORE = "casebridge_audit_more"
_G_STARTED = "casebridge_audit_started"

#: what ``POST /import`` did to each case it matched (the outcomes ``services.import_fhir`` answers),
#: as an interaction: an unchanged case was read (compared, and its id and version answered)
IMPORT_INTERACTIONS = {"created": "create", "updated": "update", "unchanged": "read"}
_STRENGTH = {"read": 0, "update": 1, "create": 2}

#: the longest entity id a row takes (one from a URL may be longer: PostgreSQL would refuse it, and
#: with it every row written beside it)
_ENTITY_ID_LENGTH = audit_events.c.entity_id.type.length


# -- recording ------------------------------------------------------------------------------------
@dataclass
class _Noted:
    entity_type: str
    entity_id: Optional[str]
    operation: Optional[str]


def note(entity_type: str, entity_id: Optional[str] = None, *, operation: Optional[str] = None) -> None:
    """Say what this request touches: ``note("Case", case_id)``, ``note("Patient", id)``, or
    ``note("Case")`` for a search. ``operation`` names the FHIR interaction when the method and path
    cannot tell (``transaction``, ``batch``, ``search-type`` on POST ``_search``, ``operation``).

    Call it before the work that may fail, so a refused or failed request is recorded too. A later
    call replaces an earlier one: the row names one entity.
    """
    from flask import g

    setattr(g, _G_KEY, _Noted(entity_type, None if entity_id is None else str(entity_id), operation))


def note_written(entity_type: str, entity_id: str, operation: str) -> None:
    """Name one more entity this request touched, beside the one :func:`note` names: it gets a row of
    its own, with ``operation`` and the request's time, caller and outcome. For a request that
    writes several cases at once; call it once the work is done."""
    from flask import g

    more = g.get(_G_MORE)
    if more is None:
        more = []
        setattr(g, _G_MORE, more)
    more.append(_Noted(entity_type, str(entity_id), operation))


def note_imported(imported: Iterable[dict]) -> None:
    """Name each case ``POST /import`` matched (its answer's ``cases``: ``{"id", "outcome"}`` each)."""
    for case in imported:
        note_written(CASE, case["id"], IMPORT_INTERACTIONS.get(case.get("outcome"), "update"))


def note_bundle_entries(store: Store, organization_id: str, bundle: dict, answer: dict) -> None:
    """Name each case a FHIR transaction or batch Bundle read or wrote, from its answer."""
    _note_cases_of(store, organization_id, _bundle_resources(bundle, answer))


def note_resource_written(store: Store, organization_id: str, resource_type: str, resource_id: str) -> None:
    """Name the case, or cases, a single FHIR create or update wrote."""
    _note_cases_of(store, organization_id, {(resource_type, resource_id): "update"})


def _note_cases_of(store: Store, organization_id: str, touched: dict[tuple[str, str], str]) -> None:
    """Name the cases of the resources ``touched`` (each with its interaction). A resource is a view
    of a case, or of several (a client's Patient is in each of their cases). A case gets ``create``
    when this request made it, else ``update`` when the request wrote any of its resources, else
    ``read``."""
    from flask import g

    if not touched:
        return
    try:
        found = _cases_of(store, organization_id, list(touched))
    except Exception as error:  # noqa: BLE001 - the work is done: name its resources instead
        log.error("could not find the cases of %d resources for the audit: %s", len(touched), type(error).__name__)
        for (rtype, rid), interaction in touched.items():
            note_written(rtype, rid, interaction)
        return
    started = g.get(_G_STARTED) or now()
    named: dict[str, str] = {}
    for (rtype, rid), case_id, created_at in found:
        interaction = touched[(rtype, rid)]
        if interaction != "read":
            interaction = "create" if _aware(created_at) >= started else "update"
        if _STRENGTH[interaction] > _STRENGTH.get(named.get(case_id, ""), -1):
            named[case_id] = interaction
    for case_id, interaction in named.items():
        note_written(CASE, case_id, interaction)


def _bundle_resources(bundle: dict, answer: dict) -> dict[tuple[str, str], str]:
    """The resources a Bundle's entries touched, in entry order, from the answer's locations
    (``.../Type/id/_history/n``): a 201 is a create, a 2xx to a PUT an update, anything else a read
    (a GET, or a conditional create that found its match)."""
    touched: dict[tuple[str, str], str] = {}
    for entry, answered in zip(_list(_dict(bundle).get("entry")), _list(_dict(answer).get("entry"))):
        response = _dict(_dict(answered).get("response"))
        location = response.get("location")
        parts = location.split("/_history/")[0].rstrip("/").split("/") if isinstance(location, str) else []
        if len(parts) < 2:
            continue
        status = str(response.get("status", ""))
        method = str(_dict(_dict(entry).get("request")).get("method", "")).upper()
        interaction = ("create" if status.startswith("201") else
                       "update" if method == "PUT" and status.startswith("2") else "read")
        key = (parts[-2], parts[-1])
        if _STRENGTH[interaction] > _STRENGTH.get(touched.get(key, ""), -1):
            touched[key] = interaction
    return touched


def _cases_of(store: Store, organization_id: str,
              resources: Sequence[tuple[str, str]]) -> list[tuple[tuple[str, str], str, dt.datetime]]:
    """((type, id), case id, when the case was made) for each case each resource is in, in the order
    of ``resources``."""
    wanted = set(resources)
    query = (select(fhir_resources.c.resource_type, fhir_resources.c.resource_id, fhir_resources.c.case_id,
                    cases.c.created_at)
             .join(cases, cases.c.id == fhir_resources.c.case_id)
             .where(fhir_resources.c.organization_id == organization_id,
                    fhir_resources.c.resource_type.in_(sorted({rtype for rtype, _ in wanted})),
                    fhir_resources.c.resource_id.in_(sorted({rid for _, rid in wanted}))))
    with store.reader.connect() as conn:
        rows = conn.execute(query).all()
    found = [((r.resource_type, r.resource_id), r.case_id, r.created_at) for r in rows
             if (r.resource_type, r.resource_id) in wanted]
    order = {key: index for index, key in enumerate(resources)}
    return sorted(found, key=lambda item: (order[item[0]], item[1]))


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _aware(stamp: dt.datetime) -> dt.datetime:
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=dt.timezone.utc)


def init_app(app) -> None:
    """Write the audit rows of each request, after the view (and any error handler) has answered;
    and, first, what an earlier run left in the spool."""
    from flask import g

    runtime = app.extensions["casebridge"]
    writer = AuditWriter(runtime.store, Spool(spool_path(runtime.settings.home, runtime.store)))
    app.extensions["casebridge_audit"] = writer
    writer.flush()  # touches the database only when the spool holds rows

    @app.before_request
    def _note_start():
        setattr(g, _G_STARTED, now())  # what a request made is told apart from what it changed

    @app.after_request
    def _write_audit_event(response):
        try:
            for row in _rows_for_request(response.status_code):
                writer.add(row)
        except Exception as error:  # noqa: BLE001 - the audit must never break the response
            log.error("could not record the audit event: %s", type(error).__name__)
        return response


def flush(app=None) -> None:
    """Write every audit row still waiting (before the trail is read)."""
    from flask import current_app

    writer = (app or current_app).extensions.get("casebridge_audit")
    if writer is not None:
        writer.flush()


def _rows_for_request(status: int) -> list[dict]:
    """The request's row, then a row for each entity :func:`note_written` named; none for a request
    that touched no case."""
    from flask import g, request

    noted: Optional[_Noted] = g.get(_G_KEY)
    rule = request.url_rule
    if noted is None:
        # refused before a view said what it touched: record attempts on the case routes
        if status < 400 or rule is None or not _is_case_route(request.blueprint):
            return []
        entity = entity_from_path(request.path)
        if entity is None:
            return []
        noted = _Noted(entity[0], entity[1], None)
    actor = g.get("actor")
    common = {
        "recorded_at": now(),
        "organization_id": actor.organization_id if actor is not None else None,
        "key_id": actor.key_id if actor is not None else None,
        "outcome": status,
    }
    path = rule.rule if rule is not None else None
    named = [(noted, noted.operation or interaction(request.method, request.path))]
    named += [(more, more.operation) for more in g.get(_G_MORE) or ()]
    return [{
        **common,
        "action": INTERACTION_ACTIONS.get(operation) or _METHOD_ACTIONS.get(request.method, "E"),
        "operation": operation,
        "entity_type": what.entity_type,
        "entity_id": what.entity_id[:_ENTITY_ID_LENGTH] if what.entity_id is not None else None,
        "detail": {"method": request.method, "path": path},
    } for what, operation in named]


def _is_case_route(blueprint: Optional[str]) -> bool:
    return blueprint in ("cases", "fhir")


def entity_from_path(path: str) -> Optional[tuple[str, Optional[str]]]:
    """The entity a case route names: ``/cases/<id>/...`` → ("Case", id), ``/fhir/<Type>/<id>`` →
    (Type, id), a type-level path → (type, None); ``None`` for anything else (``/fhir/metadata``)."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["cases"]:
        return CASE, (parts[1] if len(parts) > 1 and not parts[1].startswith(("_", "$")) else None)
    if parts[:1] == ["fhir"] and len(parts) > 1 and parts[1][:1].isupper() and parts[1].isalnum():
        return parts[1], (parts[2] if len(parts) > 2 and not parts[2].startswith(("_", "$")) else None)
    return None


def interaction(method: str, path: str) -> str:
    """The FHIR interaction a request is, from its method and path (a view may say otherwise)."""
    parts = [p for p in path.split("/") if p]
    entity = entity_from_path(path)
    has_id = entity is not None and entity[1] is not None
    if any(p.startswith("$") for p in parts):
        return "operation"
    if "_history" in parts:
        after = parts[parts.index("_history") + 1:]
        return "vread" if after else ("history-instance" if has_id else "history-type")
    if method in ("GET", "HEAD"):
        if parts[-1:] == ["_search"]:
            return "search-type"
        return "read" if has_id else "search-type"
    if method == "POST":
        if parts[-1:] == ["_search"]:
            return "search-type"
        if parts == ["fhir"]:
            return "transaction"
        return "operation" if has_id else "create"
    return {"PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, "operation")


def outcome_code(status: int) -> str:
    """AuditEvent.outcome: 0 success, 4 minor failure (the client's: 4xx), 8 serious failure (ours: 5xx)."""
    return "0" if status < 400 else "4" if status < 500 else "8"


# -- reading --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Event:
    id: int
    recorded_at: dt.datetime
    organization_id: Optional[str]
    key_id: Optional[str]
    action: str
    operation: str
    entity_type: Optional[str]
    entity_id: Optional[str]
    outcome: int
    detail: dict


#: comparisons a date filter may use, as FHIR search prefixes
DATE_PREFIXES = ("eq", "gt", "ge", "lt", "le")


def search(store: Store, organization_id: str, *, entity: Optional[str] = None,
           dates: Sequence[tuple[str, dt.datetime, dt.datetime]] = (), before_id: Optional[int] = None,
           limit: int = 50) -> list[Event]:
    """An organization's events, newest first, from before the ``before_id`` cursor.

    ``entity`` is ``Type/id`` or a bare id; a case's CarePlan reference finds the case's events.
    ``dates`` are (prefix, start, end) filters on when the event was recorded, where [start, end) is
    the period the value names (a day, a second, ...)."""
    query = select(audit_events).where(audit_events.c.organization_id == organization_id)
    if entity:
        query = query.where(_entity_clause(store, organization_id, entity))
    for prefix, start, end in dates:
        column = audit_events.c.recorded_at
        query = query.where({"eq": and_(column >= start, column < end), "gt": column >= end, "ge": column >= start,
                             "lt": column < start, "le": column < end}[prefix])
    if before_id is not None:
        query = query.where(audit_events.c.id < before_id)
    query = query.order_by(audit_events.c.id.desc()).limit(limit)
    with store.reader.connect() as conn:
        return [_event(row) for row in conn.execute(query)]


def get(store: Store, organization_id: str, event_id: int) -> Optional[Event]:
    with store.reader.connect() as conn:
        row = conn.execute(select(audit_events).where(audit_events.c.id == event_id,
                                                      audit_events.c.organization_id == organization_id)).first()
    return _event(row) if row is not None else None


def _entity_clause(store: Store, organization_id: str, entity: str):
    kind, _, ident = entity.rpartition("/")
    kind = kind.rsplit("/", 1)[-1]  # an absolute reference: keep Type/id
    matches = [audit_events.c.entity_id == ident]
    if kind:
        matches = [and_(audit_events.c.entity_type == kind, audit_events.c.entity_id == ident)]
    if kind in ("", "CarePlan"):
        with store.reader.connect() as conn:
            case_ids = conn.execute(select(fhir_resources.c.case_id).where(
                fhir_resources.c.organization_id == organization_id, fhir_resources.c.resource_type == "CarePlan",
                fhir_resources.c.resource_id == ident)).scalars().all()
        if case_ids:
            matches.append(and_(audit_events.c.entity_type == CASE, audit_events.c.entity_id.in_(case_ids)))
    return or_(*matches)


def _event(row: Any) -> Event:
    stamp = row.recorded_at if row.recorded_at.tzinfo else row.recorded_at.replace(tzinfo=dt.timezone.utc)
    return Event(row.id, stamp, row.organization_id, row.key_id, row.action, row.operation, row.entity_type,
                 row.entity_id, row.outcome, row.detail or {})


# -- presenting -----------------------------------------------------------------------------------
def to_json(event: Event) -> dict:
    return {
        "id": str(event.id),
        "recorded": event.recorded_at.isoformat(),
        "organization_id": event.organization_id,
        "key_id": event.key_id,
        "operation": event.operation,
        "action": event.action,
        "entity": {"type": event.entity_type, "id": event.entity_id},
        "outcome": event.outcome,
        "method": event.detail.get("method"),
        "path": event.detail.get("path"),
    }


def careplan_ids(store: Store, events: Iterable[Event]) -> dict[str, str]:
    """The CarePlan id of each case the events name (one query for a page of events)."""
    wanted = {e.entity_id for e in events if e.entity_type == CASE and e.entity_id}
    if not wanted:
        return {}
    with store.reader.connect() as conn:
        found = dict(conn.execute(select(fhir_resources.c.case_id, fhir_resources.c.resource_id).where(
            fhir_resources.c.resource_type == "CarePlan", fhir_resources.c.case_id.in_(wanted))).all())
    return {case_id: found.get(case_id) or ids.resource_id("CarePlan", case_id) for case_id in wanted}


def to_fhir(event: Event, plans: Optional[dict[str, str]] = None) -> dict:
    """The event as a FHIR R4 AuditEvent. ``plans`` maps case ids to their CarePlan ids
    (:func:`careplan_ids`); a case missing from it gets its deterministic CarePlan id."""
    subtype_system = RESTFUL_INTERACTION if event.operation in INTERACTION_ACTIONS else CS_OPERATION
    outcome = outcome_code(event.outcome)
    resource: dict = {
        "resourceType": "AuditEvent",
        "id": str(event.id),
        "type": AUDIT_EVENT_TYPE,
        "subtype": [{"system": subtype_system, "code": event.operation, "display": event.operation}],
        "action": event.action,
        "recorded": event.recorded_at.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds"),
        "outcome": outcome,
        "outcomeDesc": f"{OUTCOME_DESCRIPTIONS[outcome]} (HTTP {event.outcome})",
        "agent": [_agent(event)],
        "source": {"observer": {"identifier": {"system": SID_SYSTEM, "value": "casebridge"}, "display": "casebridge"},
                   "type": [SOURCE_TYPE_WEB_SERVER]},
    }
    entity = _entity(event, plans or {})
    if entity is not None:
        resource["entity"] = [entity]
    return resource


def _agent(event: Event) -> dict:
    if event.key_id is None:
        return {"who": {"display": "a caller without a valid API key"}, "requestor": True}
    who = {"identifier": {"system": SID_API_KEY, "value": event.key_id},
           "display": f"API key {event.key_id} of organization {event.organization_id}"}
    return {"who": who, "requestor": True}


def _entity(event: Event, plans: dict[str, str]) -> Optional[dict]:
    if not event.entity_type:
        return None
    if event.entity_type == CASE:
        if event.entity_id is None:
            what = {"type": "CarePlan"}
        else:
            plan = plans.get(event.entity_id) or ids.resource_id("CarePlan", event.entity_id)
            what = {"reference": f"CarePlan/{plan}", "type": "CarePlan",
                    "identifier": {"system": ids.SID_CASE, "value": event.entity_id}}
    elif event.entity_id is None:
        what = {"type": event.entity_type}
    else:
        what = {"reference": f"{event.entity_type}/{event.entity_id}", "type": event.entity_type}
    return {"what": what, "type": ENTITY_TYPE_SYSTEM_OBJECT}
