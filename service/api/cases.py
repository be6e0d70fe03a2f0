"""The JSON API over case records, and stateless conversion and import of FHIR.

Views are thin: they read the request, call a use case in ``service.services`` and shape the
response; every error becomes ``application/problem+json`` in ``service.api.errors``. A case belongs
to the caller's organization; another organization's case answers 404 as if it did not exist. Reads
need the ``cases:read`` scope, writes ``cases:write``.

Routes and what they answer:

- ``POST /cases`` (``application/json``, a case record) → 201, the stored record, ``Location``,
  ``ETag``, ``Last-Modified``; 409 when the id is taken.
- ``GET /cases/<id>`` → 200, the stored record and nothing else (its version is in ``ETag:
  W/"<version>"``, its time in ``Last-Modified``).
- ``PUT /cases/<id>`` (``application/json``) and ``PATCH /cases/<id>`` (``application/merge-patch+json``,
  RFC 7386) need ``If-Match`` (``W/"3"``, ``"3"`` or ``*``): 428 without it, 412 when the case is at
  another version; 200 with the new version.
- ``DELETE /cases/<id>`` (``If-Match`` optional) → 200, the record now ``entered_in_error``: a new
  version; nothing is erased.
- ``GET /cases?status=&program=&identifier=[system|]value&updated_since=&limit=&cursor=`` →
  ``{"items": [item...], "next": url or null}``, oldest update first; an item is
  ``{"id", "version", "status", "program", "created_at", "updated_at", "case": record}``.
- ``GET /cases/<id>/history`` → ``{"items": [{"version", "recorded_at", "action": create|update|delete,
  "case": record}]}``, newest first.
- ``GET /cases/<id>/fhir?type=collection|transaction`` → the case as a FHIR Bundle.
- ``POST /convert/to-fhir?type=collection|transaction`` (a case record) → a FHIR Bundle;
  ``POST /convert/from-fhir`` (FHIR JSON or NDJSON) → ``{"cases", "unmapped", "warnings"}``. Both
  store nothing and need ``cases:read``.
- ``POST /import`` (FHIR JSON or NDJSON) → 200, ``{"cases": [{"id", "version", "outcome":
  created|updated|unchanged}], "unmapped", "warnings"}``; idempotent.

Times are ISO 8601 in UTC.
"""
from __future__ import annotations

import datetime as dt
import re
from typing import Any, Optional
from urllib.parse import urlencode

import orjson
from flask import Blueprint, Response, request
from werkzeug.exceptions import PreconditionRequired

from service import actor, audit, runtime, services
from service.api.body import parse_json, read_json
from service.errors import Invalid, Problem
from service.store import StoredCase

bp = Blueprint("cases", __name__)

FHIR_JSON = "application/fhir+json"
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
NDJSON_TYPES = ("application/x-ndjson", "application/fhir+ndjson", "application/ndjson")
FHIR_INPUT_TYPES = (FHIR_JSON, JSON) + NDJSON_TYPES
READ, WRITE = "cases:read", "cases:write"

_ETAG = re.compile(r'^(?:W/)?"([1-9][0-9]{0,17})"$')
_LIST_PARAMS = ("status", "program", "identifier", "updated_since", "limit", "cursor")


# -- case records --------------------------------------------------------------------------------
@bp.post("/cases")
def create_case():
    """201 with the stored record; the id is the record's own."""
    who = actor(WRITE)
    data = read_json((JSON,))
    audit.note(audit.CASE, data.get("id") if isinstance(data, dict) and isinstance(data.get("id"), str) else None)
    stored = services.create_case(runtime().store, who, data)
    response = _case_response(stored, 201)
    response.headers["Location"] = _url(f"/cases/{stored.id}")
    return response


@bp.get("/cases/<case_id>")
def get_case(case_id: str):
    """The stored record; its version is the ETag."""
    who = actor(READ)
    audit.note(audit.CASE, case_id)
    return _case_response(services.get_case(runtime().store, who, case_id))


@bp.put("/cases/<case_id>")
def replace_case(case_id: str):
    who = actor(WRITE)
    audit.note(audit.CASE, case_id)
    expected = _if_match(required=True)
    data = read_json((JSON,))
    return _case_response(services.replace_case(runtime().store, who, case_id, data, expected))


@bp.patch("/cases/<case_id>")
def patch_case(case_id: str):
    who = actor(WRITE)
    audit.note(audit.CASE, case_id)
    expected = _if_match(required=True)
    patch = read_json((MERGE_PATCH,))
    return _case_response(services.patch_case(runtime().store, who, case_id, patch, expected))


@bp.delete("/cases/<case_id>")
def delete_case(case_id: str):
    who = actor(WRITE)
    audit.note(audit.CASE, case_id)
    expected = _if_match(required=False)
    return _case_response(services.delete_case(runtime().store, who, case_id, expected))


@bp.get("/cases")
def list_cases():
    who = actor(READ)
    audit.note(audit.CASE)
    query = _list_query()
    page, cursor = services.list_cases(runtime().store, who, **query)
    next_url = None
    if cursor is not None:
        params = [(k, v) for k, v in request.args.items(multi=True) if k not in ("cursor", "limit")]
        params += [("limit", str(query["limit"])), ("cursor", cursor)]
        next_url = _url("/cases?" + urlencode(params))
    return _json({"items": [_item(stored) for stored in page], "next": next_url})


@bp.get("/cases/<case_id>/history")
def case_history(case_id: str):
    who = actor(READ)
    audit.note(audit.CASE, case_id, operation="history-instance")
    versions = services.case_history(runtime().store, who, case_id)
    return _json({"items": [{"version": v.version, "recorded_at": _time(v.updated_at),
                             "action": services.version_action(v), "case": v.data} for v in versions]})


@bp.get("/cases/<case_id>/fhir")
def case_fhir(case_id: str):
    who = actor(READ)
    audit.note(audit.CASE, case_id)
    bundle = services.export_stored_case(runtime().store, who, case_id, request.args.get("type", "collection"),
                                         _fhir_base())
    return _json(bundle, mimetype=FHIR_JSON)


# -- conversion and import -----------------------------------------------------------------------
@bp.post("/convert/to-fhir")
def convert_to_fhir():
    actor(READ)
    data = read_json((JSON,))
    bundle_type = request.args.get("type", "collection")
    if bundle_type not in services.BUNDLE_TYPES:
        raise Invalid("unknown bundle type",
                      [Problem("type", f"must be one of: {', '.join(services.BUNDLE_TYPES)}")])
    return _json(services.convert_to_fhir(data, bundle_type), mimetype=FHIR_JSON)


@bp.post("/convert/from-fhir")
def convert_from_fhir():
    actor(READ)
    return _json(services.convert_from_fhir(_fhir_body()))


@bp.post("/import")
def import_fhir():
    who = actor(WRITE)
    audit.note(audit.CASE, operation="operation")
    result = services.import_fhir(runtime().store, who, _fhir_body())
    audit.note_imported(result["cases"])
    return _json(result)


# -- helpers -------------------------------------------------------------------------------------
def _case_response(stored: StoredCase, status: int = 200) -> Response:
    response = _json(stored.data, status)
    response.headers["ETag"] = f'W/"{stored.version}"'
    response.last_modified = stored.updated_at
    return response


def _item(stored: StoredCase) -> dict:
    return {"id": stored.id, "version": stored.version, "status": stored.data["status"],
            "program": stored.data["program"], "created_at": _time(stored.created_at),
            "updated_at": _time(stored.updated_at), "case": stored.data}


def _json(body: Any, status: int = 200, mimetype: str = JSON) -> Response:
    return Response(orjson.dumps(body), status=status, mimetype=mimetype)


def _time(stamp: Optional[dt.datetime]) -> Optional[str]:
    if stamp is None:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.timezone.utc)
    return stamp.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _base() -> str:
    return (runtime().settings.base_url or request.host_url).rstrip("/")


def _url(path: str) -> str:
    return _base() + path


def _fhir_base() -> str:
    return _base() + "/fhir"


def _if_match(required: bool) -> Optional[int]:
    """The version ``If-Match`` names; None for ``*`` (or, when not required, for no header)."""
    header = request.headers.get("If-Match")
    if header is None or not header.strip():
        if required:
            raise PreconditionRequired('send If-Match with the version you read: If-Match: W/"<version>" '
                                       "(the ETag of GET /cases/<id>), or If-Match: * for whatever is current")
        return None
    header = header.strip()
    if header == "*":
        return None
    match = _ETAG.match(header)
    if match is None:
        raise Invalid("If-Match is not a version of this case",
                      [Problem("If-Match", f'expected W/"<version>", "<version>" or *, not {header}')])
    return int(match.group(1))


def _list_query() -> dict:
    args = request.args
    problems = [Problem(name, "not a parameter of this search; known: " + ", ".join(_LIST_PARAMS))
                for name in args if name not in _LIST_PARAMS]
    problems += [Problem(name, "given more than once") for name in _LIST_PARAMS if len(args.getlist(name)) > 1]
    settings = runtime().settings
    query: dict = {"status": args.get("status") or None, "program": args.get("program") or None,
                   "cursor": args.get("cursor") or None, "limit": settings.page_size,
                   "identifier": None, "updated_since": None}
    if args.get("limit"):
        raw = args["limit"]
        if not raw.isdigit() or not 1 <= int(raw) <= settings.max_page_size:
            problems.append(Problem("limit", f"must be a whole number from 1 to {settings.max_page_size}"))
        else:
            query["limit"] = int(raw)
    if args.get("identifier"):
        system, bar, value = args["identifier"].partition("|")
        if not bar:
            system, value = "", system
        if not value:
            problems.append(Problem("identifier", "expected system|value or value"))
        query["identifier"] = (system or None, value)
    if args.get("updated_since"):
        query["updated_since"] = _since(args["updated_since"], problems)
    if problems:
        raise Invalid("the case search is not valid", problems)
    return query


def _since(raw: str, problems: list[Problem]) -> Optional[dt.datetime]:
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", raw):
            return dt.datetime.fromisoformat(raw).replace(tzinfo=dt.timezone.utc)
        stamp = dt.datetime.fromisoformat(raw)
        if "T" in raw and stamp.tzinfo is not None:
            return stamp
    except ValueError:
        pass
    problems.append(Problem("updated_since", f"expected a date (2024-06-03) or a date-time with a time zone "
                                             f"(2024-06-03T14:30:00Z), not {raw}"))
    return None


def _fhir_body() -> Any:
    """FHIR JSON, or NDJSON as a list of resources, each checked like any JSON body."""
    if (request.mimetype or "") not in NDJSON_TYPES:
        return read_json(FHIR_INPUT_TYPES)  # (NDJSON is read below)
    resources = []
    for number, line in enumerate(request.get_data(cache=True).splitlines(), 1):
        if not line.strip():
            continue
        try:
            resources.append(parse_json(line))
        except Invalid as error:
            raise Invalid(f"line {number} of the NDJSON: {error.message}",
                          [Problem(f"line {number}", p.message) for p in error.problems]) from None
    if not resources:
        raise Invalid("the NDJSON holds no resources", [Problem("", "expected one FHIR resource a line")])
    return resources
