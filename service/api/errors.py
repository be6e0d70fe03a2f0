"""The one place errors become HTTP responses: ``application/problem+json`` for the JSON API, an
``OperationOutcome`` for the FHIR API. A bad request names the field; an unexpected error is a 500
that says nothing about the data, and is logged without it: the route's template (never the path or
its query), the exception's type and frames, never its message or locals."""
from __future__ import annotations

import logging

import orjson
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from service.auth import Unauthenticated
from service.errors import CasebridgeError, Problem
from service.logging import WithoutClientData, describe_exception

log = logging.getLogger("casebridge")

FHIR_JSON = "application/fhir+json"
PROBLEM_JSON = "application/problem+json"

#: HTTP status → FHIR issue code, for errors raised by the web layer itself
HTTP_FHIR_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
                   406: "not-supported", 409: "conflict", 410: "deleted", 412: "conflict", 413: "too-costly",
                   415: "not-supported", 422: "processing", 428: "required", 429: "throttled"}


def is_fhir_request() -> bool:
    return request.path == "/fhir" or request.path.startswith("/fhir/")


def operation_outcome(status: int, code: str, message: str, problems: list[Problem]) -> dict:
    issues = [{"severity": "error", "code": code, "diagnostics": p.message,
               **({"expression": [p.path]} if p.path else {})} for p in problems]
    return {"resourceType": "OperationOutcome",
            "issue": issues or [{"severity": "error" if status >= 400 else "information", "code": code,
                                 "diagnostics": message}]}


def error_response(status: int, code: str, title: str, message: str, problems: list[Problem],
                   headers: dict | None = None) -> Response:
    if is_fhir_request():
        body, mimetype = operation_outcome(status, code, message, problems), FHIR_JSON
    else:
        body = {"type": "about:blank", "title": title, "status": status, "detail": message}
        if problems:
            body["errors"] = [{"field": p.path, "message": p.message} for p in problems]
        mimetype = PROBLEM_JSON
    response = Response(orjson.dumps(body), status=status, mimetype=mimetype)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def log_unexpected(error: BaseException) -> None:
    """A 500 as an operator needs it: method, route template, the exception's type and frames."""
    rule = request.url_rule.rule if request.url_rule is not None else "<no route>"
    log.error("unexpected error handling %s %s: %s", request.method, rule, describe_exception(error),
              extra={"http_method": request.method, "route": rule, "error_type": type(error).__name__})


def register(app: Flask) -> None:
    # Flask logs an exception no handler took (one raised after the view, by an after_request hook) with
    # the path and the whole traceback; and its logger writes a hook's failure while answering an error.
    app.log_exception = lambda exc_info: log_unexpected(exc_info[1])  # type: ignore[method-assign]
    if not any(isinstance(f, WithoutClientData) for f in app.logger.filters):
        app.logger.addFilter(WithoutClientData())

    @app.errorhandler(CasebridgeError)
    def _casebridge_error(error: CasebridgeError):
        if error.status >= 500:
            log.error("internal error: %s", type(error).__name__)
        headers = {}
        if isinstance(error, Unauthenticated):
            headers["WWW-Authenticate"] = 'Bearer realm="casebridge"'
        return error_response(error.status, error.fhir_code, error.title, error.message, error.problems, headers)

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        status = error.code or 500
        headers = {k: v for k, v in error.get_headers() if k.lower() in ("allow", "retry-after")}
        return error_response(status, HTTP_FHIR_CODES.get(status, "exception"), error.name,
                              error.description or error.name, [], headers)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        log_unexpected(error)
        return error_response(500, "exception", "Internal error", "an unexpected error occurred; it has been logged",
                              [])
