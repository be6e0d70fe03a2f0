"""The FHIR R4 API (``/fhir``): JSON only (``application/fhir+json``); every error is an
OperationOutcome (``service.api.errors``). The views read the request, call ``service.fhir_services``
and write the headers (ETag, Last-Modified, Location, Prefer); the work is in the use cases."""
from __future__ import annotations

from typing import Optional

import orjson
from flask import Blueprint, Response, request
from werkzeug.exceptions import NotAcceptable, UnsupportedMediaType
from werkzeug.http import http_date

from service import actor, audit, fhir_services, runtime
from service.api.body import read_json
from service.errors import Invalid, Problem
from service.fhir_index import TYPES

bp = Blueprint("fhir", __name__)

FHIR_JSON = "application/fhir+json"
JSON_FORMATS = {"json", "application/json", "application/fhir+json", "application/json+fhir"}
XML_FORMATS = {"xml", "application/xml", "application/fhir+xml", "application/xml+fhir", "text/xml"}
WRITE_TYPES = ("application/fhir+json", "application/json")
TYPE_RULE = "<any(" + ", ".join(TYPES) + "):resource_type>"


@bp.before_request
def negotiate():
    """JSON only: ``_format`` first, then ``Accept`` (406 when neither JSON nor anything goes)."""
    fmt = request.args.get("_format")
    if fmt is not None:
        name = fmt.split(";")[0].strip().lower().replace(" ", "+")  # an unencoded + reads as a space
        if name not in JSON_FORMATS:
            raise NotAcceptable(f"_format={fmt} is not served: this server speaks JSON only "
                                f"({', '.join(sorted(JSON_FORMATS))})")
        return
    accept = request.accept_mimetypes
    if accept.provided and not (accept[FHIR_JSON] or accept["application/json"]):
        raise NotAcceptable(f"this server answers {FHIR_JSON} only, not {request.headers.get('Accept')}")


def _base() -> str:
    root = runtime().settings.base_url.rstrip("/") or request.host_url.rstrip("/")
    return root if root.endswith("/fhir") else f"{root}/fhir"


def _settings():
    return runtime().settings


def _respond(body: Optional[dict], status: int = 200, headers: Optional[dict] = None) -> Response:
    if body is None:  # Prefer: return=minimal: no content, so no content type either
        response = Response(b"", status=status)
        del response.headers["Content-Type"]
    else:
        response = Response(orjson.dumps(body), status=status, mimetype=FHIR_JSON)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def _resource_response(result: fhir_services.Result, location: bool = False) -> Response:
    headers = {}
    if result.version is not None:
        headers["ETag"] = f'W/"{result.version}"'
    if result.last_updated is not None:
        headers["Last-Modified"] = http_date(result.last_updated)
    if location and result.version is not None:
        headers["Location"] = (f"{_base()}/{result.resource_type}/{result.resource_id}"
                               f"/_history/{result.version}")
    body = result.resource
    if location:  # a write: the caller chooses what comes back
        prefer = _prefer()
        if prefer == "minimal":
            body = None
        elif prefer == "OperationOutcome":
            body = {"resourceType": "OperationOutcome", "issue": [{
                "severity": "information", "code": "informational",
                "diagnostics": f"{'created' if result.status == 201 else 'updated'} "
                               f"{result.resource_type}/{result.resource_id} version {result.version}"}]}
    return _respond(body, result.status, headers)


def _prefer() -> str:
    for part in request.headers.get("Prefer", "").split(";"):
        for item in part.split(","):
            name, _, value = item.strip().partition("=")
            if name.strip().lower() == "return":
                value = value.strip().strip('"')
                if value in ("minimal", "representation", "OperationOutcome"):
                    return value
    return "representation"


def _body() -> object:
    mimetype = request.mimetype or ""
    if mimetype in ("application/fhir+xml", "application/xml", "text/xml"):
        raise UnsupportedMediaType(f"{mimetype} is not accepted: send application/fhir+json")
    return read_json(WRITE_TYPES)


def _params() -> list[tuple[str, str]]:
    return list(request.args.items(multi=True))


def _note(entity_type: str, entity_id: Optional[str] = None, operation: Optional[str] = None) -> None:
    audit.note(entity_type, entity_id, operation=operation)


# -- the server ------------------------------------------------------------------------------------
@bp.get("/metadata")
def metadata():
    return _respond(fhir_services.capability_statement(_base()))


@bp.post("")
def bundle():
    data = _body()
    entries = data.get("entry") if isinstance(data, dict) else None
    methods = {str((e.get("request") or {}).get("method", "")).upper() for e in entries or ()
               if isinstance(e, dict) and isinstance(e.get("request"), dict)}
    kind = data.get("type") if isinstance(data, dict) and data.get("type") in ("transaction", "batch") else "batch"
    _note("Bundle", None, operation=kind)
    who = actor("fhir:read" if methods <= {"GET"} else "fhir:write")
    settings = _settings()
    answer = fhir_services.bundle_interaction(runtime().store, who, data, _base(), settings.page_size,
                                              settings.max_page_size)
    audit.note_bundle_entries(runtime().store, who.organization_id, data, answer)
    return _respond(answer)


# -- types -----------------------------------------------------------------------------------------
@bp.get(f"/{TYPE_RULE}")
def search_type(resource_type: str):
    _note(resource_type)
    who = actor("fhir:read")
    settings = _settings()
    return _respond(fhir_services.search(runtime().store, who, resource_type, _params(), _base(),
                                         settings.page_size, settings.max_page_size))


@bp.post(f"/{TYPE_RULE}/_search")
def search_post(resource_type: str):
    _note(resource_type, None, operation="search-type")
    who = actor("fhir:read")
    if request.mimetype != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("POST _search takes application/x-www-form-urlencoded")
    params = _params() + list(request.form.items(multi=True))
    settings = _settings()
    return _respond(fhir_services.search(runtime().store, who, resource_type, params, _base(),
                                         settings.page_size, settings.max_page_size))


@bp.post(f"/{TYPE_RULE}")
def create(resource_type: str):
    _note(resource_type)
    who = actor("fhir:write")
    data = _body()
    result = fhir_services.create(runtime().store, who, resource_type, data,
                                  request.headers.get("If-None-Exist"), base=_base())
    _note(resource_type, result.resource_id)
    if result.status == 201:  # not a conditional create that found its match
        audit.note_resource_written(runtime().store, who.organization_id, resource_type, result.resource_id)
    return _resource_response(result, location=True)


# -- instances -------------------------------------------------------------------------------------
@bp.get(f"/{TYPE_RULE}/<resource_id>")
def read(resource_type: str, resource_id: str):
    _note(resource_type, resource_id)
    who = actor("fhir:read")
    only_format()
    return _resource_response(fhir_services.read(runtime().store, who, resource_type, resource_id))


@bp.put(f"/{TYPE_RULE}/<resource_id>")
def update(resource_type: str, resource_id: str):
    _note(resource_type, resource_id)
    who = actor("fhir:write")
    data = _body()
    result = fhir_services.update(runtime().store, who, resource_type, resource_id, data,
                                  request.headers.get("If-Match"))
    audit.note_resource_written(runtime().store, who.organization_id, resource_type, resource_id)
    return _resource_response(result, location=True)


@bp.get(f"/{TYPE_RULE}/<resource_id>/_history")
def history(resource_type: str, resource_id: str):
    _note(resource_type, resource_id, operation="history-instance")
    who = actor("fhir:read")
    settings = _settings()
    return _respond(fhir_services.history(runtime().store, who, resource_type, resource_id, _base(), _params(),
                                          settings.page_size, settings.max_page_size))


@bp.get(f"/{TYPE_RULE}/<resource_id>/_history/<version_id>")
def vread(resource_type: str, resource_id: str, version_id: str):
    _note(resource_type, resource_id, operation="vread")
    who = actor("fhir:read")
    only_format()
    return _resource_response(fhir_services.vread(runtime().store, who, resource_type, resource_id, version_id))


@bp.get("/Patient/<resource_id>/$everything")
def everything(resource_id: str):
    _note("Patient", resource_id, operation="operation")
    who = actor("fhir:read")
    return _respond(fhir_services.everything(runtime().store, who, resource_id, _base(), _params()))


def only_format() -> None:
    """A read takes no query parameter but ``_format``: any other is a 400 naming it."""
    unknown = [k for k in request.args if k != "_format"]
    if unknown:
        raise Invalid(f"unknown parameter {unknown[0]}", [Problem(k, "not supported on a read") for k in unknown])
