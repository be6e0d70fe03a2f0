"""Logging without client data.

A request is logged as one line: method, the route's path template (``/cases/<case_id>``, never the
path itself or its query string), status, duration and the API key's id — never a body, a header or a
query value. Nothing else in casebridge logs request contents either; an error is logged by its type.

:func:`init_app` adds the request log to an app; :func:`configure` sends casebridge's logs to standard
error, for ``casebridge serve`` (libraries and tests keep their own logging setup).
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Optional

REQUEST_LOGGER = "casebridge.request"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger(REQUEST_LOGGER)


def init_app(app) -> None:
    """Time each request and log it when answered. Call before any other ``before_request`` hook,
    so a request refused by one of them (a 401) is still timed."""
    from flask import g, request

    @app.before_request
    def _start_timer():
        g.casebridge_started = time.perf_counter()

    @app.after_request
    def _log_request(response):
        try:
            started = g.get("casebridge_started")
            elapsed_ms = (time.perf_counter() - started) * 1000 if started is not None else 0.0
            rule = request.url_rule.rule if request.url_rule is not None else "<no route>"
            actor = g.get("actor")
            key_id = actor.key_id if actor is not None else "-"
            fields = {"http_method": request.method, "route": rule, "status": response.status_code,
                      "duration_ms": round(elapsed_ms, 1), "key_id": key_id}
            log.info("%s %s %s %.1fms key=%s", request.method, rule, response.status_code, elapsed_ms, key_id,
                     extra=fields)
        except Exception as error:  # noqa: BLE001 - logging must never break the response
            logging.getLogger("casebridge").error("could not log the request: %s", type(error).__name__)
        return response


def configure(level: Optional[str] = None) -> None:
    """Send casebridge's logs (and warnings from the libraries) to standard error, once."""
    root = logging.getLogger("casebridge")
    if any(getattr(h, "_casebridge", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler._casebridge = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel((level or "INFO").upper())
    root.propagate = False
    # libraries that could echo statements, parameters or URLs at lower levels stay at WARNING
    for name in ("sqlalchemy", "urllib3", "werkzeug", "celery", "kombu"):
        logging.getLogger(name).setLevel(logging.WARNING)
